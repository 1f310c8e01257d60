"""SPViT's gates: the pure functions on tensors, the two gate modules and the gate set driving a supernet
(draws, sampling statistics, seeds, derived networks, the differentiable cost of their counts)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from _spaces import (
    SPACES,
    net_for,
    random_logits,
    tiny_vit_space,
    x_batch,
)

from spvit_dsl.search.methods.spvit_gates import (
    FfnGate,
    OpGate,
    SpvitGates,
    binary_concrete,
    indicator,
    leading_ones,
    level_weight,
)
from spvit_dsl.space import cost
from spvit_dsl.space.plan import FfnChoice
from spvit_dsl.supernet.lower import lower


def test_binary_concrete_forward_is_exactly_hard_and_gradient_is_sigmoid():
    logits = torch.tensor([1.5, -0.3, 0.0, 4.0], requires_grad=True)
    noise = torch.tensor([0.1, 0.7, 0.5, 0.99])
    gate, hard = binary_concrete(logits, noise)
    z = logits.detach() + torch.log(noise) - torch.log1p(-noise)
    assert torch.equal(hard, (z > 0).float())
    assert torch.equal(gate.detach(), hard)  # bit-exact 0/1, not 1 - σ + σ
    gate.sum().backward()
    s = torch.sigmoid(z)
    torch.testing.assert_close(logits.grad, s * (1 - s))


def test_indicator_forward_and_surrogate_gradient():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.01], requires_grad=True)
    ind = indicator(logits)
    assert ind.tolist() == [1.0, 0.0, 1.0, 0.0]
    ind.sum().backward()
    p = torch.sigmoid(logits.detach())
    q = torch.sigmoid(p - 0.5)
    torch.testing.assert_close(logits.grad, q * (1 - q) * p * (1 - p))


def test_leading_ones():
    assert leading_ones([]) == 0
    assert leading_ones([0.0, 1.0, 1.0]) == 0
    assert leading_ones([1.0, 1.0, 0.0, 1.0]) == 2
    assert leading_ones([1.0, 1.0, 1.0]) == 3


def _official_weights(gates: torch.Tensor) -> list[torch.Tensor]:
    """SPViT's combination for 3 gates, its lower-gate detaching written out (out of place) as a reference."""
    c = list(torch.cumprod(gates, 0).unbind(0))
    if c[0] > 0.5 and c[1] > 0.5:
        c[0] = c[0].detach()
        if c[2] > 0.5:
            c[1] = c[1].detach()
    return [(1 - c[0]) * (1 - c[1]) * (1 - c[2]), c[0] * (1 - c[1]) * (1 - c[2]), c[1] * (1 - c[2]), c[2]]


@pytest.mark.parametrize("hard", list(itertools.product([0.0, 1.0], repeat=3)))
def test_level_weight_matches_the_official_combination(hard):
    soft = torch.tensor([0.3, 0.6, 0.8])
    leaf = soft.clone().requires_grad_()
    gates = torch.tensor(hard) + (leaf - leaf.detach())  # straight-through values, forward exactly `hard`
    level = leading_ones(list(hard))
    for k in range(4):
        w = level_weight(gates, k)
        assert w.item() == (1.0 if k == level else 0.0)
    # gradient of the selected level's weight equals the reference's (incl. the detaching)
    (g_ours,) = torch.autograd.grad(level_weight(gates, level), leaf)
    (g_ref,) = torch.autograd.grad(_official_weights(gates)[level], leaf)
    torch.testing.assert_close(g_ours, g_ref)


def test_level_weight_detaches_out_of_place():
    leaf = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    gates = torch.ones(3) + (leaf - leaf.detach())
    before = gates.clone()
    level_weight(gates, 3).backward()  # msa selected: would raise if a cumprod output were modified in place
    assert torch.equal(gates, before) and leaf.grad is not None
    assert torch.all(leaf.grad != 0)  # msa's weight c3 = g1 g2 g3 reaches every logit


def test_op_gate_module():
    g = OpGate("blocks.2.attention", ("skip", "conv1x1", "msa"))
    assert g.logits.shape == (2,) and torch.all(g.logits == 1.5)
    assert "blocks.2.attention" in repr(g) and "skip < conv1x1 < msa" in repr(g)
    assert g.level() == 2
    with torch.no_grad():
        g.logits[1] = -1.0
    assert g.level() == 1
    assert g.indicators().tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        OpGate("blocks.0.attention", ("msa",))


