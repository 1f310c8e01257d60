"""Masks of the supernet's unit groups: per-sample vs batch-wide masks, the masked LayerNorm, L1 unit scores and
physically shrinking a group (parameters, optimizer moments, checkpoints)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _spaces import TINY_SWIN, TINY_VIT, every_dimension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.groups import Slice
from spvit_dsl.supernet import Supernet, load_supernet, masked_layer_norm, save_supernet
from spvit_dsl.supernet._shrink import restore_shrunk
from spvit_dsl.supernet.lower import lower

GEOMETRIES = {
    "vit": lambda: resolve("deit_tiny_distilled_patch16_224", TINY_VIT),
    "swin": lambda: resolve("swin_tiny_patch4_window7_224", TINY_SWIN),
}
KINDS = ("embed", "heads", "head_dim", "ffn")
# the block whose groups a test masks or shrinks: not the last ViT block (its patch tokens no longer reach the
# class token), a Swin block with two heads
BLOCK = {"vit": 1, "swin": 2}
_NETS: dict[str, Supernet] = {}


def randomise(net: Supernet, seed: int = 0) -> None:
    """Move the parameters the supernet adds (mixing matrices, conv BatchNorms) away from their constant init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in net.rows:
            if r.attn.max_kernel:
                r.attn.mix.copy_(torch.randn(r.attn.mix.shape, generator=gen))
            for bn in r.attn.bns.values():
                for t in (bn.weight, bn.bias, bn.running_mean):
                    t.copy_(torch.randn(t.shape, generator=gen))
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)


def fresh(family: str, seed: int = 0) -> Supernet:
    """Every dimension open (so every group is masked), deterministic weights."""
    torch.manual_seed(seed)
    net = lower(every_dimension(GEOMETRIES[family]()))
    randomise(net, seed)
    return net


def cached(family: str) -> Supernet:
    if family not in _NETS:
        _NETS[family] = fresh(family).eval()
    net = _NETS[family]
    net.reset()
    return net


def images(n: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def group_of(net: Supernet, family: str, kind: str) -> str:
    if kind == "embed":
        return "embed" if family == "vit" else "stages.1.embed"
    return f"blocks.{BLOCK[family]}.{kind}"


# --- per-sample masks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_per_sample_mask_equals_the_batch_mask_of_each_sample(family, kind):
    # float64: the two paths (masks on activations vs on weights) sum in different orders, and a LayerNorm over a
    # few soft-masked channels amplifies float32 rounding far beyond any tolerance that would still catch a bug
    net = fresh(family).eval().double()
    paths = [p for p, g in net.groups.items() if g.kind == kind and p in net.masked]  # not a one-head block
    x = images().double()

    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data) -> None:
        path = data.draw(st.sampled_from(paths), label="group")
        net.reset()
        for r in net.rows:  # per-sample heads masks only apply to msa (tested below)
            top = len(r.plan.attention) - 1
            net.set_op(r.index, top if kind == "heads" else data.draw(st.integers(0, top), label="level"))
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        gen = torch.Generator().manual_seed(seed)
        units = net.size(path)
        hard = torch.rand(len(x), units, generator=gen) < 0.5
        some = torch.randint(units, (len(x),), generator=gen)
        hard[torch.arange(len(x)), some] = True  # one unit kept at least
        hard[0] = False
        hard[0, 0] = True  # sample 0 keeps a single unit
        soft = data.draw(st.booleans(), label="soft")
        mask = (
            hard.float() * (torch.rand(len(x), units, generator=gen) * 0.9 + 0.1 if soft else 1.0)
        ).double()
        with torch.no_grad():
            unmasked = net.model.forward_features(x)  # every token (ViT) / the whole map (Swin)
            net.set_masks({path: mask})
            per_sample = net.model.forward_features(x)
            for b in range(len(x)):
                net.set_masks({path: mask[b]})
                batch_wide = net.model.forward_features(x)
                torch.testing.assert_close(per_sample[b], batch_wide[b], rtol=0, atol=1e-9)
        block = net.groups[path].block
        runs = kind in ("embed", "ffn") or net.rows[block].attn.op != "skip"
        if units > 1 and runs:
            assert (per_sample[0] - unmasked[0]).abs().max() > 1e-4  # the mask is not a no-op

    check()


