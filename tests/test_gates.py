"""Gates: the pure functions on tensors and the two gate modules."""

from __future__ import annotations

import itertools

import pytest
import torch

from spvit_dsl.space.plan import FfnChoice
from spvit_dsl.supernet.gates import FfnGate, OpGate, binary_concrete, indicator, leading_ones, level_weight


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
