"""The supernet: gradients through SPViT's gates, conv/skip levels, hard masks of a point (apply), the cost of
counts, save/load, bf16 autocast, torch.compile."""

from __future__ import annotations

import pytest
import torch
from _spaces import (
    SPACES,
    assert_grads_match,
    dense_twin,
    nested_ffn,
    net_for,
    random_logits,
    tiny_swin_space,
    tiny_vit_space,
    x_batch,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spvit_dsl.lang.errors import UsageError
from spvit_dsl.search.methods.spvit_gates import SpvitGates
from spvit_dsl.space import cost
from spvit_dsl.space.plan import BlockArch, FfnChoice, FrozenArch
from spvit_dsl.supernet import count_macs, load_supernet, read_metadata, save_supernet
from spvit_dsl.supernet.lower import lower


def every_gate_on(gates: SpvitGates) -> torch.Tensor:
    """Noise 0.5 (logit 0): z = θ, so every gate with θ > 0 is on and its sigmoid has a non-zero slope."""
    return torch.full((gates.num_gates(),), 0.5)


# --- gradients -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deit", "swin"])
def test_all_on_gradients_reach_every_logit_and_match_dense_weight_gradients(name):
    torch.manual_seed(0)
    net = lower(SPACES[name]()).train()
    dense = dense_twin(net).train()
    gates = SpvitGates(net)
    with torch.no_grad():
        for p in gates.parameters():
            p.fill_(3.0)
    x = x_batch()
    gates.draw(net, training=True, noise=every_gate_on(gates))
    assert all(r.attn.op == "msa" for r in net.rows)
    assert all(bool((net.mask(f"blocks.{r.index}.ffn") == 1).all()) for r in net.rows)
    torch.manual_seed(1)
    net(x).square().mean().backward()
    torch.manual_seed(1)  # the same drop-path draws: gate noise has its own generator
    dense(x).square().mean().backward()
    for p in gates.parameters():
        assert p.grad is not None and torch.all(p.grad != 0), "a gate logit got no gradient"
    assert_grads_match(net, dense)


@pytest.mark.parametrize("name", ["deit", "swin"])
def test_conv_levels_train_the_mixing_matrix_and_their_batchnorm(name):
    torch.manual_seed(0)
    space = tiny_vit_space() if name == "deit" else tiny_swin_space(heads=(2, 2))  # one head: softmax ≡ 1
    net = lower(space).train()
    gates = SpvitGates(net)
    op_gates = [gates.gates[f"blocks.{r.index}.attention"] for r in net.rows]
    with torch.no_grad():
        for g in op_gates[:-1]:
            g.logits.copy_(torch.tensor([3.0, 3.0, -3.0, 3.0]))  # level 2: conv3x3
        op_gates[-1].logits.fill_(3.0)  # ViT: patches reach the cls token only through an msa
    gates.draw(net, training=True, noise=every_gate_on(gates))
    net(x_batch()).square().mean().backward()
    for r, g in zip(net.rows[:-1], op_gates[:-1], strict=True):
        assert r.attn.op == "conv3x3"
        assert r.attn.mix.grad is not None and r.attn.mix.grad.abs().sum() > 0
        assert r.attn.bns["conv3x3"].weight.grad.abs().sum() > 0
        assert torch.all(g.logits.grad[:3] != 0)  # gates up to the first off one get gradients


def test_skip_level_leaves_attention_weights_without_gradient():
    net = lower(tiny_vit_space(ops=("skip", "msa"))).train()
    for r in net.rows:
        net.set_op(r.index, 0)
    net(x_batch()).sum().backward()
    assert all(r.attn.op == "skip" and r.attn.qkv.weight.grad is None for r in net.rows)
    assert all(r.mlp.fc1.weight.grad is not None for r in net.rows)


def test_count_macs_sees_cpu_sdpa():
    net = net_for("deit").eval()  # every mask None: the dense timm computation
    dense = net.space.dense()
    assert count_macs(net, x_batch(1)) == cost.breakdown(net.space.geometry, dense, "exact")["matmul"]
    g = net.space.geometry.blocks[0]
    attn_macs = 2 * g.tokens * g.tokens * g.heads * g.head_dim  # 2·N²·(h·d)
    for r in net.rows:
        r.attn.fused_attn = False  # manual path: bmm, which the counter always knew
    manual = count_macs(net, x_batch(1))
    for r in net.rows:
        r.attn.fused_attn = True
    assert manual == count_macs(net, x_batch(1)) and attn_macs > 0


# --- the cost of counts --------------------------------------------------------------------------------------


@st.composite
def arch_for(draw, name: str) -> FrozenArch:
    space = net_for(name).space
    blocks = []
    for p in space.plans:
        op = draw(st.sampled_from(p.attention))
        width = draw(st.sampled_from(p.ffn.candidates(p.geom.hidden)))
        blocks.append(BlockArch(op, width, p.heads[0], p.head_dim[0]))
    return FrozenArch(tuple(blocks), tuple(w[0] for w in space.embed))


@pytest.mark.parametrize("name", SPACES)
def test_cost_of_tensor_counts_is_the_analytic_cost_and_differentiable(name):
    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(arch=arch_for(name))
    def check(arch: FrozenArch) -> None:
        net = net_for(name)
        counts = cost.counts_of(arch)
        widths = [torch.tensor(float(b.ffn), dtype=torch.float64, requires_grad=True) for b in counts.blocks]
        for b, w in zip(counts.blocks, widths, strict=True):
            b.ffn = w
        for convention in ("exact", "paper"):
            want = cost.arch_cost(net.space.geometry, arch, convention)
            macs = net.cost(counts, convention, "macs")
            assert macs.dtype == torch.float64 and macs.item() == want.macs
            assert net.cost(counts, convention, "params").item() == want.params
        macs.backward()
        assert all(w.grad is not None and w.grad > 0 for w in widths)  # every FFN neuron costs

    check()


def test_cost_of_a_fixed_arch_is_a_constant():
    net = net_for("deit")
    value = net.cost(cost.counts_of(net.space.dense()))
    assert value.item() == cost.dense_cost(net.space.geometry, "exact").macs and not value.requires_grad
    assert value.dtype == torch.float64
    with pytest.raises(ValueError, match="metric"):
        net.cost(cost.counts_of(net.space.dense()), metric="latency")


# --- the hard masks of a point --------------------------------------------------------------------------------


def test_apply_forces_ops_and_top_units_in_every_mode_and_reset_releases():
    net = net_for("deit_distilled_nested")
    p = net.space.plans
    arch = FrozenArch(
        tuple(BlockArch("conv1x1", pl.geom.hidden // 4, pl.heads[0], pl.head_dim[0]) for pl in p),
        tuple(w[0] for w in net.space.embed),
    )
    kept = net.set_arch(arch)
    assert set(kept) == {f"blocks.{i}.ffn" for i in range(len(p))}  # only groups below their dense size
    for path, index in kept.items():
        scores = net.unit_scores(path)
        others = torch.ones_like(scores, dtype=torch.bool)
        others[index] = False
        assert index.numel() == net.size(path) // 4 and torch.equal(index, index.sort().values)
        assert scores[index].min() >= scores[others].max()  # the largest units by L1
        assert torch.equal(net.mask(path), net.mask_of(path, index))
        assert int(net.mask(path).sum()) == index.numel()
    for mode in (True, False):
        net.train(mode)
        net(x_batch())
        assert all(r.attn.op == "conv1x1" for r in net.rows)
    chosen = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:32]  # explicit units, in order
    kept = net.set_arch(arch, {"blocks.0.ffn": chosen})
    assert torch.equal(kept["blocks.0.ffn"], chosen)  # the order is the compact network's order
    assert torch.equal(net.mask("blocks.0.ffn").nonzero().flatten(), chosen.sort().values)
    with pytest.raises(ValueError, match="do not fit"):
        net.set_arch(arch, {"blocks.0.ffn": torch.arange(31)})
    with pytest.raises(ValueError, match="repeat a unit"):
        net.set_arch(arch, {"blocks.0.ffn": torch.cat([torch.arange(31), torch.tensor([0])])})
    with pytest.raises(ValueError, match="do not fit"):
        net.set_arch(arch, {"blocks.0.ffn": torch.arange(100, 132)})
    with pytest.raises(ValueError, match="not a candidate"):
        net.set_arch(FrozenArch(tuple(BlockArch("conv7x7", 8, 2, 16) for _ in p), (32,)))
    with pytest.raises(ValueError, match="blocks"):
        net.set_arch(FrozenArch(arch.blocks[:2], arch.embed))
    net.reset()
    net.eval()(x_batch())
    assert all(r.attn.op == "msa" and net.mask(f"blocks.{r.index}.ffn") is None for r in net.rows)


def test_fixed_width_zero_outputs_the_fc2_bias():
    net = net_for("swin_groups").eval()
    space = net.space
    arch = FrozenArch(
        tuple(BlockArch("skip", 0, pl.heads[0], pl.head_dim[0]) for pl in space.plans),
        tuple(w[0] for w in space.embed),
    )
    net.set_arch(arch)
    r = net.rows[0]
    y = r.mlp(torch.randn(2, 5, r.plan.geom.dim))
    assert torch.equal(y, r.mlp.fc2.bias.detach().expand(2, 5, -1))
    x = torch.randn(2, 16, 16, r.plan.geom.dim)
    assert torch.equal(r.attn.forward_map(x), torch.zeros_like(x))


def test_masks_of_unknown_groups_are_refused():
    net = net_for("deit")
    with pytest.raises(ValueError, match="unknown unit group 'blocks.9.ffn'"):
        net.set_masks({"blocks.9.ffn": None})
    assert net.mask("blocks.9.ffn") is None


# --- save / load, precision, copies --------------------------------------------------------------------------


def test_save_load_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    space = tiny_swin_space(ffn=lambda i, h: FfnChoice(widths=(h // 2,)) if i == 1 else nested_ffn(i, h))
    net = lower(space, seed=3)
    fixed = net.fixed.get("blocks.1.ffn")
    assert fixed is not None and int(fixed.sum()) == space.plans[1].geom.hidden // 2
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):  # move weights and BN statistics away from their init
        net.train()(x_batch()).logsumexp(-1).mean().backward()
        opt.step(), opt.zero_grad()
    path = tmp_path / "net.safetensors"
    save_supernet(net, path, spec_text="backbone swin_tiny_patch4_window7_224 {}\n")
    torch.manual_seed(123)  # loading lowers a fresh random model first: its own fixed units would differ
    loaded = load_supernet(path)
    assert loaded.space == net.space and read_metadata(path)["spvit_dsl.spec"].startswith("backbone swin")
    assert loaded.seed == 3 and loaded.convention == net.convention
    assert torch.equal(loaded.fixed.get("blocks.1.ffn"), fixed)
    assert torch.equal(loaded.mask("blocks.1.ffn"), fixed)  # the board reads the loaded fixed units
    x = x_batch()
    for a in (net, loaded):
        a.set_op(0, 1)  # conv1x1 in block 0: trained BatchNorm statistics and mixing matrix in use
    assert torch.equal(net.eval()(x), loaded.eval()(x))
    torch.manual_seed(4)
    y1 = net.train()(x)
    torch.manual_seed(4)
    assert torch.equal(y1, loaded.train()(x))
    with pytest.raises(UsageError, match="not found"):
        load_supernet(tmp_path / "nothing.safetensors")


def test_forward_backward_under_bf16_autocast():
    torch.manual_seed(0)
    net = lower(tiny_swin_space()).train()
    gates = SpvitGates(net, seed=1)
    random_logits(gates, 1)
    gates.draw(net, training=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x_batch())
        expected = net.cost(gates.counts(net))
        loss = y.float().logsumexp(-1).mean() + 1e-9 * expected.float()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and expected.dtype == torch.float64
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gates.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in net.model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    net = lower(tiny_vit_space(ops=("conv3x3", "msa"))).eval()
    net.set_op(1, 0)
    x = x_batch()
    eager = net(x)
    compiled = torch.compile(net.model)
    torch.testing.assert_close(compiled(x), eager)


def test_the_documented_example_runs(tmp_path, monkeypatch):
    """docs/supernet.md's example (tests/test_docs.py runs every example; this one also checks its output file)."""
    from pathlib import Path  # noqa: PLC0415

    text = (Path(__file__).parents[1] / "docs" / "supernet.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/supernet.md", "exec"), {})
    assert load_supernet(tmp_path / "supernet.safetensors").space.geometry.model == "deit_tiny_patch16_224"
