"""Stage — build: a frozen spec → a compact, plain ``nn.Module`` (torch).

Input: a frozen :class:`~spvit_dsl.compile.program.Program` (or the path of a frozen ``.vit``) and a weights source.
Output: a timm model holding exactly the frozen choices — every dimension sliced to its kept units
(:mod:`.slice`), needing neither the supernet nor the search code to run, save or load. The weights sources
(SPViT's fine-tune starting points, He et al., TPAMI 2024, §4, and their generalisation to every group):

* ``weights=<search checkpoint>`` — keep what the search learned: the supernet is rebuilt from the spec the
  checkpoint embeds (shrinks re-applied), its weights loaded, and the units the search kept (stored per group) cut
  out; conv ops are folded into ``Conv2d(C,d,k) → BN → ReLU → Conv2d(d,C,1)`` (BN statistics carried over);
* ``weights=pretrained`` or a dense checkpoint — start from the dense weights: the units kept by ``masks=<search
  checkpoint>``, or else the largest by L1 magnitude; convs from a fresh mixing matrix (ones) and fresh BatchNorms;
* ``weights=none`` — random initialisation.

``round_to=N`` first rounds every FFN width to the nearest multiple of N (never above the dense width). Sparse
layers are stored dense with their zeros in place. :func:`save` writes safetensors with the frozen spec in the
metadata; :func:`load` rebuilds from it (no pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._io import checkpoint_kind, input_problem
from ..compile.freeze import arch_of, freeze
from ..compile.program import Program, compile_file, compile_text
from ..lang.emit import emit
from ..lang.errors import UsageError
from ..search.checkpoint import FORMAT as SEARCH_FORMAT
from ..search.checkpoint import spec_hash
from ..space.geometry import Geometry
from ..space.groups import UnitGroup, embed_path, value_of
from ..space.latency import LatencySetting, round_for_latency, rounding_space
from ..space.plan import FrozenArch
from ..supernet import Supernet
from ..supernet._shrink import restore_shrunk
from ..supernet.io import FORMAT as SUPERNET_FORMAT
from ..supernet.io import load_supernet
from ..supernet.lower import lower
from .io import FORMAT, load_file, read_metadata, safetensors_metadata, save
from .latency import table_for
from .skeleton import check_buildable, create_compact, sparsify_
from .slice import compact_state

__all__ = [
    "FORMAT",
    "adjust_kept",
    "build",
    "fold",
    "frozen_program",
    "latency_rounded",
    "load",
    "read_metadata",
    "round_widths",
    "save",
]


# --- the frozen spec -----------------------------------------------------------------------------------------


def frozen_program(frozen: str | Program) -> Program:
    """Compile a frozen ``.vit`` (or check a Program): every decision must be fixed."""
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


# --- kept units and folding ------------------------------------------------------------------------------------


def adjust_kept(net: Supernet, arch: FrozenArch, kept: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``kept`` with every structured group resized to ``arch``'s count: grown by appending the largest unkept
    units, shrunk by dropping the smallest kept ones (L1 magnitude; needed after ``--round`` or a hand edit of the
    frozen spec); the kept units stay in their order. A weights mask is kept unless its layer's rows or columns were
    resized or its density changed (the supernet then picks the largest weights again). Groups ``kept`` does
    not mention are left out (the supernet picks them)."""
    out = {}
    resized: set[str] = set()
    for path in kept:
        if path not in net.groups:
            raise UsageError(f"the checkpoint keeps units of '{path}', which the space does not have")
    for path, index in kept.items():
        group = net.groups[path]
        if group.kind in ("weights", "attention"):
            continue
        if index.dim() == 2:  # regrouped heads: (heads, head_dim) of the point, or not buildable
            b = arch.blocks[group.block or 0]
            if tuple(index.shape) != (b.heads, b.head_dim):
                raise UsageError(
                    f"{path}: the search regrouped heads into {index.shape[0]} of {index.shape[1]}, the frozen spec "
                    f"says {b.heads} of {b.head_dim}; regrouped heads cannot be resized: search again"
                )
            out[path] = index
            continue
        count = int(value_of(arch, group))
        if index.numel() > count:  # drop the smallest kept units; the others keep their order
            scores = net.unit_scores(path).to(index.device)[index]
            drop = torch.sort(scores, stable=True).indices[: index.numel() - count]
            index = index[~torch.isin(torch.arange(index.numel(), device=index.device), drop)]
        elif index.numel() < count:  # append the largest unkept units, ascending
            scores = net.unit_scores(path)
            order = torch.sort(scores, descending=True, stable=True).indices.to(index.device)
            extra = order[~torch.isin(order, index)][: count - index.numel()]
            index = torch.cat([index, torch.sort(extra).values])
        if index.numel() != kept[path].numel():
            resized.add(path)
        out[path] = index
    for path, mask in kept.items():
        group = net.groups[path]
        if group.kind == "attention":
            out[path] = mask
        elif group.kind == "weights" and not (_layer_groups(net, group) & resized):
            try:  # still the layer's shape and the frozen density's count (the spec may have been edited)?
                net.check_weights_mask(group, mask.to(torch.bool), float(value_of(arch, group)), out)
            except ValueError:
                continue  # the supernet picks the largest weights for the new density
            out[path] = mask
    return out


