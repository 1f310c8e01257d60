"""Search stage — budgets: the Lagrange multiplier that steers the gates, and the repair that makes the budget hold.

Input: the program's resolved budgets and the supernet's unit table (one entry per gate: logit, MACs and parameters
it saves, whether it is kept). Output: multiplier updates during training, and after training the kept/dropped state
of every unit such that the derived network meets every budget and sits within 1% of the binding one.

SPViT (He et al., TPAMI 2024, §3) adds ``λ·(T − F)²`` with a hand-tuned λ and misses its targets. Here the budget is
a constraint ``F_k(gates) ≤ T_k`` per budget k:

1. **Dual ascent** (augmented Lagrangian, :class:`DualAscent`) — the loss adds ``Σ_k λ_k (r_k − 1) + ρ/2 (r_k − 1)²``
   with ``r_k = F_k / T_k`` (F_k: the differentiable expected cost, equal in value to the derived network's cost);
   after every step ``λ_k ← λ_k + dual_lr · (r_k − 1)``. While the derived network is over budget the multiplier
   grows until the cost gradient outweighs the task gradient on the gates; under budget it shrinks (and may turn
   negative, pulling gates back up), so no λ needs tuning.
2. **Repair** (:func:`repair`) — thresholding can land a little off. While over any budget, drop the kept unit with
   the least gate logit per unit of (normalised) cost saved; then, while more than 1% under the binding budget, add
   back the dropped unit with the most logit per unit cost that still fits every budget. Cumulative gates (ops,
   nested widths) only ever step down from their top level or up by one level, so the result stays derivable.

The cost model is linear in the units (``F = constant + Σ increment · kept``), so repair bookkeeps in closed form;
the caller re-checks the analytic cost of the result.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DualAscent", "RepairResult", "Target", "repair", "targets_of"]

METRIC_FIELD = {"flops": "macs", "params": "params"}


@dataclass(frozen=True)
class Target:
    """One budget: ``metric`` ("flops" = multiply-adds, or "params") at most ``limit`` (absolute)."""

    metric: str
    limit: float
    text: str = ""

    @property
    def field(self) -> str:
        return METRIC_FIELD[self.metric]


def targets_of(budgets: Iterable[Any]) -> list[Target]:
    """Targets from :class:`spvit_dsl.compile.program.Budget` objects (the tightest per metric)."""
    best: dict[str, Target] = {}
    for b in budgets:
        t = Target(b.metric, float(b.absolute), b.limit.text)
        if t.metric not in best or t.limit < best[t.metric].limit:
            best[t.metric] = t
    return [best[m] for m in sorted(best)]


@dataclass
class DualAscent:
    """One multiplier per target for the budget as a target ``F_k / T_k = 1`` (augmented Lagrangian).

    The loss term is ``Σ_k λ_k (r_k − 1) + ρ/2 (r_k − 1)²`` with ``r_k = F_k / T_k``, so the gates feel the effective
    multiplier ``λ_k + ρ (r_k − 1)``: the integral part ``λ_k ← clip(λ_k + lr · (r_k − 1), −bound, bound)`` removes
    the steady-state error, the proportional part ``ρ (r_k − 1)`` damps the overshoot a pure integrator would cause
    when many gates cross zero together, and the integral restarts from 0 whenever the cost crosses the budget
    (anti-windup: with Adam the gates move at a bounded speed, so an accumulated λ would keep pushing long after
    the crossing). A negative multiplier pulls gates back up when the network fell under the
    budget (unused budget is lost accuracy); repair guarantees the "at or under" part.
    """

    targets: list[Target]
    lr: float
    values: list[float] = field(default_factory=list)
    rho: float = 1.0
    bound: float = 100.0

    def __post_init__(self) -> None:
        if not self.values:
            self.values = [0.0] * len(self.targets)

    def update(self, ratios: Sequence[float]) -> None:
        out = []
        for lam, r in zip(self.values, ratios, strict=True):
            if lam * (r - 1.0) < 0:  # anti-windup: the constraint changed side, drop the accumulated push
                lam = 0.0
            out.append(min(self.bound, max(-self.bound, lam + self.lr * (r - 1.0))))
        self.values = out

    def effective(self, ratios: Sequence[float]) -> list[float]:
        """The multipliers the gates feel now: integral plus proportional part."""
        return [lam + self.rho * (r - 1.0) for lam, r in zip(self.values, ratios, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "lr": self.lr, "rho": self.rho}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [float(v) for v in state["values"]]


# --------------------------------------------------------------------------------------------- repair
@dataclass
class RepairResult:
    """The repaired state: ``on[(decision, index)]`` per unit, the resulting costs, and what changed."""

    on: dict[tuple[str, int], bool]
    cost: dict[str, float]  # metric → absolute cost after repair
    removed: int
    added: int

    def ratio(self, target: Target) -> float:
        return self.cost[target.metric] / target.limit


@dataclass
class _Unit:
    decision: str
    index: int
    logit: float
    save: dict[str, float]  # metric → cost it adds when kept
    nested: bool


class _State:
    """Units, their on flags and each cumulative decision's level, with the running cost."""

    def __init__(self, units: Sequence[Any], cost: dict[str, float], targets: list[Target]) -> None:
        self.targets = targets
        self.cost = dict(cost)
        self.units: dict[tuple[str, int], _Unit] = {}
        self.on: dict[tuple[str, int], bool] = {}
        self.levels: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        for u in units:
            save = {"flops": float(u.macs), "params": float(u.params)}
            self.units[(u.decision, u.index)] = _Unit(
                u.decision, u.index, float(u.logit), save, bool(u.nested)
            )
            self.on[(u.decision, u.index)] = bool(u.on)
            if u.nested:
                self.sizes[u.decision] = self.sizes.get(u.decision, 0) + 1
                self.levels[u.decision] = self.levels.get(u.decision, 0) + (1 if u.on else 0)

    def over(self) -> list[Target]:
        return [t for t in self.targets if self.cost[t.metric] > t.limit]

    def weight(self, u: _Unit, targets: Iterable[Target]) -> float:
        return sum(u.save[t.metric] / t.limit for t in targets)

    def flip(self, u: _Unit, on: bool) -> None:
        sign = 1.0 if on else -1.0
        for metric in self.cost:
            self.cost[metric] += sign * u.save[metric]
        self.on[(u.decision, u.index)] = on
        if u.nested:
            self.levels[u.decision] += 1 if on else -1

    def removable(self) -> Iterable[_Unit]:
        for key, u in self.units.items():
            if not u.nested and self.on[key]:
                yield u
        for d, level in self.levels.items():
            if level > 0:
                yield self.units[(d, level - 1)]

    def addable(self) -> Iterable[_Unit]:
        for key, u in self.units.items():
            if not u.nested and not self.on[key]:
                yield u
        for d, level in self.levels.items():
            if level < self.sizes[d]:
                yield self.units[(d, level)]

    def fits(self, u: _Unit) -> bool:
        return all(self.cost[t.metric] + u.save[t.metric] <= t.limit for t in self.targets)