def test_ffn_gate_granular_groups():
    g = FfnGate("blocks.0.ffn", 10, FfnChoice(group=4))
    assert g.num_gates == 3 and g.group_of.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    assert g.group_sizes() == [4, 4, 2]
    with torch.no_grad():
        g.logits[1] = -0.5
    assert g.kept().tolist() == [True] * 4 + [False] * 4 + [True] * 2
    assert "3 gates of 4 neuron(s) over 10" in repr(g)


def test_ffn_gate_nested_widths_follow_the_importance_order():
    importance = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0, 1.0, 2.0, 0.0])
    g = FfnGate("blocks.1.ffn", 8, FfnChoice(widths=(2, 4, 6)), importance)
    assert g.num_gates == 2
    order = torch.argsort(importance, descending=True)
    for level in range(3):
        gates = torch.tensor([1.0] * level + [0.0] * (2 - level))
        kept = g.neuron_mask(gates) > 0.5
        width = (2, 4, 6)[level]
        assert kept.sum() == width and set(kept.nonzero().flatten().tolist()) == set(order[:width].tolist())
    assert g.group_sizes() == [2, 2]
    with torch.no_grad():
        g.logits[:] = torch.tensor([-1.0, 1.0])  # cumulative: the second gate alone keeps nothing more
    assert int(g.kept().sum()) == 2
    assert g.indicators().tolist() == [0.0, 0.0]
    assert "nested widths (2, 4, 6) of 8" in repr(g)


def test_ffn_gate_straight_through_mask_reaches_every_logit():
    g = FfnGate("blocks.0.ffn", 6, FfnChoice(widths=(0, 3, 6)), torch.arange(6.0))
    leaf = torch.tensor([0.7, 0.4], requires_grad=True)
    gates = torch.tensor([1.0, 0.0]) + (leaf - leaf.detach())
    mask = g.neuron_mask(gates)
    assert mask.detach().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # the 3 most important: indices 3..5
    (mask * torch.arange(1.0, 7.0)).sum().backward()
    assert torch.all(leaf.grad != 0)


# --- the gate set of a supernet ----------------------------------------------------------------------------------