def _layer_groups(net: Supernet, group: UnitGroup) -> set[str]:
    """The structured groups that own rows or columns of a weights group's layer."""
    assert group.block is not None
    i = group.block
    return {
        embed_path(net.geometry, net.geometry.blocks[i].stage),
        f"blocks.{i}.heads",
        f"blocks.{i}.head_dim",
        f"blocks.{i}.ffn",
    }


def fold(
    net: Supernet, arch: FrozenArch, kept: Mapping[str, Tensor] | None = None, **timm_kwargs: Any
) -> nn.Module:
    """The compact network of ``arch`` carrying ``net``'s weights (``net``'s masks are reset afterwards).

    Equals ``net`` under :meth:`Supernet.set_arch` ``(arch, kept)`` in eval mode. ``kept``: kept units by group path
    (default: what :meth:`Supernet.kept_for` picks), resized to ``arch`` by :func:`adjust_kept`. ``timm_kwargs``:
    see :func:`~spvit_dsl.compact.create_compact`.
    """
    geometry = net.geometry
    check_buildable(geometry, arch)
    device = next(net.model.parameters()).device
    try:
        full = net.set_arch(arch, adjust_kept(net, arch, kept or {}))
    except ValueError as e:
        raise UsageError(str(e)) from None
    model = create_compact(geometry, arch, device=device, **timm_kwargs)
    try:
        state = compact_state(net, arch, full)
        model.load_state_dict(state, strict=True)
    finally:
        net.reset()
    model.train(net.training)
    return model


# --- weights sources -----------------------------------------------------------------------------------------


def _search_format(path: str) -> str | None:
    """The format of a search checkpoint or saved supernet at ``path`` (None for anything else)."""
    if not os.path.isfile(path) or checkpoint_kind(path) != "safetensors":
        return None
    fmt = safetensors_metadata(path).get("spvit_dsl.format")
    return fmt if fmt in (SEARCH_FORMAT, SUPERNET_FORMAT) else None


def _load_search(
    path: str, frozen: Program | None, device: torch.device | str | None
) -> tuple[Supernet, dict[str, Tensor]]:
    """The supernet of a search checkpoint (``search.ckpt``) or a saved supernet, and the kept units it stores."""
    from safetensors import safe_open  # noqa: PLC0415

    if not os.path.isfile(path):
        raise UsageError(f"search checkpoint not found: {path}")
    meta = safetensors_metadata(path)
    if meta.get("spvit_dsl.format") == SUPERNET_FORMAT:
        return load_supernet(path, device=device), {}
    state = json.loads(meta.get("spvit_dsl.state", "{}"))
    program = _search_program(path, meta, state, frozen)
    settings = state.get("settings", {})
    net = _lower(
        program,
        "none",
        device,
        alpha=float(settings.get("alpha", 0.0) or 0.0),
        seed=int(settings.get("seed", 0)),
    )
    restore_shrunk(net, state.get("shrunk", {}))
    tensors: dict[str, dict[str, Tensor]] = {"net/": {}, "kept/": {}}
    with safe_open(path, framework="pt", device=str(device or "cpu")) as f:
        for key in f.keys():
            for prefix, group in tensors.items():
                if key.startswith(prefix):
                    group[key[len(prefix) :]] = f.get_tensor(key)
    try:
        net.load_state_dict(tensors["net/"], strict=True)
    except RuntimeError as e:
        raise UsageError(
            f"{path} does not match the supernet of {program.path}: {' '.join(str(e).split())[:200]}"
        ) from None
    return net, tensors["kept/"]  # the dense backbone's unit indices (see Supernet.to_original)


