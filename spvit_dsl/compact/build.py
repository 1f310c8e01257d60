"""Stage — build: a frozen spec → a compact, plain ``nn.Module`` (torch).

Input: a frozen :class:`~spvit_dsl.compile.program.Program` (or the path of a frozen ``.vit``) and a weights source. Output:
a timm model whose blocks hold exactly the frozen choices (:mod:`spvit_dsl.compact`), needing neither the supernet
nor the search code to run, save or load. Implements SPViT's fine-tune starting points (He et al., TPAMI 2024, §4):

* ``weights=<search checkpoint>`` — keep what the search learned: each conv op is *folded* from the supernet's shared
  ``qkv``/``proj`` weights and its head-mixing matrix into ``Conv2d(C,d,k) → BN → ReLU → Conv2d(d,C,1)`` (BN statistics
  carried over), FFNs keep the neurons the search kept;
* ``weights=pretrained`` or a dense checkpoint — the official recipe: start from the dense weights, gather the FFN
  neurons the search kept (``masks=<search checkpoint>``) or else the most important ones (‖fc1 row‖·‖fc2 column‖),
  and derive each conv from a fresh mixing matrix (ones) and fresh BatchNorms;
* ``weights=none`` — random initialisation.

``round_to=N`` first rounds every FFN width to the nearest multiple of N (never above the dense width).
:func:`save` writes safetensors with the frozen spec text in the metadata; :func:`load` rebuilds from it (no pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..lang.errors import UsageError
from ..space.plan import FrozenArch, Geometry
from .io import FORMAT, load_file, read_metadata, safetensors_metadata, save
from .skeleton import check_buildable, create_compact

if TYPE_CHECKING:
    from ..compile.program import Program
    from ..supernet.net import BlockRow, Supernet

__all__ = [
    "FORMAT",
    "build",
    "fold",
    "frozen_program",
    "kept_masks",
    "load",
    "read_metadata",
    "round_widths",
    "save",
]


# --- the frozen spec -----------------------------------------------------------------------------------------


def frozen_program(frozen: str | Program) -> Program:
    """Compile a frozen ``.vit`` (or check a Program): every decision must be fixed."""
    from ..compile.program import Program, compile_file

    program = frozen if isinstance(frozen, Program) else compile_file(frozen)
    if not program.frozen:
        raise UsageError(
            f"{program.path} is not a frozen spec: {program.decisions} decision(s) are still open "
            "(run 'spvit-dsl search' to freeze it)"
        )
    return program


def round_widths(geometry: Geometry, arch: FrozenArch, multiple: int) -> FrozenArch:
    """Every FFN width to the nearest multiple of ``multiple`` (halves round up), capped at the dense width."""
    if multiple < 1:
        raise UsageError(f"--round: expected a positive integer, found {multiple}")
    blocks = []
    for b, a in zip(geometry.blocks, arch.blocks, strict=True):
        width = min(((2 * a.ffn + multiple) // (2 * multiple)) * multiple, b.hidden)
        blocks.append(replace(a, ffn=width))
    return replace(arch, blocks=tuple(blocks))


# --- kept FFN neurons ----------------------------------------------------------------------------------------


def _scores(row: BlockRow) -> Tensor:
    """Per-neuron preference: the gate logit for per-neuron/group gates, else ‖fc1 row‖·‖fc2 column‖."""
    g = row.ffn_gate
    if g is not None and not g.nested:
        return g.logits.detach()[g.group_of].float()
    return row.mlp.importance().float()


def _adjust(mask: Tensor, width: int, score: Tensor) -> Tensor:
    """``mask`` grown (best unkept first) or shrunk (worst kept first) to exactly ``width`` neurons."""
    if int(mask.sum()) == width:
        return mask
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort((~mask[order]).to(torch.int8), stable=True).indices]  # kept neurons first
    out = torch.zeros_like(mask)
    out[order[:width]] = True
    return out


def kept_masks(net: Supernet, arch: FrozenArch, kept: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The FFN neurons each block of ``arch`` keeps: ``kept`` (or what ``net`` keeps now) adjusted to the frozen
    widths by :func:`_scores` (needed after ``round_to`` or when the frozen spec was edited by hand)."""
    base = net.kept_units()
    out = {}
    for row, choice in zip(net.rows, arch.blocks, strict=True):
        name = f"blocks.{row.index}.ffn"
        mask = (kept or {}).get(name, base[name]).to(torch.bool)
        if mask.numel() != row.hidden:
            raise UsageError(
                f"{name}: the kept mask has {mask.numel()} entries, the block {row.hidden} neurons"
            )
        out[name] = _adjust(mask.to(row.mlp.fc1.weight.device), choice.ffn, _scores(row))
    return out


