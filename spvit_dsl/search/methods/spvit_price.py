"""SPViT's budget controller (search stage, torch): one price that sets every gate's threshold, solved each step.

Input: the gate logits θ of :class:`~.spvit_gates.SpvitGates`, what each gate costs (per budget metric, from the
analytic cost model) and a target ratio ``cost / budget``. Output: the price τ and every gate's ``shift`` so that
the network the gates derive (``θ − shift > 0``) is the most expensive one at or under the target.

Ours, not SPViT's (the paper adds ``λ·(T − F)²`` with a hand-tuned λ). A gradient-driven budget term can only move
the gates at the optimizer's speed: with AdamW at ``gate_lr`` 2e-2 a logit travels at most ~0.02 per step, so a
one-epoch search of a few dozen steps cannot bring gates from their initial 1.5 below 0 and the budget was met by
the final projection alone, which cut whole blocks the training never saw removed. Here the gates keep learning
from the task loss only (what they are worth), and the budget acts directly on the decision rule:

* gate i is on when ``θ_i + δ_i > τ`` (``δ_i``: a static tie-break below 1e-3 that orders equal logits by weight
  magnitude, FFN neurons, and by level, op gates, so the cut can fall between them). Cumulative gates (op levels,
  nested widths) are on only when every gate before them is: their kill price is the running minimum.
* Gate costs add up in SPViT's space (an FFN neuron costs the same whatever the block's op; an op level's cost does
  not depend on the FFN width), so the cost at price τ is ``full − Σ_{i: κ_i ≤ τ} c_i`` with ``κ_i`` the kill
  price: sorting the kill prices once gives the exact smallest τ that meets the target (no bisection).
* The target follows a schedule: from the dense network's ratio down to 1 (linear in cost) over the first
  ``budget_reach`` of the gate-training steps, then 1. The weights adapt while the network shrinks, and the
  derived network sits at the budget for the rest of the search, so the final projection only rounds.

A price below the smallest logit keeps every gate on (the budget is not binding); gates with negative logits are
turned back on when the budget allows it (unused budget is lost accuracy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial

import torch
from torch import Tensor

from ...space.plan import FrozenArch, reads_image
from ...supernet import Supernet
from ..budget import Target
from .spvit_gates import FfnGate, OpGate, SpvitGates

__all__ = [
    "FfnCurve",
    "GateCosts",
    "PriceSolution",
    "apply_price",
    "gate_costs",
    "reach_target",
    "solve_price",
]

TIE = 1e-3  # the span of the static tie-break, far below the logits' learned differences


@dataclass(frozen=True)
class FfnCurve:
    """Per-neuron FFN gates ``[start, stop)`` of one block whose cost is not linear in the kept width (a latency
    budget prices widths from a measured table): ``at(w)`` gives the network's ratios with this block at width
    ``w`` (every other gate on), ``sizes`` the neurons of each gate. A block's gates are removed in ascending kill
    price, so :func:`solve_price` charges the n-th one removed the n-th step down the curve: exact at any price."""

    start: int
    stop: int
    sizes: tuple[int, ...]
    at: Callable[[int], list[float]]


@dataclass(frozen=True)
class GateCosts:
    """Per gate (in :meth:`SpvitGates.ordered` order): ``cost[i, k]`` what turning gate i off saves on budget k,
    as a fraction of that budget; ``full[k]`` the ratio of the network with every gate on; ``chains`` the (start,
    stop) slices of cumulative gates; ``tie[i]`` the static tie-break ``δ_i`` (0 ≤ δ < TIE)."""

    cost: Tensor  # (gates, budgets) float64
    full: Tensor  # (budgets,) float64
    chains: tuple[tuple[int, int], ...]
    tie: Tensor  # (gates,) float64
    curves: tuple[
        FfnCurve, ...
    ] = ()  # non-linear FFN costs (latency budgets); empty for FLOPs and parameters
    # op chains whose every gate on is msa, of which one must stay whole: a ViT that pools its class token reads
    # the image only through attention (``reads_image``); empty when nothing requires it
    attend: tuple[tuple[int, int], ...] = ()

    @cached_property
    def rows(self) -> list[list[float]]:
        """:attr:`cost` as Python lists (the fill walks thousands of gates every step)."""
        return self.cost.tolist()


@dataclass(frozen=True)
class PriceSolution:
    """The solved price, the kept gates' predicted ratios (per budget), and — when the fill after a coarse cut kept
    gates below the price on, or an msa chain was kept whole (``GateCosts.attend``) — every gate's decision."""

    price: float
    ratios: tuple[float, ...]
    # (gates,) bool: the decisions, when the fill or the kept msa chain may differ from ``θ + δ > τ``
    on: Tensor | None = None


