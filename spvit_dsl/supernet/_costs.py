"""The cost table behind the supernet's differentiable cost (lowering stage; pure arithmetic on the cost model).

Input: the space and the supernet's block rows; output: F(gates) as ``constant + Σ increment · indicator`` for one
convention and metric, every number taken from :mod:`spvit_dsl.space.cost` (so the supernet's cost and the analytic cost
agree by construction). SPViT §2–3 (He et al., TPAMI 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..space import cost as cost_model
from ..space.plan import Space

if TYPE_CHECKING:
    from .net import BlockRow

__all__ = ["CostTable", "build_table"]


@dataclass
class CostTable:
    """F(gates) = constant + Σ increment · indicator, for one convention and metric, gates in row order."""

    constant: float
    increments: list[float] = field(default_factory=list)


def _value(c: object, metric: str) -> float:
    return float(c.macs if metric == "macs" else c.params)  # type: ignore[attr-defined]


def _op_costs(r: BlockRow, convention: str, metric: str) -> list[float]:
    b = r.plan.geom
    return [_value(cost_model.block_op_cost(b, op, convention), metric) for op in r.plan.attention]  # type: ignore[arg-type]


def _ffn_cost(r: BlockRow, width: float, convention: str, metric: str) -> float:
    return _value(cost_model.block_ffn_cost(r.plan.geom, width, convention), metric)  # type: ignore[arg-type]


def build_table(space: Space, rows: list[BlockRow], convention: str, metric: str) -> CostTable:
    """Constant part and per-gate increments of F(gates): op gates by block, then FFN gates by block."""
    geometry = space.geometry
    dense = cost_model.dense_arch(geometry)
    constant = _value(cost_model.arch_cost(geometry, dense, convention), metric)  # type: ignore[arg-type]
    op_incr: list[float] = []
    ffn_incr: list[float] = []
    for r in rows:
        constant -= _value(cost_model.block_op_cost(r.plan.geom, "msa", convention), metric)  # type: ignore[arg-type]
        constant -= _ffn_cost(r, r.hidden, convention, metric)
        ops = _op_costs(r, convention, metric)
        constant += ops[0]
        if r.op_gate is not None:
            op_incr += [ops[j + 1] - ops[j] for j in range(len(ops) - 1)]
        base, incr = _ffn_terms(r, convention, metric)
        constant += base
        ffn_incr += incr
    return CostTable(constant, op_incr + ffn_incr)


def _ffn_terms(r: BlockRow, convention: str, metric: str) -> tuple[float, list[float]]:
    g = r.ffn_gate
    if g is None:
        keep = r.mlp.fixed_keep()
        width = r.hidden if keep is None else int(keep.sum())
        return _ffn_cost(r, width, convention, metric), []
    zero = _ffn_cost(r, 0, convention, metric)
    if g.nested:
        widths = g.choice.widths or ()
        costs = [_ffn_cost(r, w, convention, metric) for w in widths]
        return costs[0], [costs[k] - costs[k - 1] for k in range(1, len(costs))]
    return zero, [_ffn_cost(r, n, convention, metric) - zero for n in g.group_sizes()]