# --- folding a supernet into the compact network -------------------------------------------------------------


def _block_names(geometry: Geometry) -> list[str]:
    if geometry.family == "swin":
        return [f"layers.{b.stage}.blocks.{b.index_in_stage}" for b in geometry.blocks]
    return [f"blocks.{b.index}" for b in geometry.blocks]


def _conv_state(prefix: str, row: BlockRow, op: str) -> dict[str, Tensor]:
    """The folded ``Conv2d → BN → ReLU → Conv2d`` of one conv op (SPViT §1, §4)."""
    from ..space.ops import OPS

    attn = row.attn
    if op not in attn.bns:
        raise UsageError(
            f"blocks[{row.index}]: the frozen op '{op}' was not a candidate of the searched space "
            f"({' | '.join(attn.candidates)}), so the checkpoint has no weights for it"
        )
    kernel, bias, expand = attn.conv_weights(OPS.get(op).kernel)
    d, dim = kernel.shape[0], expand.shape[0]
    state = {
        f"{prefix}.conv.weight": kernel,
        f"{prefix}.conv.bias": bias if bias is not None else kernel.new_zeros(d),
        f"{prefix}.proj.weight": expand[:, :, None, None],
        f"{prefix}.proj.bias": attn.proj.bias if attn.proj.bias is not None else expand.new_zeros(dim),
    }
    state.update({f"{prefix}.bn.{k}": v for k, v in attn.bns[op].state_dict().items()})
    return state


def _ffn_state(prefix: str, row: BlockRow, mask: Tensor) -> dict[str, Tensor]:
    """fc1 rows and fc2 columns of the kept neurons (fc2's bias alone at width 0)."""
    mlp = row.mlp
    if not bool(mask.any()):
        return {
            f"{prefix}.bias": mlp.fc2.bias
            if mlp.fc2.bias is not None
            else mlp.fc2.weight.new_zeros(mlp.fc2.out_features)
        }
    index = mask.nonzero().squeeze(1)
    state = {
        f"{prefix}.fc1.weight": mlp.fc1.weight.index_select(0, index),
        f"{prefix}.fc2.weight": mlp.fc2.weight.index_select(1, index),
    }
    if mlp.fc1.bias is not None:
        state[f"{prefix}.fc1.bias"] = mlp.fc1.bias.index_select(0, index)
    if mlp.fc2.bias is not None:
        state[f"{prefix}.fc2.bias"] = mlp.fc2.bias
    return state


def fold(
    net: Supernet, arch: FrozenArch, kept: dict[str, Tensor] | None = None, **timm_kwargs: Any
) -> nn.Module:
    """The compact network of ``arch`` carrying ``net``'s weights (``net`` is not modified).

    Equals ``net`` fixed to ``(arch, kept)`` in eval mode. ``kept``: FFN neuron masks by decision (default: what
    ``net`` keeps now), adjusted to ``arch``'s widths by :func:`kept_masks`. ``timm_kwargs``: see
    :func:`~spvit_dsl.compact.create_compact`.
    """
    geometry = net.space.geometry
    check_buildable(geometry, arch)
    device = next(net.model.parameters()).device
    masks = kept_masks(net, arch, kept)
    model = create_compact(geometry, arch, device=device, **timm_kwargs)
    with torch.no_grad():
        state: dict[str, Tensor] = {}
        for name, row, choice in zip(_block_names(geometry), net.rows, arch.blocks, strict=True):
            if choice.op not in ("skip", "msa"):
                state.update(_conv_state(f"{name}.attn", row, choice.op))
            state.update(_ffn_state(f"{name}.mlp", row, masks[f"blocks.{row.index}.ffn"]))
        source = net.model.state_dict()
        for key in model.state_dict():
            if key not in state:
                state[key] = source[key]
        model.load_state_dict(state, strict=True)
    model.train(net.training)
    return model


# --- weights sources -----------------------------------------------------------------------------------------


_SEARCH_FORMATS = (
    "supernet/1",
    "search-ckpt/1",
)  # spvit_dsl.supernet.io.FORMAT, spvit_dsl.search.checkpoint.FORMAT


