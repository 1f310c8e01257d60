"""Saving and loading compact networks (build stage, torch): one safetensors file, no pickle.

The file holds the model's state dict and, in its string metadata, ``spvit_dsl.format = compact/1``,
``spvit_dsl.spec`` (the frozen spec text of what was built), ``spvit_dsl.weights`` (where the weights came from) and
``spvit_dsl.arch`` (JSON, for tools). Loading compiles the embedded spec, builds the skeleton
(:func:`~spvit_dsl.compact.create_compact`) and loads the tensors strictly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..lang.errors import UsageError
from ..space.plan import FrozenArch
from .skeleton import create_compact

__all__ = ["FORMAT", "load_file", "read_metadata", "safetensors_metadata", "save"]

FORMAT = "compact/1"


def safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of any safetensors file; :class:`UsageError` for a missing or foreign file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except Exception as e:  # not a safetensors file
        raise UsageError(f"{path} is not a safetensors file: {' '.join(str(e).split())[:200]}") from e


def save(model: nn.Module, path: str) -> None:
    """Write a built model: its state dict as safetensors, the frozen spec text in the metadata (no pickle)."""
    from safetensors.torch import save_file

    from .._io import write_atomic

    spec = getattr(model, "spvit_spec", None)
    if not spec:
        raise ValueError(
            "the model carries no frozen spec (spvit_spec); build it with spvit_dsl.compact.build.build"
        )
    arch = model.spvit_arch
    assert isinstance(arch, FrozenArch)  # set by create_compact, like spvit_spec
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "spvit_dsl.format": FORMAT,
        "spvit_dsl.spec": spec,
        "spvit_dsl.weights": str(getattr(model, "spvit_weights", "")),
        "spvit_dsl.arch": json.dumps(_arch_json(arch)),
    }
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _arch_json(arch: FrozenArch) -> dict[str, Any]:
    """Every dimension of the point, densities included (a sparse layer's weights are stored dense, zeros in place)."""
    return {
        "embed": list(arch.embed),
        "sparse": arch.sparse,
        "blocks": [
            {"op": b.op, "ffn": b.ffn, "heads": b.heads, "head_dim": b.head_dim, "density": vars(b.density)}
            for b in arch.blocks
        ],
    }


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a built model file; :class:`UsageError` for a missing or foreign file."""
    meta = safetensors_metadata(path)
    if meta.get("spvit_dsl.format") != FORMAT:
        raise UsageError(
            f"{path} is not a built spvit-dsl model (format {meta.get('spvit_dsl.format')!r}; "
            "expected one written by 'spvit-dsl build')"
        )
    return meta


def load_file(
    path: str, *, device: torch.device | str | None = None, timm_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """The model saved in ``path`` (eval mode), rebuilt from its embedded frozen spec."""
    from safetensors import safe_open

    from ..compile.freeze import arch_of
    from ..compile.program import compile_text

    meta = read_metadata(path)
    program = compile_text(meta["spvit_dsl.spec"], f"{path}:spec")
    if not program.frozen:
        raise UsageError(f"{path}: the embedded spec is not frozen ({program.decisions} decisions open)")
    model = create_compact(
        program.space.geometry, arch_of(program.checked), device=device, **(timm_kwargs or {})
    )
    with safe_open(path, framework="pt", device=str(device or "cpu")) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{path} does not match its embedded spec: {' '.join(str(e).split())[:300]}") from e
    # nn.Module.__setattr__ takes any value; its stub only allows Tensor | Module
    model.spvit_spec, model.spvit_weights = meta["spvit_dsl.spec"], meta.get("spvit_dsl.weights", "")  # type: ignore[assignment]
    return model.eval()
