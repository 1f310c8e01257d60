"""The budget projection over unit groups (pure Python: a real tiny geometry, no torch)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spvit_dsl.compile.program import compile_text
from spvit_dsl.search.budget import GroupSteps, Target, project
from spvit_dsl.space.cost import arch_cost
from spvit_dsl.space.groups import decisions, value_of
from spvit_dsl.space.plan import reads_image

SPACE = """backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; classes = 10; embed_dim = 48; depth = 3; heads = 3 }
embed: 16..48 step 4
blocks all { attention: one of {skip, conv1x1, conv3x3, msa}; heads: 1..3; head_dim: 4..16 step 4; ffn: per neuron;
             sparsity: {qkv: 0..0.5 step 0.25, fc1: 0..0.5 step 0.25} }
"""
PROGRAM = compile_text(SPACE, "space.vit")
SPACE_ = PROGRAM.space
GEOMETRY = SPACE_.geometry
GROUPS = decisions(SPACE_)


def _steps(draw_scores, levels: list[int] | None = None) -> list[GroupSteps]:
    out = []
    for k, g in enumerate(GROUPS):
        n = len(g.choices)
        level = n - 1 if levels is None else levels[k] % n
        out.append(GroupSteps(g, list(g.choices), level, [draw_scores(k, j) for j in range(n - 1)]))
    return out


def _dense_costs() -> dict[str, float]:
    c = arch_cost(GEOMETRY, SPACE_.largest(), "paper")
    return {"flops": c.macs, "params": c.params}


@given(
    scores=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=50),
    levels=st.lists(st.integers(0, 200), min_size=len(GROUPS), max_size=len(GROUPS)),
    ratio=st.floats(0.15, 0.95),
    metric=st.sampled_from(["flops", "params"]),
)
@settings(max_examples=40, deadline=None)
def test_projection_meets_the_budget_within_one_percent(scores, levels, ratio, metric):
    steps = _steps(lambda k, j: scores[(7 * k + j) % len(scores)], levels)
    target = Target(metric, ratio * _dense_costs()[metric], f"{ratio:.0%}")
    res = project(GEOMETRY, SPACE_.largest(), steps, [target], "paper")
    # price the result independently of the projection's own bookkeeping
    achieved = arch_cost(GEOMETRY, res.arch, "paper")
    value = achieved.macs if metric == "flops" else achieved.params
    assert value == pytest.approx(res.cost[metric], rel=1e-12)
    assert value <= target.limit
    # per-neuron FFN steps are far finer than 1% of any of these budgets
    assert value >= 0.99 * target.limit
    for s in steps:  # every group ends on one of its candidates, at the level the result reports
        assert value_of(res.arch, s.group) in s.group.choices or s.group.kind == "weights"
    assert reads_image(GEOMETRY, res.arch)  # whatever the start and the scores, one block keeps msa


@pytest.mark.parametrize("order", ["score", "random"])
def test_projection_keeps_the_class_token_reading_the_image(order):
    """A ViT point without msa gives every image the same logits: a start point with none gets its most valuable
    msa back, and no move removes the last one, even when the op steps are the cheapest moves by far."""
    all_conv = [
        0 if g.kind != "attention" else 1 for g in GROUPS
    ]  # every block at conv1x1, other groups smallest
    levels = [
        lv if g.kind == "attention" else len(g.choices) - 1 for lv, g in zip(all_conv, GROUPS, strict=True)
    ]
    msa_worth = {g.path: 10.0 * k for k, g in enumerate(GROUPS) if g.kind == "attention"}
    steps = _steps(
        lambda k, j: msa_worth.get(GROUPS[k].path, 0.0) if GROUPS[k].kind == "attention" else 5.0, levels
    )
    start = SPACE_.largest()
    assert not reads_image(
        GEOMETRY, replace(start, blocks=tuple(replace(b, op="conv1x1") for b in start.blocks))
    )
    target = Target("flops", 0.3 * _dense_costs()["flops"], "30%")
    res = project(GEOMETRY, start, steps, [target], "paper", order=order, seed=3)
    ops = [b.op for b in res.arch.blocks]
    assert ops.count("msa") >= 1, ops
    assert res.raised_msa is not None and res.arch.blocks[int(res.raised_msa.split(".")[1])].op == "msa"
    if order == "score":  # the block whose msa step scores highest is the one raised
        assert ops[-1] == "msa" and res.raised_msa == "blocks.2.attention"
    dense = project(GEOMETRY, start, _steps(lambda k, j: 0.0), [target], "paper")
    assert dense.raised_msa is None  # a start point that reads the image needs nothing raised


def test_projection_drops_the_least_score_per_cost_first():
    """Two FFN groups of equal cost: the lower-scoring one loses its neurons first."""
    steps = _steps(lambda k, j: 0.0)
    for s in steps:
        if s.group.path == "blocks.0.ffn":
            s.scores = [-1.0] * len(s.scores)
        elif s.group.path == "blocks.1.ffn":
            s.scores = [5.0] * len(s.scores)
    others = [s for s in steps if s.group.path in ("blocks.0.ffn", "blocks.1.ffn")]
    dense = arch_cost(GEOMETRY, SPACE_.largest(), "paper").macs
    ffn = arch_cost(GEOMETRY, SPACE_.largest().with_block(0, ffn=0), "paper").macs
    target = Target("flops", dense - 0.5 * (dense - ffn))  # half of block 0's FFN must go
    res = project(GEOMETRY, SPACE_.largest(), others, [target], "paper")
    assert res.arch.blocks[1].ffn == GEOMETRY.blocks[1].hidden
    assert res.arch.blocks[0].ffn < GEOMETRY.blocks[0].hidden


def test_projection_honours_two_budgets():
    dense = _dense_costs()
    targets = [Target("flops", 0.6 * dense["flops"]), Target("params", 0.4 * dense["params"])]
    res = project(GEOMETRY, SPACE_.largest(), _steps(lambda k, j: float(j % 3)), targets, "paper")
    c = arch_cost(GEOMETRY, res.arch, "paper")
    assert c.macs <= targets[0].limit and c.params <= targets[1].limit
    assert max(c.macs / targets[0].limit, c.params / targets[1].limit) >= 0.99


def test_embedding_moves_are_priced_with_every_block_product():
    """Only the embedding width may move: the projection lands where the exact cost (E × FFN, E × heads·d...) says."""
    embed = next(g for g in GROUPS if g.kind == "embed")
    steps = [GroupSteps(embed, list(embed.choices), len(embed.choices) - 1, [1.0] * (len(embed.choices) - 1))]
    dense = _dense_costs()["flops"]
    target = Target("flops", 0.7 * dense)
    res = project(GEOMETRY, SPACE_.largest(), steps, [target], "paper", fill=False)
    widths = list(embed.choices)
    largest = SPACE_.largest()
    fitting = [
        w for w in widths if arch_cost(GEOMETRY, replace(largest, embed=(w,)), "paper").macs <= target.limit
    ]
    assert res.arch.embed == (max(fitting),)


def test_random_order_is_seeded_and_still_meets_the_budget():
    dense = _dense_costs()["flops"]
    target = Target("flops", 0.5 * dense)
    results = [
        project(
            GEOMETRY, SPACE_.largest(), _steps(lambda k, j: 0.0), [target], "paper", order="random", seed=s
        )
        for s in (0, 0, 1)
    ]
    assert results[0].arch == results[1].arch
    assert results[0].arch != results[2].arch
    for r in results:
        assert 0.99 * target.limit <= arch_cost(GEOMETRY, r.arch, "paper").macs <= target.limit


def test_an_unreachable_budget_is_a_clear_error():
    ffn_only = [s for s in _steps(lambda k, j: 0.0) if s.group.kind == "ffn"]
    with pytest.raises(ValueError, match="cannot meet flops <= tiny"):
        project(GEOMETRY, SPACE_.largest(), ffn_only, [Target("flops", 1.0, "tiny")], "paper")


def test_group_steps_check_their_shape():
    g = GROUPS[0]
    with pytest.raises(ValueError, match="need"):
        GroupSteps(g, list(g.choices), 0, [])


def test_a_projection_that_cannot_settle_stops_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hang guard: moves that undo each other (forced here: a step up that 'frees room' and the step back down,
    for ever) end in a ValueError naming the cause and the fix, after a bounded number of moves."""
    from spvit_dsl.search import budget

    steps = _steps(lambda k, j: float(j))
    ffn = next(s for s in steps if s.group.kind == "ffn")
    ffn.level = len(ffn.values) - 2  # room for one step up

    def free_up(self: budget.Projection, over: list[Target], protect: frozenset[str]) -> str | None:
        s = self.steps[ffn.group.path]
        if s.level + 1 < len(s.values):
            self.apply(ffn.group.path, s.level + 1)
            return ffn.group.path
        return None

    def down_key(
        self: budget.Projection, path: str, over: list[Target], saving: bool = False
    ) -> float | None:
        s = self.steps[path]
        return 0.0 if path == ffn.group.path and s.level > s.floor else None

    monkeypatch.setattr(budget.Projection, "_free_up", free_up)
    monkeypatch.setattr(budget.Projection, "_down_key", down_key)
    moves = 0
    real = budget.Projection.apply

    def counted(self: budget.Projection, path: str, level: int) -> None:
        nonlocal moves
        moves += 1
        assert moves < 10 * cap, "the projection does not stop"  # fail at once rather than hang
        real(self, path, level)

    cap = 8 * sum(len(s.values) for s in steps) + 64
    monkeypatch.setattr(budget.Projection, "apply", counted)
    target = Target("flops", 0.3 * _dense_costs()["flops"], "30%")
    with pytest.raises(ValueError, match=r"did not settle after \d+ moves .* --rebuild"):
        project(GEOMETRY, SPACE_.largest(), steps, [target], "paper")
    assert moves <= 2 * cap