def _search_program(
    path: str, meta: dict[str, str], state: dict[str, Any], frozen: Program | None
) -> Program:
    """The search spec a checkpoint was written for: embedded in it (every checkpoint since the spec text is stored),
    or else the frozen spec's ``source`` looked up near the frozen spec and the checkpoint (older checkpoints); only
    a file whose text hashes to the checkpoint's ``spec_hash`` counts."""
    if meta.get("spvit_dsl.spec"):
        return compile_text(meta["spvit_dsl.spec"], meta.get("spvit_dsl.spec_path") or f"{path}:spec")
    source = str((frozen.checked.frozen or {}).get("source", "")) if frozen is not None else ""
    if source and frozen is not None:
        ckpt_dir = os.path.dirname(os.path.abspath(path))
        for base in (".", os.path.dirname(frozen.path), ckpt_dir, os.path.dirname(ckpt_dir)):
            candidate = os.path.join(base, source)
            if os.path.isfile(candidate):
                with open(candidate, encoding="utf-8") as fh:
                    if state.get("spec_hash") in (None, spec_hash(fh.read())):
                        return compile_file(candidate)
    raise UsageError(
        f"{path} does not embed its search spec, and the frozen spec's source '{source or '?'}' "
        "(with the text the search used) was not found next to it; build from the folder the search ran in"
    )


def _lower(program: Program, weights: str, device: torch.device | str | None, **options: Any) -> Supernet:
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
    g = net.geometry
    if (g.model, g.img_size, g.num_classes, g.in_chans, g.blocks) != (
        geometry.model,
        geometry.img_size,
        geometry.num_classes,
        geometry.in_chans,
        geometry.blocks,
    ):
        raise UsageError(
            f"{path} was searched on another backbone ({g.model}, {g.img_size}px, {g.num_classes} classes) than "
            f"the frozen spec's ({geometry.model}, {geometry.img_size}px, {geometry.num_classes} classes)"
        )


def _search_kept(path: str, frozen: Program) -> dict[str, Tensor]:
    if not _search_format(path):
        raise UsageError(f"--masks: {path} is not a search checkpoint (search.ckpt or a saved supernet)")
    net, kept = _load_search(path, frozen, "cpu")
    _same_backbone(net, frozen.space.geometry, path)
    return kept


# --- the stage -----------------------------------------------------------------------------------------------


