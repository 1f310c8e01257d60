"""Stage — diff: two compiled specs → the per-block differences and the cost of each side.

Works for two frozen specs (op, FFN width, heads, per-head width, sparsity per block), for a space against a
frozen spec (is the frozen network a member of the space, and where not, which block breaks it), and for two
spaces (candidate sets). Output is deterministic; ``spvit-dsl diff`` exits 0 when identical, 1 when different,
2 on error, like ``diff``. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..space.plan import LAYERS, BlockPlan, Convention
from ..space.units import fmt_macs, fmt_params
from .freeze import arch_of
from .program import Program


@dataclass(frozen=True)
class Row:
    block: int | None  # None: backbone-level
    stage: int | None
    field: str
    a: str
    b: str
    note: str = ""  # e.g. "not in space"


@dataclass
class Diff:
    a: str
    b: str
    kind: str  # "frozen/frozen", "space/frozen", "frozen/space", "space/space"
    convention: Convention
    rows: list[Row]
    cost: dict[
        str, dict[str, float]
    ]  # side ("a"/"b") → {flops, params} (frozen) or {flops_min, flops_max, ...}
    member: bool | None = None  # space/frozen: is the frozen network in the space
    breaks: list[Row] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.rows

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "kind": self.kind,
            "convention": self.convention,
            "identical": self.identical,
            "member": self.member,
            "cost": self.cost,
            "changes": [r.__dict__ for r in self.rows],
            "breaks": [r.__dict__ for r in self.breaks],
        }


def _fields(p: BlockPlan) -> dict[str, tuple[Any, ...]]:
    return {
        "attention": p.attention,
        "ffn": p.ffn.candidates(p.geom.hidden),
        "heads": p.heads,
        "head_dim": p.head_dim,
        **{f"sparsity.{layer}": tuple(round(1 - d, 6) for d in p.density.of(layer)) for layer in LAYERS},
    }


def _within(name: str, point: Any, values: tuple[Any, ...]) -> bool:
    """Whether a frozen value belongs to a space's candidates. A sparsity declaration spans a range: strategies that
    prune single weights (dimap) pick any density inside it, so a sparsity is a member when within the range."""
    if name.startswith("sparsity.") and isinstance(point, float):
        return min(values) - 1e-9 <= point <= max(values) + 1e-9
    return point in values


def _show(values: tuple[Any, ...], plan: BlockPlan, name: str) -> str:
    if len(values) == 1:
        return str(values[0])
    if name == "ffn" and plan.ffn.granular:
        return (
            f"0..{plan.geom.hidden} per {plan.ffn.group}"
            if plan.ffn.group > 1
            else f"0..{plan.geom.hidden} per neuron"
        )
    if name.startswith("sparsity.") and len(values) > 3:  # a declared range: dimap may pick any value inside
        return f"{min(values):g}..{max(values):g}"
    return "{" + ", ".join(map(str, values)) + "}"


def _backbone_rows(a: Program, b: Program) -> list[Row]:
    ga, gb = a.space.geometry, b.space.geometry
    rows = []
    for name in (
        "model",
        "img_size",
        "patch_size",
        "in_chans",
        "num_classes",
        "embed_dim",
        "depths",
        "num_heads",
        "mlp_ratio",
        "window_size",
    ):
        va, vb = getattr(ga, name), getattr(gb, name)
        if va != vb:
            rows.append(Row(None, None, name, str(va), str(vb)))
    return rows


def _cost(p: Program, conv: Convention) -> dict[str, float]:
    if p.frozen:
        c = p.graph.cost(arch_of(p.checked), conv)
        return {"flops": c.macs / 1e9, "params": c.params / 1e6}
    bd = p.bounds(conv)
    return {
        "flops_min": bd.macs.min / 1e9,
        "flops_max": bd.macs.max / 1e9,
        "params_min": bd.params.min / 1e6,
        "params_max": bd.params.max / 1e6,
    }


def diff(a: Program, b: Program, *, convention: Convention | None = None) -> Diff:
    conv: Convention = convention or a.convention
    kind = f"{'frozen' if a.frozen else 'space'}/{'frozen' if b.frozen else 'space'}"
    geometry_rows = _backbone_rows(a, b)
    rows = list(geometry_rows)
    mixed = kind in ("space/frozen", "frozen/space")

    def compare(
        block: int | None, stage: int | None, name: str, va: tuple[Any, ...], vb: tuple[Any, ...], show: Any
    ) -> None:
        if va == vb:
            return
        note = ""
        if mixed:
            space_vals, point = (va, vb[0]) if kind == "space/frozen" else (vb, va[0])
            note = "" if _within(name, point, space_vals) else "not in space"
        rows.append(Row(block, stage, name, show(va), show(vb), note))

    for s, (ea, eb) in enumerate(zip(a.space.embed, b.space.embed, strict=False)):
        compare(
            None,
            s,
            "embed",
            ea,
            eb,
            lambda v: str(v[0]) if len(v) == 1 else "{" + ", ".join(map(str, v)) + "}",
        )
    for pa, pb in zip(a.space.plans, b.space.plans, strict=False):
        fa, fb = _fields(pa), _fields(pb)
        for name in fa:
            compare(
                pa.geom.index, pa.geom.stage, name, fa[name], fb[name], lambda v, n=name, p=pa: _show(v, p, n)
            )
    breaks = [r for r in rows if r.note]
    member = None
    if mixed:
        space, point = (a, b) if kind == "space/frozen" else (b, a)
        breaks += _over_budget(space, point, conv)
        member = not geometry_rows and not breaks
    return Diff(a.path, b.path, kind, conv, rows, {"a": _cost(a, conv), "b": _cost(b, conv)}, member, breaks)


def _over_budget(space: Program, point: Program, conv: Convention) -> list[Row]:
    """Budgets of the space that the frozen network exceeds (a member must also meet them). A latency budget is
    not checked here: it is priced by a device's measured table (``spvit-dsl latency``), not by the spec."""
    c = point.graph.cost(arch_of(point.checked), conv)
    rows = []
    for bud in space.budgets:
        if bud.metric == "latency":
            continue
        value = c.macs if bud.metric == "flops" else c.params
        if value > bud.absolute:
            scale, unit = (1e9, "G") if bud.metric == "flops" else (1e6, "M")
            rows.append(
                Row(None, None, "budget", bud.describe(), f"{value / scale:.4f}{unit}", "over budget")
            )
    return rows


