"""Stage — freeze: a point of the space (:class:`FrozenArch`) → a frozen :class:`Spec` (AST).

The frozen spec is the same language with every choice fixed: the merged backbone (no ``extends``), one
declaration per block, the budget it was searched for, and a ``frozen { ... }`` provenance header (source spec,
strategy, budget, achieved cost in both conventions, seed, date, epochs) that tools read back with
:func:`provenance`. It compiles like any spec, with zero decisions. Pure Python.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

from ..lang import ast
from ..lang.parse import number as _num
from ..space import cost
from ..space.latency import LatencySetting
from ..space.plan import LAYERS, BlockArch, BlockPlan, Density, DensityChoice, FrozenArch, Geometry
from ..space.units import quantity
from .check import Checked


def _value(v: Any) -> ast.Value:
    if isinstance(v, bool):
        return ast.Name(value="true" if v else "false")
    if isinstance(v, int):
        return _num(str(v))
    if isinstance(v, float):
        return _num(repr(v))
    if isinstance(v, ast.Num | ast.Str | ast.Name | ast.TupleV):
        return v
    return ast.Str(value=str(v))


def _setting(key: str, value: Any) -> ast.Setting:
    return ast.Setting(key=key, value=_value(value))


def _numset(x: float | int) -> ast.NumSet:
    return ast.NumSet(form="one", items=(_num(f"{x:.12g}" if isinstance(x, float) else str(x)),))


def _sparsity(density: Density) -> ast.ChoiceValue:
    """``sparsity: s`` when every layer has the same density, else ``{layer: s, ...}`` for the sparse layers.

    Twelve significant digits: a density is ``kept / weights`` of its layer, and the frozen text must give back the
    exact kept count (``round(density · weights)``) for any layer below 10^10 weights.
    """
    values = {layer: float(f"{1.0 - density.of(layer):.12g}") for layer in LAYERS}
    if len(set(values.values())) == 1:
        return _numset(values["qkv"])
    entries = tuple(
        ast.LayerValues(layer=ast.Name(value=layer), values=_numset(s))
        for layer, s in values.items()
        if s != 0
    )
    return ast.LayerMap(entries=entries)


def _block_scope(geo: Geometry, plan: BlockPlan, a: BlockArch) -> ast.Scope:
    """One row of the frozen spec. Heads, per-head width and sparsity are stated when the space could change them
    or the point differs from the dense block, so a frozen spec states every dimension its space searched."""
    b = plan.geom
    if geo.family == "swin":
        sel = ast.Selector(form="stage_block", stage=b.stage, start=b.index_in_stage)
    else:
        sel = ast.Selector(form="block", start=b.index)
    choices = [
        ast.Choice(field="attention", value=ast.Words(words=(ast.Name(value=a.op),))),
        ast.Choice(field="ffn", value=ast.FfnSpec(form="width", number=_num(str(a.ffn)))),
    ]
    if a.heads != b.heads or plan.heads != (b.heads,):
        choices.append(ast.Choice(field="heads", value=_numset(a.heads)))
    if a.head_dim != b.head_dim or plan.head_dim != (b.head_dim,):
        choices.append(ast.Choice(field="head_dim", value=_numset(a.head_dim)))
    if not a.density.dense or plan.density != DensityChoice():
        choices.append(ast.Choice(field="sparsity", value=_sparsity(a.density)))
    return ast.Scope(selector=sel, choices=tuple(choices))


def _embed_items(checked: Checked, arch: FrozenArch) -> list[Any]:
    """A ViT's ``embed: W``; a Swin's ``stage S { embed: W }`` for every stage (when searched or changed)."""
    space, geo = checked.space, checked.space.geometry
    if space.embed == tuple((w,) for w in geo.dims) and arch.embed == geo.dims:
        return []
    if geo.family != "swin":
        return [ast.Embed(value=_numset(arch.embed[0]))]
    return [
        ast.Scope(
            selector=ast.Selector(form="stage", stage=s),
            choices=(ast.Choice(field="embed", value=_numset(width)),),
        )
        for s, width in enumerate(arch.embed)
    ]


def _backbone(checked: Checked) -> ast.Backbone:
    settings = []
    for s in checked.backbone_settings:
        if s.key == "weights" and isinstance(s.value, ast.Str) and not os.path.isabs(s.value.value):
            s = _setting(
                "weights", os.path.abspath(checked.weights)
            )  # still valid wherever the frozen spec lands
        settings.append(s.model_copy(update={"comments": (), "trailing": None}))
    return ast.Backbone(model=checked.model, settings=tuple(settings))


def _budget(checked: Checked, convention: str) -> ast.Budget | None:
    if not checked.budgets:
        return None
    cons = tuple(ast.Constraint(metric=b.limit.metric, limit=_num(b.limit.text)) for b in checked.budgets)
    settings = [_setting("convention", ast.Name(value=convention))]
    if any(b.limit.metric == "latency" for b in checked.budgets):
        where = (checked.latency or LatencySetting()).as_dict()
        settings += [_setting("device", ast.Name(value=where["device"]))]
        settings += [_setting(k, _num(str(where[k]))) for k in ("threads", "batch") if where[k] is not None]
        settings += [_setting("precision", ast.Name(value=where["precision"]))]
    return ast.Budget(constraints=cons, settings=tuple(settings))


def achieved(geometry: Geometry, arch: FrozenArch) -> dict[str, str]:
    """The header's cost of ``arch``: ``flops_paper``, ``flops_exact`` (multiply-adds) and ``params``, each with the
    unit prefix that reads best (``5.61988M``, ``4.6G``)."""
    paper, exact = cost.arch_cost(geometry, arch, "paper"), cost.arch_cost(geometry, arch, "exact")
    return {
        "flops_paper": quantity(paper.macs),
        "flops_exact": quantity(exact.macs),
        "params": quantity(paper.params),
    }


def freeze(
    checked: Checked,
    arch: FrozenArch,
    header: dict[str, Any],
    *,
    convention: str = "paper",
    budget: bool = True,
) -> ast.Spec:
    """The frozen spec of ``arch``; ``header`` fills the provenance block (values: str, int, float or '3.3G'),
    to which the achieved cost is always added (replacing stale figures a header may carry).
    ``budget=False`` leaves the space's budget out (e.g. for the dense reference network, which exceeds it)."""
    geo = checked.space.geometry
    fields = {"date": _dt.date.today().isoformat()} | header | achieved(geo, arch)
    settings = tuple(
        _setting(k, _num(v) if isinstance(v, str) and _is_quantity(v) else v) for k, v in fields.items()
    )
    items: list[Any] = [
        ast.Frozen(settings=settings, comments=("frozen by spvit-dsl: every choice is fixed",)),
        _backbone(checked),
    ]
    items += _embed_items(checked, arch)
    items += [_block_scope(geo, p, a) for p, a in zip(checked.space.plans, arch.blocks, strict=True)]
    budget_item = _budget(checked, convention) if budget else None
    if budget_item is not None:
        items.append(budget_item)
    return ast.Spec(path=checked.spec.path, items=tuple(items))


def _is_quantity(v: str) -> bool:
    try:
        return _num(v).unit in ("T", "G", "M", "K", "%")
    except ValueError:
        return False


def arch_of(checked: Checked) -> FrozenArch:
    """The point of a frozen spec (every choice fixed); for a space with choices left, its largest point."""
    return checked.space.largest()


def provenance(spec: ast.Spec) -> dict[str, str]:
    """The frozen header as strings (``{}`` when the spec has none)."""
    header = spec.first("frozen")
    if header is None:
        return {}
    out = {}
    for s in header.settings:
        v = s.value
        out[s.key] = v.text if isinstance(v, ast.Num) else str(getattr(v, "value", ""))
    return out