def build(
    frozen: str | Program,
    *,
    weights: str | None = None,
    masks: str | None = None,
    round_to: int | Literal["auto"] | None = None,
    device: torch.device | str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> nn.Module:
    """The compact network of a frozen spec.

    ``weights``: a search checkpoint or saved supernet (``.safetensors``), ``pretrained``, a dense checkpoint, or
    ``none`` (default: the spec's ``weights`` setting). ``masks``: a search checkpoint whose kept units are cut from
    dense ``weights``. ``round_to``: round FFN widths to multiples of N first, or ``"auto"``: to the widths this
    device runs fastest (:func:`latency_rounded`; ``progress`` sees its table being measured). ``timm_kwargs``: extra
    ``timm.create_model`` options that do not change shapes (e.g. ``drop_path_rate`` for fine-tuning; not saved).
    The returned model carries ``spvit_spec`` (frozen spec text of what was built), ``spvit_arch``,
    ``spvit_geometry`` and ``spvit_weights``. Mistakes (a missing file, another backbone) are :class:`UsageError`.
    """
    program = frozen_program(frozen)
    geometry = program.space.geometry
    original = arch_of(program.checked)
    if round_to == "auto":
        arch = latency_rounded(program, original, progress=progress)
    else:
        arch = original if round_to is None else round_widths(geometry, original, int(round_to))
    check_buildable(geometry, arch)
    weights = program.checked.weights if weights is None else weights
    model = _build_weights(program, arch, weights, masks, device, timm_kwargs or {})
    # nn.Module.__setattr__ takes any value; its stub only allows Tensor | Module
    model.spvit_spec = frozen_text(program, arch, round_to) if arch != original else program.source  # type: ignore[assignment]
    model.spvit_weights = weights if masks is None else f"{weights} (units kept by {masks})"  # type: ignore[assignment]
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
            raise UsageError("--masks needs dense weights to cut from (--weights pretrained or a checkpoint)")
        model = create_compact(geometry, arch, device=device, **timm_kwargs)
        sparsify_(model)
        return model
    if _search_format(weights):
        if masks is not None:
            raise UsageError(
                "--masks is for dense --weights; a search checkpoint already holds its kept units"
            )
        net, kept = _load_search(weights, program, device)
        _same_backbone(net, geometry, weights)
        net.eval()
        try:
            current = net.to_current(kept)
        except ValueError as e:
            raise UsageError(f"{weights}: {e}") from None
        return fold(net, arch, current, **timm_kwargs)
    kept = _search_kept(masks, program) if masks is not None else {}
    net = _lower(
        program, weights, device, alpha=float(program.checked.search.values.get("alpha", 0.0) or 0.0)
    )
    net.eval()
    return fold(net, arch, kept, **timm_kwargs)


def latency_setting_of(program: Program) -> LatencySetting:
    """Where ``--round auto`` measures: the frozen spec's latency budget setting, else this CPU at batch 8."""
    return program.latency or LatencySetting()


def latency_rounded(
    program: Program, arch: FrozenArch, *, progress: Callable[[int, int, str], None] | None = None
) -> FrozenArch:
    """``--round auto``: every FFN width moved, within ±(12.5% + 32), to the widths the device runs fastest for
    their FLOPs, keeping at least the original FLOPs where the spec's budgets allow (see
    :func:`spvit_dsl.space.latency.round_for_latency`). Measures (and caches) a latency table of those widths."""
    geometry = program.space.geometry
    setting = latency_setting_of(program)
    try:
        table, _, _ = table_for(rounding_space(program.space, arch), setting, progress=progress)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--round auto: {exc}") from None

    def price(a: FrozenArch) -> dict[str, float]:
        c = program.graph.cost(a, program.convention)
        return {"flops": float(c.macs), "params": float(c.params), "latency": table.arch_ms(geometry, a)}

    limits = {b.metric: b.absolute for b in program.with_latency(table).budgets}
    return round_for_latency(geometry, arch, table, price, limits)


def frozen_text(program: Program, arch: FrozenArch, round_to: int | str | None) -> str:
    """The frozen spec of ``arch`` (after rounding): the original header, ``ffn_round``, and the updated costs
    (which :func:`~spvit_dsl.compile.freeze.freeze` stamps)."""
    header: dict[str, Any] = {k: _header_value(v) for k, v in (program.checked.frozen or {}).items()}
    header.pop("date", None)  # freeze() stamps today's date
    if round_to is not None:
        header["ffn_round"] = round_to
    if round_to == "auto":
        header["ffn_round_on"] = latency_setting_of(program).describe()
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
        problem = input_problem(path)
        if problem:
            raise UsageError(problem)
        return build(path, weights=weights, device=device, timm_kwargs=timm_kwargs)
    if weights is not None:
        raise UsageError(f"{path} already holds its weights; 'weights' applies to a frozen .vit only")
    return load_file(path, device=device, timm_kwargs=timm_kwargs)