def markdown(d: Diff) -> str:
    """A GitHub-flavoured Markdown report (deterministic)."""
    lines = [f"### `{d.a}` vs `{d.b}` ({d.kind}, {d.convention} convention)", ""]
    if d.identical:
        lines.append("identical")
    if d.breaks:
        lines += [
            f"- breaks membership: {r.field} {r.a} vs {r.b} ({r.note})" for r in d.breaks if r.block is None
        ]
    if not d.identical:
        lines += ["| block | stage | field | A | B | note |", "|---:|---:|---|---|---|---|"]
        for r in d.rows:
            lines.append(
                f"| {'' if r.block is None else r.block} | {'' if r.stage is None else r.stage} | {r.field} | "
                f"{r.a} | {r.b} | {r.note} |"
            )
    lines += ["", "| cost | A | B | delta |", "|---|---:|---:|---:|"]
    for metric, unit in (("flops", "G"), ("params", "M")):
        lines.append(
            f"| {metric} ({unit}) | {cost_cell(d.cost['a'], metric)} | {cost_cell(d.cost['b'], metric)} | "
            f"{delta_cell(d, metric)} |"
        )
    if d.member is not None:
        lines += ["", f"frozen network is {'a member' if d.member else 'NOT a member'} of the space"]
    return "\n".join(lines) + "\n"


def _fmt(metric: str, value: float) -> str:
    """One formatter for costs everywhere (``5.645 M``, ``4.608 G``): ``value`` in G (flops) or M (params)."""
    return fmt_macs(value * 1e9) if metric == "flops" else fmt_params(value * 1e6)


def cost_cell(c: dict[str, float], metric: str) -> str:
    if metric in c:
        return _fmt(metric, c[metric])
    return f"{_fmt(metric, c[metric + '_min'])} .. {_fmt(metric, c[metric + '_max'])}"


def delta_cell(d: Diff, metric: str) -> str:
    a, b = d.cost["a"].get(metric), d.cost["b"].get(metric)
    if a is None or b is None:
        return ""
    shown = ("+" if b >= a else "-") + _fmt(metric, abs(b - a))
    return f"{shown} ({(b - a) / a:+.1%})" if a else shown