def _search_format(path: str) -> bool:
    """Whether ``path`` is a search checkpoint or a saved supernet (safetensors with our metadata)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as fh:  # safetensors: 8-byte header length, then a JSON header
        if fh.read(9)[8:9] != b"{":
            return False
    return safetensors_metadata(path).get("spvit_dsl.format") in _SEARCH_FORMATS


def _load_search(
    path: str, frozen: Program | None, device: torch.device | str | None
) -> tuple[Supernet, dict[str, Tensor] | None]:
    """The supernet of a search checkpoint (``search.ckpt``) or saved supernet, and its final kept masks if any."""
    if not os.path.isfile(path):
        raise UsageError(f"search checkpoint not found: {path}")
    meta = safetensors_metadata(path)
    if meta.get("spvit_dsl.format") == "supernet/1":
        from ..supernet.io import load_supernet

        return load_supernet(path, device=device), None
    state = json.loads(meta.get("spvit_dsl.state", "{}"))
    program = _search_program(path, meta, state, frozen)
    settings = state.get("settings", {})
    net = _lower(
        program,
        "none",
        device,
        alpha=float(settings.get("alpha", 0.0) or 0.0),
        gate_init=float(settings.get("gate_init", 1.5)),
        seed=int(settings.get("seed", 0)),
    )
    tensors = _read_groups(path, ("net/", "kept/"), device)
    try:
        net.load_state_dict(tensors["net/"], strict=True)
    except RuntimeError as e:
        raise UsageError(
            f"{path} does not match the supernet of {program.path}: {' '.join(str(e).split())[:200]}"
        ) from None
    return net, tensors["kept/"] or None


def _read_groups(path: str, prefixes: tuple[str, ...], device: torch.device | str | None) -> dict[str, dict]:
    """Only the tensors under ``prefixes`` (a search checkpoint also holds optimizer moments: skip them)."""
    from safetensors import safe_open

    out: dict[str, dict[str, Tensor]] = {p: {} for p in prefixes}
    with safe_open(path, framework="pt", device=str(device or "cpu")) as f:
        for key in f.keys():
            for p in prefixes:
                if key.startswith(p):
                    out[p][key[len(p) :]] = f.get_tensor(key)
    return out


def _search_program(
    path: str, meta: dict[str, str], state: dict[str, Any], frozen: Program | None
) -> Program:
    """The search spec a checkpoint was written for: embedded in it, or else the frozen spec's ``source`` looked up
    from the working folder, the frozen spec's folder and the checkpoint's folder and its two parents (the search
    ran somewhere above ``runs/<name>/``); only a file whose text hashes to the checkpoint's ``spec_hash`` counts."""
    from ..compile.program import compile_file, compile_text
    from ..search.checkpoint import spec_hash

    if meta.get("spvit_dsl.spec"):
        return compile_text(meta["spvit_dsl.spec"], meta.get("spvit_dsl.spec_path", f"{path}:spec"))
    source = str((frozen.checked.frozen or {}).get("source", "")) if frozen is not None else ""
    if source and frozen is not None:
        ckpt_dir = os.path.dirname(os.path.abspath(path))
        bases = [
            ".",
            os.path.dirname(frozen.path),
            ckpt_dir,
            os.path.dirname(ckpt_dir),
            os.path.dirname(os.path.dirname(ckpt_dir)),
        ]
        for base in bases:
            candidate = os.path.join(base, source)
            if os.path.isfile(candidate):
                with open(candidate, encoding="utf-8") as fh:
                    if state.get("spec_hash") in (None, spec_hash(fh.read())):
                        return compile_file(candidate)
    raise UsageError(
        f"{path} does not embed its search spec, and the frozen spec's source '{source or '?'}' "
        "(with the text the search used) was not found next to it; build from the folder the search "
        "ran in"
    )


def _lower(program: Program, weights: str, device: torch.device | str | None, **options: Any) -> Supernet:
    from ..supernet.lower import lower

    alpha = options.pop("alpha", 0.0) or None
    try:
        return lower(
            program.space,
            weights=weights,
            convention=program.convention,
            alpha=alpha,
            device=device,
            **options,
        )
    except NotImplementedError as e:
        raise UsageError(str(e)) from None


def _same_backbone(net: Supernet, geometry: Geometry, path: str) -> None:
    g = net.space.geometry
    if (g.model, g.img_size, g.num_classes, g.in_chans, g.blocks) != (
        geometry.model,
        geometry.img_size,
        geometry.num_classes,
        geometry.in_chans,
        geometry.blocks,
    ):
        raise UsageError(
            f"{path} was searched on another backbone ({g.model}, {g.img_size}px, {g.num_classes} "
            f"classes) than the frozen spec's ({geometry.model}, {geometry.img_size}px, "
            f"{geometry.num_classes} classes)"
        )


