"""The ``magnitude`` and ``random`` strategies (search stage, torch): the data-free baselines of every comparison.

* ``magnitude`` — each unit's score is its L1 magnitude (the sum of |w| over the tensor slices it owns; one weight's
  |w| for sparsity; for an op step, the L1 of the weights the step stops using: :meth:`Supernet.unit_scores`).
  Scores are divided by the mean |w| per weight of their group kind (:meth:`Supernet.unit_weights`), so a unit
  counts as the weights it owns, scaled by how large they are for their kind: channels, heads, neurons, op steps
  and single weights compare on one scale; a group's step down loses the normalised scores of the units it drops
  (for sparsity: measured on the dense layer's magnitude distribution). :func:`~..budget.project` then cuts, from the largest network of the space,
  the least score per unit of cost until every budget holds (within 1% of the binding one). Kept units are the
  largest ones. A standard baseline of the structured-pruning literature, not a paper's method.
* ``random`` — the control every pruning result should be compared with: the projection picks uniformly among
  legal moves (a random group steps down one candidate until the budget holds, then random fitting steps up), and
  each group keeps a uniformly random subset of its units; seeded by ``seed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...space.groups import UnitGroup, value_of
from ...space.plan import FrozenArch
from ...supernet import Supernet
from ..budget import GroupSteps, ProjectionResult, project
from ..protocol import JSON, Decisions, SearchContext, Strategy, register_implementation

__all__ = ["MagnitudeStrategy", "RandomStrategy", "steps_from_scores", "top_of"]


def _counts(group: UnitGroup, net: Supernet) -> list[int]:
    """Units kept at each level of the group (weights groups: on the dense layer's weight count)."""
    if group.kind == "weights":
        return [round(float(d) * group.size) for d in group.choices]
    if group.kind == "attention":
        return list(range(len(group.choices)))
    return [int(c) for c in group.choices]


def steps_from_scores(
    group: UnitGroup, net: Supernet, scores: Tensor, values: list[int] | None = None, level: int | None = None
) -> GroupSteps:
    """Levels = the group's candidates (or ``values``, kept counts ascending, e.g. those a shrunk group can still
    take); a step down loses the scores of the units ranked between two levels. ``level``: where the group stands
    (default: its top level)."""
    if group.kind == "attention":
        steps = scores.tolist()
    else:
        ranked = torch.sort(scores.flatten(), descending=True).values
        cum = torch.cat([ranked.new_zeros(1), torch.cumsum(ranked, 0)])
        counts = _counts(group, net) if values is None else values
        steps = [float(cum[hi] - cum[lo]) for lo, hi in zip(counts, counts[1:], strict=False)]
    levels = list(group.choices) if values is None else list(values)
    return GroupSteps(group, levels, len(levels) - 1 if level is None else level, steps)


def top_of(scores: Tensor, count: int) -> Tensor:
    """The indices of the ``count`` highest ``scores`` (ties: lower index first), ascending."""
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:count]).values


def _normalised(net: Supernet, groups: list[UnitGroup]) -> dict[str, Tensor]:
    """Unit scores divided by the mean |w| per weight of their group kind.

    A unit then scores about the number of weights it owns, times how large they are for their kind: a head of
    ``3·d·D`` typical weights outweighs a single weight, and an op step is worth the weights it stops using. (A
    mean *per unit* instead would price a whole op step like one FFN neuron.)
    """
    raw = {g.path: net.unit_scores(g.path) for g in groups}
    out = {}
    for kind in {g.kind for g in groups}:
        paths = [g.path for g in groups if g.kind == kind]
        total = sum(float(raw[p].sum()) for p in paths)
        weights = sum(float(net.unit_weights(p).sum()) for p in paths)
        scale = total / weights if total > 0 and weights > 0 else 1.0
        out.update({p: raw[p] / scale for p in paths})
    return out


def _info(ctx: SearchContext, start: FrozenArch, result: ProjectionResult) -> dict[str, JSON]:
    return {
        "derived_cost": dict(ctx.price(start)),
        "projected_cost": dict(result.cost),
        "removed": result.removed,
        "added": result.added,
    }


@register_implementation
class MagnitudeStrategy(Strategy):
    """Data-free L1-magnitude pruning of every dimension the space declares, cut to the budget."""

    name = "magnitude"
    kind = "data_free"

    def finalize(self) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        groups = [g for g in net.groups.values() if g.decision]
        start = ctx.program.space.largest()
        scores = _normalised(net, groups)
        steps = [steps_from_scores(g, net, scores[g.path]) for g in groups]
        result = project(net.geometry, start, steps, ctx.targets, ctx.convention)
        kept = net.kept_for(result.arch)  # the largest units by the same L1 scores
        return Decisions(result.arch, {k: v.cpu() for k, v in kept.items()}, _info(ctx, start, result))


@register_implementation
class RandomStrategy(Strategy):
    """Uniformly random allocation and kept units under the budget (the control)."""

    name = "random"
    kind = "data_free"

    def finalize(self) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        seed = int(ctx.settings["seed"])
        groups = [g for g in net.groups.values() if g.decision]
        start = ctx.program.space.largest()
        steps = [
            GroupSteps(g, list(g.choices), len(g.choices) - 1, [0.0] * (len(g.choices) - 1)) for g in groups
        ]
        result = project(net.geometry, start, steps, ctx.targets, ctx.convention, order="random", seed=seed)
        gen = torch.Generator().manual_seed(seed)
        kept: dict[str, Tensor] = {}
        for path, group in net.groups.items():
            if group.kind in ("attention", "weights"):
                continue
            count = int(value_of(result.arch, group))
            if count < net.size(path):
                kept[path] = torch.sort(torch.randperm(net.size(path), generator=gen)[:count]).values
        kept = net.kept_for(result.arch, kept)
        for path, group in net.groups.items():
            if group.kind == "weights" and path in kept:
                kept[path] = _random_weights(net, group, float(value_of(result.arch, group)), kept, gen)
        return Decisions(result.arch, {k: v.cpu() for k, v in kept.items()}, _info(ctx, start, result))


def _random_weights(
    net: Supernet, group: UnitGroup, density: float, kept: dict[str, Tensor], gen: torch.Generator
) -> Tensor:
    """A uniformly random ``round(density · n)`` of the ``n`` weights in the layer's kept rows and columns."""
    allowed = net.structured_support(group, kept).cpu()
    positions = torch.nonzero(allowed.flatten()).flatten()
    count = round(density * positions.numel())
    chosen = positions[torch.randperm(positions.numel(), generator=gen)[:count]]
    out = torch.zeros(allowed.numel(), dtype=torch.bool)
    out[chosen] = True
    return out.view_as(allowed)
