"""Search stage — checkpoints: the whole search state ↔ one safetensors file (no pickle), written atomically.

Tensors (safetensors): ``net/<state-dict key>`` (supernet weights, BatchNorm statistics, fixed masks),
``strategy/<key>`` (the strategy's own tensors: gate logits, scores), ``opt/<name>/<param index>/<field>``
(optimizer moments and step counters), ``rng/torch``, ``rng/gates`` (a strategy's noise generator), ``rng/cuda``
(when on GPU) and ``kept/<group path>`` (the final kept units — ordered indices, or a bool mask for a weights group
— once the search has finished). Everything else — epoch, step, the strategy's schedules, optimizer hyperparameters, settings,
the spec's hash, the units left in shrunk groups — is JSON in the file's metadata under ``spvit_dsl.state``, and
the spec text the search compiled is stored under ``spvit_dsl.spec`` (with its path under ``spvit_dsl.spec_path``),
so a checkpoint is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .._io import write_atomic
from ..lang.errors import UsageError

__all__ = ["FORMAT", "Checkpoint", "load_checkpoint", "save_checkpoint", "spec_hash"]

FORMAT = "search-ckpt/1"


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Checkpoint:
    """A search state in memory: tensors by group and the JSON state."""

    net: dict[str, Tensor]
    optimizers: dict[str, dict[str, Any]]  # name → optimizer state_dict
    rng: dict[str, Tensor]
    state: dict[str, Any]  # JSON: epoch, step, batch, finished, strategy, settings, spec_hash...
    kept: dict[str, Tensor] = field(default_factory=dict)
    strategy: dict[str, Tensor] = field(default_factory=dict)
    spec: str = ""  # the spec text the search compiled
    spec_path: str = ""


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _flatten_optimizer(name: str, sd: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Put the optimizer's tensors into ``tensors``; return its JSON part (param groups, scalar state)."""
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"opt/{name}/{pid}/{k}"] = _cpu(v)
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(path: str, ckpt: Checkpoint, *, fmt: str = FORMAT) -> None:
    """Write ``ckpt`` to ``path`` atomically (a temporary sibling renamed over the target). ``fmt`` names the
    kind of training state (search, fine-tune) so one is never resumed as the other."""
    tensors: dict[str, Tensor] = {f"net/{k}": _cpu(v) for k, v in ckpt.net.items()}
    opt_json = {name: _flatten_optimizer(name, sd, tensors) for name, sd in ckpt.optimizers.items()}
    tensors.update({f"rng/{k}": _cpu(v) for k, v in ckpt.rng.items()})
    tensors.update({f"kept/{k}": _cpu(v) for k, v in ckpt.kept.items()})
    tensors.update({f"strategy/{k}": _cpu(v) for k, v in ckpt.strategy.items()})
    state = dict(ckpt.state, optimizers=opt_json)
    meta = {"spvit_dsl.format": fmt, "spvit_dsl.state": json.dumps(state, sort_keys=True)}
    if ckpt.spec:
        meta |= {"spvit_dsl.spec": ckpt.spec, "spvit_dsl.spec_path": ckpt.spec_path}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: str, *, fmt: str = FORMAT) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing or foreign file is a UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {' '.join(str(e).split())}") from None
    if meta.get("spvit_dsl.format") != fmt:
        kind = fmt.split("-")[0]
        raise UsageError(
            f"{path} is not a spvit-dsl {kind} checkpoint (format {meta.get('spvit_dsl.format')!r})"
        )
    state = json.loads(meta["spvit_dsl.state"])
    opt_json = state.pop("optimizers", {})
    groups = _split(tensors)
    optimizers = {name: _optimizer_state(name, j, groups.get("opt", {})) for name, j in opt_json.items()}
    return Checkpoint(
        groups.get("net", {}),
        optimizers,
        groups.get("rng", {}),
        state,
        groups.get("kept", {}),
        groups.get("strategy", {}),
        meta.get("spvit_dsl.spec", ""),
        meta.get("spvit_dsl.spec_path", ""),
    )


def _split(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        head, rest = k.split("/", 1)
        out.setdefault(head, {})[rest] = v
    return out


def _optimizer_state(name: str, js: dict[str, Any], opt: dict[str, Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}/"
    for k, v in opt.items():
        if k.startswith(prefix):
            pid, fld = k[len(prefix) :].split("/", 1)
            state.setdefault(int(pid), {})[fld] = v
    for pid, scalars in js.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(scalars)
    return {"state": state, "param_groups": js["param_groups"]}


def read_state(path: str) -> dict[str, Any]:
    """Only the JSON state of a checkpoint (cheap: no tensors are read)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("spvit_dsl.state", "{}"))


def rng_state(gen: torch.Generator | None, device: torch.device) -> dict[str, Tensor]:
    """The random states a resumed search must restore: torch's CPU generator, a strategy's noise, CUDA's."""
    out = {"torch": torch.get_rng_state()}
    if gen is not None:
        out["gates"] = gen.get_state()
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form: the global generator is an MT19937
    out["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))  # timm's Mixup draws from numpy
    return out


def numpy_rng_extra() -> list[Any]:
    """The non-array part of numpy's global RNG state (JSON)."""
    _name, _keys, pos, has_gauss, gauss = np.random.get_state()
    return [int(pos), int(has_gauss), float(gauss)]


def restore_rng(
    gen: torch.Generator | None,
    rng: dict[str, Tensor],
    device: torch.device,
    numpy_extra: list[Any] | None = None,
) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if gen is not None and "gates" in rng:
        gen.set_state(rng["gates"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    if "numpy" in rng and numpy_extra:
        keys = rng["numpy"].numpy().astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, int(numpy_extra[0]), int(numpy_extra[1]), float(numpy_extra[2]))
        )