def gate_costs(
    gates: SpvitGates,
    net: Supernet,
    targets: Sequence[Target],
    price: Callable[[FrozenArch], Mapping[str, float]],
) -> GateCosts:
    """What every gate costs, as fractions of the budgets; ``price`` maps a network to its analytic costs (metric →
    absolute, e.g. :meth:`SearchContext.price`).

    Op gate j of a block saves ``cost(level j + 1) − cost(level j)``; an FFN gate saves its neurons times the
    block's cost per hidden neuron. A saving may be negative (on few tokens a 5×5 convolution costs more than
    attention): the solver scans every cut exactly, it does not assume the cost falls with the price.
    """
    ordered = gates.ordered()
    full_levels = {g.decision: g.num_gates for g in ordered if isinstance(g, OpGate)}
    full_widths = {g.decision: g.hidden for g in ordered if isinstance(g, FfnGate)}

    def ratios(levels: dict[str, int], widths: dict[str, int]) -> list[float]:
        cost = price(SpvitGates.arch_at(net, levels, widths))
        return [cost[t.metric] / t.limit for t in targets]

    full = ratios(full_levels, full_widths)
    rows: list[list[float]] = []
    ties: list[float] = []
    chains: list[tuple[int, int]] = []
    curves: list[FfnCurve] = []
    attend: list[tuple[int, int]] = []
    nonlinear = any(t.metric == "latency" for t in targets)
    for g in ordered:
        start = len(rows)
        if isinstance(g, OpGate):
            costs = [ratios({**full_levels, g.decision: j}, full_widths) for j in range(g.num_gates + 1)]
            rows += [
                [hi - lo for lo, hi in zip(costs[j], costs[j + 1], strict=True)] for j in range(g.num_gates)
            ]
            ties += _level_ties(g.num_gates)
            chains.append((start, len(rows)))
            if g.candidates[-1] == "msa":
                attend.append((start, len(rows)))
            continue
        sizes = list(g.group_sizes())
        if nonlinear:  # a latency table: FFN time is not linear in the width
            at = _memo(partial(_at_width, ratios, full_levels, full_widths, g.decision))
            if g.nested:  # cumulative: gate j holds the widths from W_j − n_j to W_j, priced exactly
                tops = [sum(sizes[: j + 1]) for j in range(len(sizes))]
                rows += [
                    [a - b for a, b in zip(at(w), at(w - n), strict=True)]
                    for w, n in zip(tops, sizes, strict=True)
                ]
            else:  # per neuron: priced by rank along the block's curve when solving (FfnCurve); rows: the mean slope
                per = [(a - b) / g.hidden for a, b in zip(at(g.hidden), at(0), strict=True)]
                rows += [[n * c for c in per] for n in sizes]
                curves.append(FfnCurve(start, len(rows), tuple(sizes), at))
        else:  # FLOPs and parameters are linear in the width: the secant from width 0 is exact
            none = ratios(full_levels, {**full_widths, g.decision: 0})
            per = [(a - b) / g.hidden for a, b in zip(full, none, strict=True)]
            rows += [[n * c for c in per] for n in sizes]
        if g.nested:
            ties += _level_ties(g.num_gates)
            chains.append((start, len(rows)))
        else:
            ties += _importance_ties(g, net)
    cost = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(targets))
    n = len(ties)
    tie = torch.tensor(ties, dtype=torch.float64) + torch.arange(n, dtype=torch.float64) * (
        TIE / max(1, n) * 1e-3
    )
    # nothing to keep when the network reads the image with every gated op at its lowest level (it reads its
    # patches, or a block always attends)
    if reads_image(net.space.geometry, SpvitGates.arch_at(net, dict.fromkeys(full_levels, 0), full_widths)):
        attend = []
    return GateCosts(
        cost, torch.tensor(full, dtype=torch.float64), tuple(chains), tie, tuple(curves), tuple(attend)
    )


def _at_width(
    ratios: Callable[[dict[str, int], dict[str, int]], list[float]],
    levels: dict[str, int],
    widths: dict[str, int],
    decision: str,
    width: int,
) -> list[float]:
    """The network's ratios with one FFN (``decision``) at ``width`` and every other gate as given."""
    return ratios(levels, {**widths, decision: width})