def _remove_phase(s: _State, protect: frozenset[tuple[str, int]] = frozenset()) -> int:
    """Drop least-logit-per-cost units (never those in ``protect``) until every budget holds."""
    removed = 0
    while True:
        over = s.over()
        if not over:
            return removed
        heap = [
            (u.logit / w, u.decision, u.index)
            for u in s.removable()
            if (w := s.weight(u, over)) > 0 and (u.decision, u.index) not in protect
        ]
        heapq.heapify(heap)
        while heap and s.over() == over:
            _score, d, i = heapq.heappop(heap)
            u = s.units[(d, i)]
            if not s.on[(d, i)] or (u.nested and s.levels[d] != i + 1):
                continue
            s.flip(u, False)
            removed += 1
            if u.nested and s.levels[d] > 0:  # the next level down becomes removable
                below = s.units[(d, s.levels[d] - 1)]
                if (w := s.weight(below, over)) > 0 and (d, below.index) not in protect:
                    heapq.heappush(heap, (below.logit / w, d, below.index))
        if not heap and s.over() == over:
            names = ", ".join(f"{t.metric} <= {t.text or t.limit}" for t in over)
            raise ValueError(f"repair cannot meet {names}: no unit left that lowers the cost")


def _binding_ratio(s: _State) -> float:
    return max(s.cost[t.metric] / t.limit for t in s.targets)