def _dense_net(program: Program, weights: str, device: torch.device | str | None) -> Supernet:
    """The frozen space lowered over the dense weights: fresh mixing matrices (ones) and BatchNorms."""
    alpha = float(program.checked.search.values.get("alpha", 0.0) or 0.0)
    return _lower(program, weights, device, alpha=alpha)


def _search_masks(path: str, frozen: Program) -> dict[str, Tensor]:
    if not _search_format(path):
        raise UsageError(f"--masks: {path} is not a search checkpoint (search.ckpt or a saved supernet)")
    net, kept = _load_search(path, frozen, "cpu")
    _same_backbone(net, frozen.space.geometry, path)
    return kept or net.kept_units()


# --- the stage -----------------------------------------------------------------------------------------------


def build(
    frozen: str | Program,
    *,
    weights: str | None = None,
    masks: str | None = None,
    round_to: int | None = None,
    device: torch.device | str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The compact network of a frozen spec.

    ``weights``: a search checkpoint (``.safetensors`` saved supernet), ``pretrained``, a dense checkpoint, or ``none``
    (default: the spec's ``weights`` setting). ``masks``: a search checkpoint whose kept FFN neurons are gathered from
    dense ``weights``. ``round_to``: round FFN widths to multiples of N first. ``timm_kwargs``: extra
    ``timm.create_model`` options that do not change shapes (e.g. ``drop_path_rate`` for fine-tuning; not saved).
    The returned model carries
    ``spvit_spec`` (frozen spec text of what was built), ``spvit_arch``, ``spvit_geometry`` and ``spvit_weights``.
    """
    program = frozen_program(frozen)
    geometry = program.space.geometry
    from ..compile.freeze import arch_of

    original = arch_of(program.checked)
    arch = original if round_to is None else round_widths(geometry, original, round_to)
    check_buildable(geometry, arch)
    weights = program.checked.weights if weights is None else weights
    model = _build_weights(program, arch, weights, masks, device, timm_kwargs or {})
    model.spvit_spec = frozen_text(program, arch, round_to) if arch != original else program.source
    model.spvit_weights = weights if masks is None else f"{weights} (FFN neurons kept by {masks})"
    return model


def _build_weights(
    program: Program,
    arch: FrozenArch,
    weights: str,
    masks: str | None,
    device: torch.device | str | None,
    timm_kwargs: dict[str, Any],
) -> nn.Module:
    geometry = program.space.geometry
    if weights in ("none", ""):
        if masks is not None:
            raise UsageError(
                "--masks needs dense weights to gather from (--weights pretrained or a checkpoint)"
            )
        return create_compact(geometry, arch, device=device, **timm_kwargs)
    if _search_format(weights):
        if masks is not None:
            raise UsageError(
                "--masks is for dense --weights; a search checkpoint already holds its kept neurons"
            )
        net, kept = _load_search(weights, program, device)
        _same_backbone(net, geometry, weights)
        net.eval()
        return fold(net, arch, kept, **timm_kwargs)
    kept = _search_masks(masks, program) if masks is not None else None
    net = _dense_net(program, weights, device)
    net.eval()
    return fold(net, arch, kept, **timm_kwargs)


def frozen_text(program: Program, arch: FrozenArch, round_to: int | None) -> str:
    """The frozen spec of ``arch`` (after rounding): the original header, ``ffn_round``, and the updated costs
    (which :func:`~spvit_dsl.compile.freeze.freeze` stamps)."""
    from ..compile.freeze import freeze
    from ..lang.emit import emit

    header: dict[str, Any] = {k: _header_value(v) for k, v in (program.checked.frozen or {}).items()}
    header.pop("date", None)  # freeze() stamps today's date
    if round_to is not None:
        header["ffn_round"] = round_to
    return emit(freeze(program.checked, arch, header, convention=program.convention))


def _header_value(v: object) -> object:
    if isinstance(v, str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
    return v


# --- loading --------------------------------------------------------------------------------------------


def load(
    path: str,
    weights: str | None = None,
    *,
    device: torch.device | str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A compact model from a built ``.safetensors`` file (rebuilt from its embedded spec, no pickle; eval mode)
    or a frozen ``.vit`` (built with ``weights``, see :func:`build`)."""
    if not path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise UsageError(f"file not found: {path}")
        return build(path, weights=weights, device=device, timm_kwargs=timm_kwargs)
    if weights is not None:
        raise UsageError(f"{path} already holds its weights; 'weights' applies to a frozen .vit only")
    return load_file(path, device=device, timm_kwargs=timm_kwargs)