def _memo(f: Callable[[int], list[float]]) -> Callable[[int], list[float]]:
    seen: dict[int, list[float]] = {}

    def at(w: int) -> list[float]:
        if w not in seen:
            seen[w] = f(w)
        return seen[w]

    return at


def _step(curve: FfnCurve, low: int, high: int) -> list[float]:
    """What a block's FFN costs between widths ``low`` and ``high`` (per budget ratio)."""
    return [a - b for a, b in zip(curve.at(high), curve.at(low), strict=True)]


def _level_ties(n: int) -> list[float]:
    """Cumulative gates (op levels, nested widths): at equal logits the outer level is cut first."""
    return [TIE * (1 - (j + 1) / (n + 1)) for j in range(n)]


def _importance_ties(gate: FfnGate, net: Supernet) -> list[float]:
    """Granular FFN gates: equal logits are cut in ascending order of ``‖fc1 row‖·‖fc2 column‖`` (summed over a
    gate's neurons), so a search from trained weights starts with the weakest neurons."""
    block = int(gate.decision.split(".")[1])
    importance = net.rows[block].mlp.importance().double().cpu()
    per_gate = torch.zeros(gate.num_gates, dtype=torch.float64).index_add_(0, gate.group_of.cpu(), importance)
    ranks = torch.empty(gate.num_gates, dtype=torch.float64)
    ranks[torch.argsort(per_gate, stable=True)] = torch.arange(gate.num_gates, dtype=torch.float64)
    return (TIE * ranks / max(1, gate.num_gates)).tolist()


def solve_price(logits: Tensor, costs: GateCosts, target: float) -> PriceSolution:
    """The smallest price whose kept gates meet ``target`` (a ratio, e.g. 1.0 = at the budget) on every budget.

    ``logits``: (gates,) in :meth:`SpvitGates.ordered` order. Gate i's kill price is ``κ_i = θ_i + δ_i``, made a
    running minimum along each chain; removing gates in ascending κ, the cost after each removal is exact (costs
    add up), the first cut that meets the target is taken, and the price is set halfway between the last removed
    and the first kept kill price. A coarse last cut (an op level) can leave
    the network well under the target: the removed gates are then offered back, most valuable first, while they
    fit every budget (and, in a chain, their predecessor is on); the decisions are then returned in ``on``. When even
    removing every gate misses the target, every gate is off and the final projection takes over.

    With ``costs.attend``, the msa chain the gates value most (:func:`_pin_attend`) is never cut: a ViT pooling its
    class token that lost its last msa block would train, from then on, a network that gives every image the same
    logits (the projection's ``raised_msa`` constraint, held during the search; ours). A target that only that cut
    would meet is missed, as the projection, which keeps the last msa block too, would miss it. The decisions are
    then returned in ``on``; the price stays between real kill prices.
    """
    kill = logits.detach().double().cpu() + costs.tie
    for start, stop in costs.chains:
        kill[start:stop] = torch.cummin(kill[start:stop], 0).values
    real = kill.clone()  # the pin below moves its chain to the end of the order; prices come from these
    pin = _pin_attend(kill, costs)
    order = torch.argsort(kill, stable=True)
    sorted_kill = kill[order]
    n = kill.numel()
    if n == 0:
        return PriceSolution(0.0, tuple(costs.full.tolist()))
    steps = costs.cost[order]
    curve_of = {i: k for k, c in enumerate(costs.curves) for i in range(c.start, c.stop)}
    if (
        curve_of
    ):  # a block's per-neuron gates go in ascending kill price: the n-th removed costs the n-th step down
        steps = steps.clone()
        widths = [sum(c.sizes) for c in costs.curves]
        for k, i in enumerate(order.tolist()):
            if i in curve_of:
                c = costs.curves[curve_of[i]]
                before = widths[curve_of[i]]
                widths[curve_of[i]] -= c.sizes[i - c.start]
                steps[k] = torch.tensor(_step(c, widths[curve_of[i]], before), dtype=torch.float64)
    remaining = costs.full.unsqueeze(0) - torch.cumsum(steps, 0)  # (gates, budgets): after m + 1 removed
    ratios = torch.cat([costs.full.unsqueeze(0), remaining])  # row m: m gates removed
    boundary = torch.ones(n + 1, dtype=torch.bool)  # cuts that do not split exact ties
    boundary[1:n] = sorted_kill[1:] != sorted_kill[:-1]
    fits = ((ratios.max(1).values <= target + 1e-12) & boundary).nonzero()
    cap = n if pin is None else n - (pin[1] - pin[0])  # the kept msa chain is last in the order and never cut
    met = bool(fits.numel()) and int(fits[0]) <= cap
    m = int(fits[0]) if met else cap
    sorted_real = real[order]
    low = float(sorted_real[m - 1]) if m > 0 else float(sorted_real[0]) - 1.0
    high = float(sorted_real[m]) if m < cap else low + 1.0
    now = ratios[m].clone()
    on = torch.ones(n, dtype=torch.bool)
    on[order[:m]] = False
    filled = False  # did the fill turn any gate back on
    if met:  # the target was met: fill what the last coarse cut left unused
        first = {i: start for start, stop in costs.chains for i in range(start, stop)}
        # most valuable first; within a chain, earlier levels first. Passes repeat while they add something: a
        # level that saves a negative cost (attention cheaper than a 5×5 convolution) frees room for earlier ones
        # (plain Python lists: thousands of per-neuron gates, every step)
        kills = kill.tolist()
        removed = sorted(order[:m].tolist(), key=lambda j: (-kills[j], j))
        rows, flags, slack = costs.rows, on.tolist(), [target + 1e-12 - x for x in now.tolist()]
        kept = [sum(n for j, n in enumerate(c.sizes) if flags[c.start + j]) for c in costs.curves]
        added = True
        while added:
            added = False
            for i in removed:
                if flags[i] or (i in first and i > first[i] and not flags[i - 1]):
                    continue
                block = curve_of.get(i)
                grow = 0
                if block is None:
                    row = rows[i]
                else:  # back on: the block's width grows by the gate's neurons
                    curve = costs.curves[block]
                    grow = curve.sizes[i - curve.start]
                    row = _step(curve, kept[block], kept[block] + grow)
                if all(c <= s for c, s in zip(row, slack, strict=True)):
                    slack = [s - c for c, s in zip(row, slack, strict=True)]
                    flags[i] = added = filled = True
                    if block is not None:
                        kept[block] += grow
        if filled:
            on = torch.tensor(flags, dtype=torch.bool)
            now = target + 1e-12 - torch.tensor(slack, dtype=torch.float64)
    return PriceSolution(0.5 * (low + high), tuple(now.tolist()), on if filled or pin is not None else None)