def _add_phase(s: _State, tolerance: float) -> int:
    """Add back most-logit-per-cost units that fit until the binding budget is within ``tolerance``."""
    added = 0
    heap = []
    for u in s.addable():
        w = s.weight(u, s.targets)
        heap.append((-(u.logit / w) if w > 0 else -math.inf, u.decision, u.index))
    heapq.heapify(heap)
    while heap and _binding_ratio(s) < 1.0 - tolerance:
        _score, d, i = heapq.heappop(heap)
        u = s.units[(d, i)]
        if s.on[(d, i)] or (u.nested and s.levels[d] != i):
            continue
        if not s.fits(u):
            continue  # costs only grow from here: it will never fit
        s.flip(u, True)
        added += 1
        if u.nested and s.levels[d] < s.sizes[d]:  # the next level up becomes addable
            up = s.units[(d, s.levels[d])]
            w = s.weight(up, s.targets)
            heapq.heappush(heap, (-(up.logit / w) if w > 0 else -math.inf, d, up.index))
    return added


def _snapshot(s: _State) -> tuple[dict[tuple[str, int], bool], dict[str, int], dict[str, float]]:
    return dict(s.on), dict(s.levels), dict(s.cost)


def _swap_phase(s: _State, tolerance: float, tries: int = 64) -> tuple[int, int]:
    """When nothing small is left to add (e.g. every FFN neuron is still kept but a whole op level was dropped), add
    a valuable unit that does not fit and remove units finer than the tolerance to make room; keep the swap when the
    binding budget gets closer while every budget holds."""
    removed = added = 0
    while _binding_ratio(s) < 1.0 - tolerance:
        base = _binding_ratio(s)
        options = sorted(
            (u for u in s.addable() if not s.fits(u)),
            key=lambda u: -(u.logit / max(s.weight(u, s.targets), 1e-30)),
        )
        # make room only with units finer than the tolerance, so the result lands within it
        coarse = frozenset(
            k for k, v in s.units.items() if any(v.save[t.metric] > tolerance * t.limit for t in s.targets)
        )
        for u in options[:tries]:
            saved = _snapshot(s)
            s.flip(u, True)
            try:
                r = _remove_phase(s, coarse | {(u.decision, u.index)})
            except ValueError:
                r = -1
            a = _add_phase(s, tolerance) if r >= 0 else 0
            if r >= 0 and not s.over() and _binding_ratio(s) > base:
                removed, added = removed + r, added + 1 + a
                break
            s.on, s.levels, s.cost = saved
        else:
            return removed, added
    return removed, added


def repair(
    units: Sequence[Any],
    cost: dict[str, float],
    targets: list[Target],
    *,
    tolerance: float = 0.01,
    fill: bool = True,
) -> RepairResult:
    """Repair the kept units (``units``: :class:`spvit_dsl.supernet.Unit`-like objects; ``cost``: metric → the derived
    network's cost) so every target holds and, with ``fill``, the binding one is within ``tolerance``."""
    s = _State(units, {"flops": cost["flops"], "params": cost["params"]}, targets)
    removed = _remove_phase(s)
    added = _add_phase(s, tolerance) if fill else 0
    if fill:
        r, a = _swap_phase(s, tolerance)
        removed, added = removed + r, added + a
    return RepairResult(dict(s.on), dict(s.cost), removed, added)


def nested_levels(result: RepairResult) -> dict[str, int]:
    """Each cumulative decision's level in a repair result (count of leading kept units)."""
    by_decision: dict[str, list[tuple[int, bool]]] = {}
    for (d, i), on in result.on.items():
        by_decision.setdefault(d, []).append((i, on))
    levels = {}
    for d, items in by_decision.items():
        level = 0
        for _i, on in sorted(items):
            if not on:
                break
            level += 1
        levels[d] = level
    return levels