def test_per_sample_head_masks_are_refused_for_conv_ops():
    net = cached("vit")
    net.set_op(0, 2)  # conv3x3
    net.set_masks({"blocks.0.heads": torch.ones(2, 2)})
    with pytest.raises(NotImplementedError, match="per-sample head masks"):
        net(images(2))
    net.reset()


# --- the masked LayerNorm ---------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(2, 12),
    tokens=st.integers(1, 4),
    per_sample=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_masked_layer_norm_is_the_layer_norm_of_the_kept_channels(channels, tokens, per_sample, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = 3
    x = torch.randn(batch, tokens, channels, generator=gen) * 3 + 1
    weight = torch.randn(channels, generator=gen) if affine else None
    bias = torch.randn(channels, generator=gen) if affine else None
    rows = batch if per_sample else 1
    keep = torch.rand(rows, channels, generator=gen) < 0.5
    keep[torch.arange(rows), torch.randint(channels, (rows,), generator=gen)] = True
    mask = keep.float() if per_sample else keep[0].float()
    y = masked_layer_norm(x, weight, bias, mask, 1e-6)
    for b in range(batch):
        k = keep[b if per_sample else 0]
        want = F.layer_norm(
            x[b][:, k], (int(k.sum()),), weight[k] if affine else None, bias[k] if affine else None, 1e-6
        )
        torch.testing.assert_close(y[b][:, k], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(y[b][:, ~k], torch.zeros_like(y[b][:, ~k]))
    assert torch.equal(
        masked_layer_norm(x, weight, bias, None, 1e-6), F.layer_norm(x, (channels,), weight, bias, 1e-6)
    )


def test_set_masks_refuses_masks_no_module_reads_or_of_the_wrong_shape():
    net = cached("swin")
    assert "blocks.0.heads" not in net.masked  # a one-head block: the space keeps its only head
    with pytest.raises(ValueError, match="keeps this group whole"):
        net.set_masks({"blocks.0.heads": torch.ones(1)})
    with pytest.raises(ValueError, match="set_op"):
        net.set_masks({"blocks.0.attention": torch.ones(4)})
    with pytest.raises(ValueError, match=r"shape \(5,\), expected \(2,\)"):
        net.set_masks({"blocks.2.heads": torch.ones(5)})
    with pytest.raises(ValueError, match="expected"):
        net.set_masks({"blocks.2.attn.qkv": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="unknown unit group"):
        net.set_masks({"blocks.2.head": torch.ones(2)})
    # per sample; None: every unit kept
    net.set_masks({"blocks.2.heads": torch.ones(3, 2), "blocks.2.attn.qkv": None})
    assert net.mask("blocks.2.heads").shape == (3, 2)
    net.reset()


# --- unit scores --------------------------------------------------------------------------------------------------


def test_unit_scores_are_the_l1_of_the_coupled_slices():
    net = cached("vit")
    attn, mlp = net.rows[1].attn, net.rows[1].mlp
    h, d, D = attn.num_heads, attn.head_dim, attn.attn_dim
    qkv_w, qkv_b = attn.qkv.weight.detach().double().abs(), attn.qkv.bias.detach().double().abs()
    proj = attn.proj.weight.detach().double().abs()

    j = 37  # one FFN neuron: fc1's row and bias, fc2's column
    want = mlp.fc1.weight[j].abs().sum() + mlp.fc1.bias[j].abs() + mlp.fc2.weight[:, j].abs().sum()
    scores = net.unit_scores("blocks.1.ffn")
    assert scores.dtype == torch.float64 and scores.shape == (mlp.hidden,)
    torch.testing.assert_close(scores[j], want.detach().double(), rtol=1e-6, atol=0)

    head = 1  # q, k and v rows of the head, their biases, proj's columns, the head's row of the mixing matrix
    rows = [t * D + head * d + c for t in range(3) for c in range(d)]
    cols = list(range(head * d, (head + 1) * d))
    want = (
        qkv_w[rows].sum()
        + qkv_b[rows].sum()
        + proj[:, cols].sum()
        + attn.mix[head].detach().double().abs().sum()
    )
    torch.testing.assert_close(net.unit_scores("blocks.1.heads")[head], want, rtol=1e-6, atol=0)

    c = 5  # one per-head channel: in q, k and v of every head, proj's columns, every conv BatchNorm's weight and
    rows = [
        t * D + g * d + c for t in range(3) for g in range(h)
    ]  # bias (not its running statistics: not weights)
    cols = [g * d + c for g in range(h)]
    want = qkv_w[rows].sum() + qkv_b[rows].sum() + proj[:, cols].sum()
    for bn in attn.bns.values():
        want += sum(float(t[c].abs()) for t in (bn.weight.detach(), bn.bias.detach()))
    torch.testing.assert_close(net.unit_scores("blocks.1.head_dim")[c], want, rtol=1e-6, atol=0)


def test_unit_weights_count_the_weights_each_unit_owns():
    net = cached("vit")
    attn, mlp = net.rows[1].attn, net.rows[1].mlp
    E, D, d, h = mlp.fc1.in_features, attn.attn_dim, attn.head_dim, attn.num_heads
    ffn = net.unit_weights("blocks.1.ffn")
    assert ffn.shape == (mlp.hidden,) and bool((ffn == 2 * E + 1).all())  # fc1 row and bias, fc2 column

    heads = net.unit_weights(
        "blocks.1.heads"
    )  # q, k, v rows and biases, proj's columns, the mixing matrix's row
    mix = attn.mix[0].numel() if attn.max_kernel else 0
    assert bool((heads == 3 * d * (E + 1) + E * d + mix).all())

    qkv = net.unit_weights("blocks.1.attn.qkv")
    assert qkv.shape == attn.qkv.weight.shape and bool((qkv == 1).all())

    # one entry per step down skip < conv1x1 < conv3x3 < conv5x5 < msa: the weights the step stops using
    assert attn.candidates == ("skip", "conv1x1", "conv3x3", "conv5x5", "msa")
    v_proj = D * E + E * D  # the value rows of qkv and proj
    want = [
        v_proj + h * 1,
        h * (9 - 1),
        h * (25 - 9),
        2 * D * E - h * 25,
    ]  # msa: q and k rows, no mixing matrix
    assert net.unit_weights("blocks.1.attention").tolist() == want


def test_swin_head_scores_include_the_relative_position_bias():
    net = cached("swin")
    attn = net.rows[2].attn
    d, D = attn.head_dim, attn.attn_dim
    head = 0
    rows = [t * D + head * d + c for t in range(3) for c in range(d)]
    tensors = (
        attn.qkv.weight[rows],
        attn.qkv.bias[rows],
        attn.proj.weight[:, head * d : (head + 1) * d],
        attn.mix[head],
        attn.relative_position_bias_table[:, head],
    )
    want = sum(t.detach().double().abs().sum() for t in tensors)
    torch.testing.assert_close(net.unit_scores("blocks.2.heads")[head], want, rtol=1e-6, atol=0)


# --- shrinking -------------------------------------------------------------------------------------------------


def _moments(
    net: Supernet, path: str, opt: torch.optim.Optimizer
) -> list[tuple[object, str, int, Slice, dict]]:
    """(owner, name, axis, slice, {value, exp_avg, exp_avg_sq}) of every coupled parameter of ``path``."""
    out = []
    for c in net.coupled(path):
        t = c.tensor
        state = dict(opt.state.get(t, {})) if isinstance(t, torch.nn.Parameter) else {}
        saved = {"value": t.detach().clone()} | {
            k: state[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in state
        }
        out.append((c.owner, c.name, c.axis, Slice("", c.axis, c.outer, c.inner), saved))
    return out


def _train_step(net: Supernet, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    net.train()
    opt.zero_grad()
    net(x).logsumexp(-1).mean().backward()
    opt.step()
    net.eval()


@pytest.mark.parametrize("family", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["msa", "conv3x3"])
def test_shrinking_a_masked_group_keeps_outputs_and_slices_optimizer_state(family, kind, op, tmp_path):
    net = fresh(family)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = images()
    _train_step(net, opt, x)  # Adam moments exist
    for r in net.rows[:-1]:  # the last block stays msa so that a ViT's patches reach its class token
        net.set_op(r.index, r.plan.attention.index(op))
    path = group_of(net, family, kind)
    units = net.size(path)
    order = torch.randperm(units, generator=torch.Generator().manual_seed(3))
    keep = order[: max(1, units // 2)]  # not sorted: shrinking keeps the order given
    net.set_masks({path: net.mask_of(path, keep)})
    with torch.no_grad():
        before = net(x)
        net.set_masks({path: None})
        unmasked = net(x)
        net.set_masks({path: net.mask_of(path, keep)})
    before_state = _moments(net, path, opt)

    net.shrink(path, keep, [opt])

    assert net.size(path) == keep.numel() and torch.equal(net.kept_index[path], keep)
    assert torch.equal(net.mask(path), torch.ones(keep.numel()))  # the board's mask followed the shrink
    live = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in net.parameters()} == live  # the optimizer holds exactly the live parameters
    for owner, name, axis, slc, saved in before_state:
        new = getattr(owner, name)
        positions = torch.tensor(slc.positions(keep.tolist(), units))
        assert new.shape[axis] == positions.numel()
        assert torch.equal(new.detach(), saved["value"].index_select(axis, positions)), name
        for k in ("exp_avg", "exp_avg_sq"):
            if k in saved:
                assert torch.equal(opt.state[new][k], saved[k].index_select(axis, positions)), (name, k)
    with torch.no_grad():
        after = net(x)
    assert (before - unmasked).abs().max() > 1e-4  # dropping the units matters
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)

    again = torch.arange(keep.numel() - 1, -1, -1)[: keep.numel() // 2 + 1]  # a second shrink composes
    net.shrink(path, again, [opt])
    assert torch.equal(net.kept_index[path], keep[again])
    _train_step(net, opt, x)  # the optimizer steps on the new shapes
    assert all(torch.isfinite(p).all() for p in net.parameters())

    rebuilt = lower(net.space)
    restore_shrunk(rebuilt, {p: v.tolist() for p, v in net.kept_index.items()})
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    file = tmp_path / "shrunk.safetensors"
    save_supernet(net, file)
    loaded = load_supernet(file)
    assert torch.equal(loaded.kept_index[path], net.kept_index[path])
    with torch.no_grad():
        want = net(x)
        for other in (rebuilt.eval(), loaded.eval()):
            other.set_masks(net.board.snapshot())
            for r in net.rows:
                other.set_op(r.index, r.attn._level)
            assert torch.equal(other(x), want)


def test_shrink_refuses_what_it_cannot_slice():
    net = cached("vit")
    with pytest.raises(ValueError, match="structured"):
        net.shrink("blocks.0.attention", torch.tensor([0]))
    with pytest.raises(ValueError, match="distinct"):
        net.shrink("blocks.0.ffn", torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="distinct"):
        net.shrink("blocks.0.ffn", torch.tensor([net.size("blocks.0.ffn")]))
    assert net.kept_index == {}