def _pin_attend(kill: Tensor, costs: GateCosts) -> tuple[int, int] | None:
    """Move the ``costs.attend`` chain the gates value most — the highest kill price of its msa level, its last gate
    (a running minimum: the chain's smallest) — to the end of the removal order, in place: its kill prices become
    ``max + 1 + δ`` (the level tie-breaks keep its own order). Returns that chain's ``(start, stop)``, or None when
    nothing is to be kept (no attend chains: the network reads its patches, or a block always attends)."""
    if not costs.attend or not kill.numel():
        return None
    start, stop = max(costs.attend, key=lambda c: float(kill[c[1] - 1]))
    kill[start:stop] = float(kill.max()) + 1.0 + costs.tie[start:stop]
    return start, stop


def reach_target(start: float, progress: float, reach: float) -> float:
    """The scheduled ratio after ``progress`` (0..1) of the gate-training steps: linear from ``start`` (the dense
    network's ratio) to 1 at ``progress = reach``, then 1. Never above ``start``; 1 when the budget is not binding."""
    if start <= 1.0:
        return 1.0
    f = min(1.0, max(0.0, progress / reach)) if reach > 0 else 1.0
    return start + (1.0 - start) * f


def apply_price(gates: Sequence[OpGate | FfnGate], solution: PriceSolution, costs: GateCosts) -> None:
    """Set every gate's ``shift`` so that its decision (``θ − shift > 0``) is the solution's: ``τ − δ_i`` where the
    price decides it, ``θ_i ∓ 1e-3`` (just on, just off) where the fill decided otherwise (a gate offered back; a
    later gate of its chain that stays off)."""
    logits = torch.cat([g.logits.detach().double().cpu() for g in gates])
    shifts = solution.price - costs.tie
    if solution.on is not None:
        natural = (logits + costs.tie > solution.price) == solution.on
        forced = torch.where(solution.on, logits - 1e-3, logits + 1e-3)
        shifts = torch.where(natural, shifts, forced)
    offset = 0
    for g in gates:
        n = g.num_gates
        g.shift.copy_(shifts[offset : offset + n].to(g.shift.device))
        offset += n