def test_gates_exist_for_decisions_only_and_derive_the_declared_singletons():
    space = tiny_vit_space(
        ops=lambda i: ("msa",) if i == 0 else ("skip", "msa"),
        ffn=lambda i, h: FfnChoice(widths=(h // 2,)) if i == 1 else FfnChoice(group=4),
    )
    net = lower(space)
    gates = SpvitGates(net)
    assert set(gates.gates.keys()) == {
        "blocks.1.attention",
        "blocks.2.attention",
        "blocks.0.ffn",
        "blocks.2.ffn",
    }
    assert gates.gates["blocks.1.attention"].candidates == ("skip", "msa")
    assert gates.num_gates() == 2 + 2 * (space.plans[0].geom.hidden // 4)
    assert [g.decision for g in gates.ordered()] == [
        "blocks.1.attention",
        "blocks.2.attention",
        "blocks.0.ffn",
        "blocks.2.ffn",
    ]
    with torch.no_grad():
        gates.gates["blocks.1.attention"].logits.fill_(-1.0)
        gates.gates["blocks.0.ffn"].logits[:3] = -1.0
    arch = gates.derive(net)
    assert [b.op for b in arch.blocks] == ["msa", "skip", "msa"]
    assert [b.ffn for b in arch.blocks] == [128 - 12, 64, 128] and arch.embed == (32,)
    assert gates.levels() == {"blocks.1.attention": 0, "blocks.2.attention": 1}
    assert int(gates.kept_ffn()["blocks.0.ffn"].sum()) == 116
    text = repr(gates)
    assert (
        "blocks.1.attention: skip < msa" in text and "blocks.0.ffn: 32 gates of 4 neuron(s) over 128" in text
    )


def test_draw_sets_the_supernets_ops_and_ffn_masks():
    net = net_for("deit_distilled_nested")
    gates = SpvitGates(net)
    random_logits(gates, 5)
    gates.draw(net, training=False)
    levels, kept = gates.levels(), gates.kept_ffn()
    for r in net.rows:
        assert r.attn._level == levels[f"blocks.{r.index}.attention"]
        assert torch.equal(net.mask(f"blocks.{r.index}.ffn") > 0.5, kept[f"blocks.{r.index}.ffn"])
    net.eval()
    x = x_batch()
    assert torch.equal(net(x), net(x))
    noise = torch.rand(gates.num_gates(), generator=torch.Generator().manual_seed(2))
    gates.draw(net, training=True, noise=noise)
    flat = torch.cat([g.logits.detach() for g in gates.ordered()])
    hard = (flat + torch.log(noise) - torch.log1p(-noise) > 0).float()
    offset = 0
    for g in gates.ordered():
        n, block = g.num_gates, int(g.decision.split(".")[1])
        if isinstance(g, OpGate):
            attn = net.rows[block].attn
            assert attn._level == leading_ones(hard[offset : offset + n].tolist())
            assert attn._weight is not None and attn._weight.item() == 1.0 and attn._weight.requires_grad
        else:
            mask = net.mask(g.decision)
            assert torch.equal(mask.detach(), g.neuron_mask(hard[offset : offset + n])) and mask.requires_grad
        offset += n
    net.reset()


def test_sampled_levels_follow_sigmoid_statistics():
    net = lower(tiny_vit_space(ffn=FfnChoice(group=4))).train()
    gates = SpvitGates(net, seed=1234)
    theta = torch.tensor([1.5, 0.4, -0.3, 1.0])
    ffn_gate = gates.gates["blocks.0.ffn"]
    with torch.no_grad():
        gates.gates["blocks.0.attention"].logits.copy_(theta)
        ffn_gate.logits.copy_(torch.linspace(-2, 2, ffn_gate.num_gates))
    n = 3000
    counts = [0] * 5
    ffn_on = torch.zeros(ffn_gate.num_gates)
    for _ in range(n):
        gates.draw(net, training=True)
        counts[net.rows[0].attn._level] += 1
        ffn_on += net.mask("blocks.0.ffn").detach()[::4]
    s = torch.sigmoid(theta).tolist()
    probs = [math.prod(s[:k]) * (1 - s[k]) for k in range(4)] + [math.prod(s)]
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))
    assert chi2 < 18.47  # 4 degrees of freedom, p = 0.001
    for k in range(5):  # P(level ≥ k) = Π_{j<k} σ(θ_j)
        p_ge = math.prod(s[:k])
        assert abs(sum(counts[k:]) / n - p_ge) < 4 * math.sqrt(p_ge * (1 - p_ge) / n) + 1e-9
    p_ffn = torch.sigmoid(ffn_gate.logits.detach())
    assert torch.all((ffn_on / n - p_ffn).abs() < 4 * torch.sqrt(p_ffn * (1 - p_ffn) / n))


def test_same_seed_same_gates_and_eval_is_deterministic():
    torch.manual_seed(0)
    net = lower(tiny_vit_space()).train()
    a = SpvitGates(net, seed=5)
    a.draw(net, training=True)
    net(x_batch()).sum().backward()
    b = copy.deepcopy(a)  # ... generator state included
    net_copy = copy.deepcopy(net.reset() or net)
    c = SpvitGates(net, seed=5)
    c.draw(net, training=True)  # a fresh gate set with the same seed: the same first draw onwards
    levels_a, levels_b, levels_c = [], [], []
    for _ in range(20):
        a.draw(net, training=True)
        levels_a.append([r.attn._level for r in net.rows])
        b.draw(net_copy, training=True)
        levels_b.append([r.attn._level for r in net_copy.rows])
        c.draw(net, training=True)
        levels_c.append([r.attn._level for r in net.rows])
    assert levels_a == levels_b == levels_c and len({tuple(v) for v in levels_a}) > 1
    random_logits(a, 3)
    a.draw(net, training=False)
    net.eval()
    x = x_batch()
    assert torch.equal(net(x), net(x))
    expected = [
        min(
            [j for j, v in enumerate(a.gates[f"blocks.{r.index}.attention"].logits.tolist()) if v <= 0],
            default=4,
        )
        for r in net.rows
    ]
    assert [r.attn._level for r in net.rows] == expected


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("convention", ["exact", "paper"])
def test_expected_cost_equals_the_cost_of_the_derived_arch(name, convention):
    net = net_for(name)
    gates = SpvitGates(net)
    for seed in range(4):
        random_logits(gates, seed)
        arch = gates.derive(net)
        c = cost.arch_cost(net.space.geometry, arch, convention)
        counts = gates.counts(net)
        assert net.cost(counts, convention, "macs").item() == c.macs
        assert net.cost(counts, convention, "params").item() == c.params
    net.cost(gates.counts(net), convention, "macs").backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())


def test_a_training_step_leaves_no_graph_behind_on_the_supernet():
    """After a step the supernet stays deep-copyable (EMA copies, checkpoint snapshots) without a reset."""
    torch.manual_seed(0)
    net = lower(tiny_vit_space()).train()
    gates = SpvitGates(net, seed=5)
    gates.draw(net, training=True)
    net(x_batch()).sum().backward()
    twin = copy.deepcopy(net)
    assert [r.attn._level for r in twin.rows] == [r.attn._level for r in net.rows]
