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
from ..space.plan import BlockArch, FrozenArch, Geometry
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
    return ast.NumSet(form="one", items=(_num(f"{x:g}" if isinstance(x, float) else str(x)),))


def _block_scope(geo: Geometry, i: int, a: BlockArch) -> ast.Scope:
    b = geo.blocks[i]
    if geo.family == "swin":
        sel = ast.Selector(form="stage_block", stage=b.stage, start=b.index_in_stage)
    else:
        sel = ast.Selector(form="block", start=i)
    choices = [
        ast.Choice(field="attention", value=ast.Words(words=(ast.Name(value=a.op),))),
        ast.Choice(field="ffn", value=ast.FfnSpec(form="width", number=_num(str(a.ffn)))),
    ]
    if a.heads != b.heads:
        choices.append(ast.Choice(field="heads", value=_numset(a.heads)))
    if a.head_dim != b.head_dim:
        choices.append(ast.Choice(field="head_dim", value=_numset(a.head_dim)))
    if a.density != 1.0:
        choices.append(ast.Choice(field="sparsity", value=_numset(round(1.0 - a.density, 6))))
    return ast.Scope(selector=sel, choices=tuple(choices))


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
    return ast.Budget(constraints=cons, settings=(_setting("convention", ast.Name(value=convention)),))


def achieved(geometry: Geometry, arch: FrozenArch) -> dict[str, str]:
    """The header's cost of ``arch``: ``flops_paper``, ``flops_exact`` (G multiply-adds) and ``params`` (M)."""
    paper, exact = cost.arch_cost(geometry, arch, "paper"), cost.arch_cost(geometry, arch, "exact")
    return {
        "flops_paper": f"{paper.macs / 1e9:.6g}G",
        "flops_exact": f"{exact.macs / 1e9:.6g}G",
        "params": f"{paper.params / 1e6:.6g}M",
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
    if len(checked.space.embed) > 1 or arch.embed != geo.embed_dim:
        items.append(ast.Embed(value=_numset(arch.embed)))
    items += [_block_scope(geo, i, a) for i, a in enumerate(arch.blocks)]
    budget_item = _budget(checked, convention) if budget else None
    if budget_item is not None:
        items.append(budget_item)
    return ast.Spec(path=checked.spec.path, items=tuple(items))


def _is_quantity(v: str) -> bool:
    try:
        return _num(v).unit in ("G", "M", "K", "%")
    except ValueError:
        return False


def arch_of(checked: Checked) -> FrozenArch:
    """The single point of a space with no decisions left (a frozen spec)."""
    plans = checked.space.plans
    blocks = tuple(
        BlockArch(
            p.attention[0],
            p.ffn.candidates(p.geom.hidden)[-1]
            if len(p.ffn.candidates(p.geom.hidden)) == 1
            else p.ffn.candidates(p.geom.hidden)[0],
            p.heads[0],
            p.head_dim[0],
            p.density[0],
        )
        for p in plans
    )
    return FrozenArch(blocks, checked.space.embed[0])


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
