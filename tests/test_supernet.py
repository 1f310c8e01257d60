"""The supernet: gradients, FLOPs = analytic cost, sampling statistics, cost, repair units, save/load."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from _spaces import dense_twin, nested_ffn, tiny_distilled_space, tiny_swin_space, tiny_vit_space
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spvit_dsl.lang.errors import UsageError
from spvit_dsl.space import cost
from spvit_dsl.space.plan import BlockArch, FfnChoice, FrozenArch
from spvit_dsl.supernet import Supernet, count_macs, load_supernet, read_metadata, save_supernet
from spvit_dsl.supernet.lower import lower

SPACES = {
    "deit": lambda: tiny_vit_space(),
    "deit_distilled_nested": lambda: tiny_distilled_space(ffn=nested_ffn),
    "swin": lambda: tiny_swin_space(),
    "swin_groups": lambda: tiny_swin_space(ffn=FfnChoice(group=8)),
}
_NETS: dict[str, Supernet] = {}


def net_for(name: str) -> Supernet:
    """One lowered supernet per space for the whole module (the property test fixes gates on it)."""
    if name not in _NETS:
        torch.manual_seed(0)
        _NETS[name] = lower(SPACES[name]())
    net = _NETS[name]
    net.fix(None)
    with torch.no_grad():
        for p in net.gate_parameters():
            p.fill_(1.5)
    return net


def x_batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def random_logits(net: Supernet, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2)


# --- gradients -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deit", "swin"])
def test_all_on_gradients_reach_every_logit_and_match_dense_weight_gradients(name):
    torch.manual_seed(0)
    net = lower(SPACES[name]()).train()
    dense = dense_twin(net).train()
    with torch.no_grad():
        for p in net.gate_parameters():
            p.fill_(3.0)
    x = x_batch()
    net.draw(noise=torch.full((net.num_gates(),), 0.5))  # z = θ: every gate on, σ'(3) well away from 0
    torch.manual_seed(1)
    net.model(x).square().mean().backward()
    assert all(r.attn.op == "msa" for r in net.rows)
    assert all(r.mlp._mask is not None and bool((r.mlp._mask == 1).all()) for r in net.rows)
    torch.manual_seed(1)
    dense(x).square().mean().backward()
    for p in net.gate_parameters():
        assert p.grad is not None and torch.all(p.grad != 0), "a gate logit got no gradient"
    dense_params = dict(dense.named_parameters())
    for k, p in net.model.named_parameters():
        if k in dense_params:
            torch.testing.assert_close(p.grad, dense_params[k].grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["deit", "swin"])
def test_conv_levels_train_the_mixing_matrix_and_their_batchnorm(name):
    torch.manual_seed(0)
    space = tiny_vit_space() if name == "deit" else tiny_swin_space(heads=(2, 2))  # one head: softmax ≡ 1
    net = lower(space).train()
    with torch.no_grad():
        for r in net.rows[:-1]:
            r.op_gate.logits.copy_(torch.tensor([3.0, 3.0, -3.0, 3.0]))  # level 2: conv3x3
        net.rows[-1].op_gate.logits.fill_(3.0)  # ViT: patches reach the cls token only through an msa
    net.draw(noise=torch.full((net.num_gates(),), 0.5))
    net.model(x_batch()).square().mean().backward()
    for r in net.rows[:-1]:
        assert r.attn.op == "conv3x3"
        assert r.attn.mix.grad is not None and r.attn.mix.grad.abs().sum() > 0
        assert r.attn.bns["conv3x3"].weight.grad.abs().sum() > 0
        assert torch.all(r.op_gate.logits.grad[:3] != 0)  # gates up to the first off one get gradients


def test_skip_level_leaves_attention_weights_without_gradient():
    net = lower(tiny_vit_space(ops=("skip", "msa"))).train()
    with torch.no_grad():
        for r in net.rows:
            r.op_gate.logits.fill_(-30.0)
    net(x_batch()).sum().backward()
    assert all(r.attn.op == "skip" and r.attn.qkv.weight.grad is None for r in net.rows)


# --- FLOPs = analytic cost -----------------------------------------------------------------------------------


@st.composite
def arch_for(draw, name: str) -> FrozenArch:
    space = net_for(name).space
    blocks = []
    for p in space.plans:
        op = draw(st.sampled_from(p.attention))
        width = draw(st.sampled_from(p.ffn.candidates(p.geom.hidden)))
        blocks.append(BlockArch(op, width, p.heads[0], p.head_dim[0]))
    return FrozenArch(tuple(blocks), space.geometry.embed_dim)


@pytest.mark.parametrize("name", SPACES)
def test_measured_macs_equal_the_exact_cost_model(name):
    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(arch=arch_for(name))
    def check(arch: FrozenArch) -> None:
        net = net_for(name).eval()
        net.fix(arch)
        batch = 2
        measured = count_macs(net, x_batch(batch)) / batch
        assert measured == cost.breakdown(net.space.geometry, arch, "exact")["matmul"]
        assert net.derive() == arch

    check()


def test_count_macs_sees_cpu_sdpa():
    net = net_for("deit").eval()
    dense = net.space.dense()
    net.fix(dense)
    assert count_macs(net, x_batch(1)) == cost.breakdown(net.space.geometry, dense, "exact")["matmul"]
    g = net.space.geometry.blocks[0]
    attn_macs = 2 * g.tokens * g.tokens * g.dim * g.heads * g.head_dim // g.dim  # 2·N²·(h·d)
    for r in net.rows:
        r.attn.fused_attn = False  # manual path: bmm, which the counter always knew
    manual = count_macs(net, x_batch(1))
    for r in net.rows:
        r.attn.fused_attn = True
    assert manual == count_macs(net, x_batch(1)) and attn_macs > 0


# --- expected cost -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("convention", ["exact", "paper"])
def test_expected_cost_equals_the_cost_of_the_derived_arch(name, convention):
    net = net_for(name)
    for seed in range(4):
        random_logits(net, seed)
        arch = net.derive()
        c = cost.arch_cost(net.space.geometry, arch, convention)
        assert net.expected_cost(convention).item() == c.macs
        assert net.expected_cost(convention, metric="params").item() == c.params
    net.zero_grad()
    net.expected_cost(convention).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gate_parameters())


def test_expected_cost_of_a_fixed_arch_is_constant():
    net = net_for("deit")
    arch = net.space.dense()
    net.fix(arch)
    value = net.expected_cost()
    assert value.item() == cost.dense_cost(net.space.geometry, "exact").macs and not value.requires_grad


# --- sampling ------------------------------------------------------------------------------------------------


def test_sampled_levels_follow_sigmoid_statistics():
    net = lower(tiny_vit_space(ffn=FfnChoice(group=4))).train()
    theta = torch.tensor([1.5, 0.4, -0.3, 1.0])
    with torch.no_grad():
        net.gates["blocks.0.attention"].logits.copy_(theta)
        net.gates["blocks.0.ffn"].logits.copy_(torch.linspace(-2, 2, net.gates["blocks.0.ffn"].num_gates))
    net.manual_seed(1234)
    n = 3000
    counts = [0] * 5
    ffn_on = torch.zeros(net.gates["blocks.0.ffn"].num_gates)
    for _ in range(n):
        net.draw()
        counts[net.rows[0].attn._level] += 1
        ffn_on += net.rows[0].mlp._mask.detach()[::4]
    s = torch.sigmoid(theta).tolist()
    probs = [math.prod(s[:k]) * (1 - s[k]) for k in range(4)] + [math.prod(s)]
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))
    assert chi2 < 18.47  # 4 degrees of freedom, p = 0.001
    for k in range(5):  # P(level ≥ k) = Π_{j<k} σ(θ_j)
        p_ge = math.prod(s[:k])
        assert abs(sum(counts[k:]) / n - p_ge) < 4 * math.sqrt(p_ge * (1 - p_ge) / n) + 1e-9
    p_ffn = torch.sigmoid(net.gates["blocks.0.ffn"].logits.detach())
    assert torch.all((ffn_on / n - p_ffn).abs() < 4 * torch.sqrt(p_ffn * (1 - p_ffn) / n))


def test_same_seed_same_gates_and_eval_is_deterministic():
    torch.manual_seed(0)
    a = lower(tiny_vit_space(), seed=5).train()
    a(x_batch()).sum().backward()  # a training step leaves no graph behind: the supernet stays deep-copyable
    b = copy.deepcopy(a)  # ... generator state included
    levels_a, levels_b = [], []
    for _ in range(20):
        a.draw(), b.draw()
        levels_a.append([r.attn._level for r in a.rows])
        levels_b.append([r.attn._level for r in b.rows])
    assert levels_a == levels_b and len({tuple(v) for v in levels_a}) > 1
    random_logits(a, 3)
    a.eval()
    x = x_batch()
    assert torch.equal(a(x), a(x))
    expected = [
        min([j for j, v in enumerate(r.op_gate.logits.tolist()) if v <= 0], default=4) for r in a.rows
    ]
    assert [r.attn._level for r in a.rows] == expected


# --- fix, units ----------------------------------------------------------------------------------------------


def test_fix_forces_choices_in_every_mode_and_releases():
    net = net_for("deit_distilled_nested")
    p = net.space.plans
    arch = FrozenArch(
        tuple(BlockArch("conv1x1", pl.geom.hidden // 4, pl.heads[0], pl.head_dim[0]) for pl in p),
        net.space.geometry.embed_dim,
    )
    net.fix(arch)
    for mode in (True, False):
        net.train(mode)
        net(x_batch())
        assert all(r.attn.op == "conv1x1" and r.mlp.kept_index().numel() == r.hidden // 4 for r in net.rows)
    assert net.derive() == arch
    assert all(
        int(m.sum()) == pl.geom.hidden // 4 for m, pl in zip(net.kept_units().values(), p, strict=True)
    )
    with pytest.raises(ValueError, match="not a candidate"):
        net.fix(FrozenArch((BlockArch("conv7x7", 8, 2, 16),) * 3, 32))
    net.fix(None)
    net.eval()(x_batch())
    assert all(r.attn.op == "msa" for r in net.rows)


def test_fixed_width_zero_outputs_the_fc2_bias():
    net = net_for("swin_groups").eval()
    space = net.space
    arch = FrozenArch(tuple(BlockArch("skip", 0, pl.heads[0], pl.head_dim[0]) for pl in space.plans), 16)
    net.fix(arch)
    r = net.rows[0]
    y = r.mlp(torch.randn(2, 5, r.plan.geom.dim))
    assert torch.equal(y, r.mlp.fc2.bias.detach().expand(2, 5, -1))
    assert count_macs(net, x_batch(1)) == cost.breakdown(space.geometry, arch)["matmul"]


@pytest.mark.parametrize("name", ["deit", "deit_distilled_nested", "swin_groups"])
def test_unit_table_steps_match_the_cost_model(name):
    net = net_for(name)
    random_logits(net, 11)
    units = net.unit_table()
    assert len(units) == sum(p.numel() for p in net.gate_parameters())
    geometry = net.space.geometry
    for decision in ("blocks.0.attention", "blocks.1.ffn"):
        group = [u for u in units if u.decision == decision]
        on = [u for u in group if u.on]
        if not on:
            net.set_unit(decision, 0, True)
            units = net.unit_table()
            group = [u for u in units if u.decision == decision]
            on = [u for u in group if u.on]
        unit = on[-1]  # the highest unit that is on: dropping it alone is one step down
        before = cost.arch_cost(geometry, net.derive(), "exact")
        net.set_unit(decision, unit.index, False)
        after = cost.arch_cost(geometry, net.derive(), "exact")
        assert before.macs - after.macs == unit.macs and before.params - after.params == unit.params
        assert net.gates[decision].logits[unit.index] < 0
        net.set_unit(decision, unit.index, True)
        assert cost.arch_cost(geometry, net.derive(), "exact") == before


# --- save / load, precision, copies --------------------------------------------------------------------------


def test_save_load_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    net = lower(tiny_swin_space(ffn=nested_ffn), seed=3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):  # move weights, gates, BN statistics away from their init
        net.train()(x_batch()).logsumexp(-1).mean().backward()
        opt.step(), opt.zero_grad()
    random_logits(net, 2)
    path = tmp_path / "net.safetensors"
    save_supernet(net, path, spec_text="backbone swin_tiny_patch4_window7_224 {}\n")
    loaded = load_supernet(path)
    assert loaded.space == net.space and read_metadata(path)["spvit_dsl.spec"].startswith("backbone swin")
    x = x_batch()
    assert torch.equal(net.eval()(x), loaded.eval()(x))
    net.manual_seed(9), loaded.manual_seed(9)
    torch.manual_seed(4)
    y1 = net.train()(x)
    torch.manual_seed(4)
    assert torch.equal(y1, loaded.train()(x))
    with pytest.raises(UsageError, match="not found"):
        load_supernet(tmp_path / "nothing.safetensors")


def test_forward_backward_under_bf16_autocast():
    net = net_for("swin").train()
    random_logits(net, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x_batch())
        loss = y.float().logsumexp(-1).mean() + 1e-9 * net.expected_cost().float()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.gate_parameters())
    net.zero_grad()


def test_gate_and_weight_parameters_partition_the_parameters():
    net = net_for("deit")
    gates, weights = net.gate_parameters(), net.weight_parameters()
    assert {id(p) for p in gates}.isdisjoint({id(p) for p in weights})
    assert len(gates) + len(weights) == len(list(net.parameters()))
    assert any(p is net.rows[0].attn.mix for p in weights)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    net = lower(tiny_vit_space(ops=("conv3x3", "msa"))).eval()
    x = x_batch()
    eager = net(x)
    compiled = torch.compile(net.model)
    net.draw()
    torch.testing.assert_close(compiled(x), eager)


def test_the_documented_example_runs(tmp_path):
    text = (Path(__file__).parents[1] / "docs" / "supernet.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("/tmp/supernet.safetensors", str(tmp_path / "supernet.safetensors"))
    exec(compile(code, "docs/supernet.md", "exec"), {})
    assert load_supernet(tmp_path / "supernet.safetensors").space.geometry.model == "deit_tiny_patch16_224"
