"""Toy strategies that exercise the protocol's hooks (physical shrinks during training; scoring proxy batches),
registered under test-only names when imported (also by the torchrun launcher ``_toy_search.py``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from spvit_dsl.compile.strategies import STRATEGIES, StrategyInfo, register_strategy
from spvit_dsl.runtime.optim import adamw, param_groups
from spvit_dsl.search.budget import GroupSteps, project
from spvit_dsl.search.protocol import (
    IMPLEMENTATIONS,
    JSON,
    Batch,
    Decisions,
    SearchContext,
    Shrink,
    Strategy,
    register_implementation,
)
from spvit_dsl.space.groups import with_value
from spvit_dsl.space.plan import FrozenArch

KINDS = frozenset({"embed", "attention", "heads", "head_dim", "ffn", "weights"})


def current_point(ctx: SearchContext) -> FrozenArch:
    """The largest point the (possibly shrunk) supernet can still express."""
    net, arch = ctx.net, ctx.program.space.largest()
    for path, group in net.groups.items():
        if group.structured:
            arch = with_value(arch, group, min(int(group.choices[-1]), net.size(path)))
    return arch


def finalize_by_magnitude(ctx: SearchContext) -> Decisions:
    """Cut to the budget among the counts the current supernet can express (L1 scores, unnormalised)."""
    net, start = ctx.net, current_point(ctx)
    steps = []
    for path, group in net.groups.items():
        if not (group.decision and group.structured):
            continue
        values = [int(c) for c in group.choices if int(c) <= net.size(path)]
        scores = torch.sort(net.unit_scores(path), descending=True).values
        cum = torch.cat([scores.new_zeros(1), torch.cumsum(scores, 0)])
        steps.append(
            GroupSteps(
                group,
                values,
                len(values) - 1,
                [float(cum[b] - cum[a]) for a, b in zip(values, values[1:], strict=False)],
            )
        )
    result = project(net.geometry, start, steps, ctx.targets, ctx.convention)
    return Decisions(result.arch, net.kept_for(result.arch), {"projected_cost": result.cost})


@register_implementation
class ToyShrink(Strategy):
    """Trains the weights; after step 2 cuts half of block 0's FFN, after step 4 one head of block 1."""

    name = "toy_shrink"
    kind = "train"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        self.opt = adamw(param_groups(ctx.net, 0.05), lr=float(ctx.settings["lr"]))
        self.steps = 0

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"weights": self.opt}

    def after_step(self) -> None:
        self.steps += 1

    def shrinks(self) -> list[Shrink]:
        net = self.ctx.net
        cuts = {2: "blocks.0.ffn", 4: "blocks.1.heads"}
        path = cuts.get(self.steps)
        if path is None or net.size(path) < 2:
            return []
        keep = torch.sort(net.unit_scores(path), descending=True, stable=True).indices[: net.size(path) // 2]
        if self.ctx.world > 1:  # every rank must cut the same units
            seen: list[object] = [None] * self.ctx.world
            dist.all_gather_object(seen, keep.tolist())
            assert all(s == seen[0] for s in seen), "ranks chose different units"
        return [Shrink(path, keep)]

    def derived(self) -> FrozenArch:
        return current_point(self.ctx)

    def state_dict(self) -> dict[str, JSON]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        self.steps = int(state["steps"])  # type: ignore[arg-type]

    def finalize(self) -> Decisions:
        return finalize_by_magnitude(self.ctx)


class _Scores(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))


@register_implementation
class ToyScore(Strategy):
    """Scores the embedding channels by their mean |activation| after the stem over 3 proxy batches."""

    name = "toy_score"
    kind = "score"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        self.scores = _Scores(ctx.net.size("embed"))

    def module(self) -> nn.Module:
        return self.scores

    def score_batches(self) -> int:
        return 3

    def score(self, index: int, batch: Batch) -> None:
        model = self.ctx.net.model
        tokens = model.patch_embed(batch.images)
        self.scores.sums += tokens.abs().mean(dim=(0, 1)).double()
        self.scores.seen += 1

    def finalize(self) -> Decisions:
        assert int(self.scores.seen) == 3
        return finalize_by_magnitude(self.ctx)


for _name, _kind in (("toy_shrink", "train"), ("toy_score", "score")):
    if _name not in STRATEGIES:
        register_strategy(StrategyInfo(_name, "a protocol test", KINDS, kind=_kind))  # type: ignore[arg-type]
assert "toy_shrink" in IMPLEMENTATIONS
