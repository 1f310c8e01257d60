"""Lowering: real timm backbones become masked supernets that compute exactly what timm computes while every mask
is None (or every SPViT gate is on)."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from _spaces import (
    ALL_OPS,
    TINY_SWIN,
    TINY_VIT,
    all_on,
    assert_grads_match,
    dense_twin,
    every_dimension,
    make_space,
    nested_ffn,
    tiny_distilled_space,
    tiny_swin_space,
    tiny_vit_space,
)
from safetensors.torch import save_file

from spvit_dsl.lang.errors import UsageError
from spvit_dsl.search.methods.spvit_gates import SpvitGates
from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.plan import FfnChoice
from spvit_dsl.supernet import GatedMlp, MaskedLayerNorm, UnifiedAttention
from spvit_dsl.supernet._timm import GatedSwinBlock
from spvit_dsl.supernet.ffn import FfnGroups
from spvit_dsl.supernet.lower import check_lowerable, lower
from spvit_dsl.supernet.masks import EmbedMask, MaskBoard, MaskedLinear

SPACES = {"deit": tiny_vit_space, "deit_distilled": tiny_distilled_space, "swin": tiny_swin_space}
GEOMETRIES = {
    "deit_distilled": lambda: resolve("deit_tiny_distilled_patch16_224", TINY_VIT),
    "swin": lambda: resolve("swin_tiny_patch4_window7_224", TINY_SWIN),
}


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("ffn", [FfnChoice(group=1), FfnChoice(group=8), "nested"])
def test_no_masks_and_all_gates_on_equal_timm(name, ffn):
    torch.manual_seed(0)
    space = SPACES[name](ffn=nested_ffn if ffn == "nested" else ffn)
    net = lower(space)
    dense = dense_twin(net)
    x = torch.randn(2, 3, 32, 32)
    net.eval(), dense.eval()
    assert (net(x) - dense(x)).abs().max() <= 1e-5  # every mask None, every block at msa
    gates = SpvitGates(net)
    gates.draw(net, training=False)  # deterministic gates: θ = 1.5 > 0 keeps everything
    assert (net(x) - dense(x)).abs().max() <= 1e-5
    net.train(), dense.train()
    all_on(gates)
    gates.draw(net, training=True)
    assert all(r.attn.op == "msa" for r in net.rows)
    torch.manual_seed(1)
    y = net(x)
    torch.manual_seed(1)  # same drop-path draws: gate noise has its own generator
    assert (y - dense(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", GEOMETRIES)
def test_every_dimension_masked_with_no_masks_equals_timm_with_gradients(name):
    torch.manual_seed(0)
    net = lower(every_dimension(GEOMETRIES[name]())).train()
    dense = dense_twin(net).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    y = net(x)
    torch.manual_seed(1)
    want = dense(x)
    assert (y - want).abs().max() <= 1e-5
    y.square().mean().backward()
    want.square().mean().backward()
    assert_grads_match(net, dense)


def test_lowering_replaces_modules_in_place_and_names_groups():
    net = lower(tiny_swin_space(ops=("conv1x1", "msa")))
    assert len(net.rows) == 4
    for stage in net.model.layers:
        for blk in stage.blocks:
            assert type(blk) is GatedSwinBlock
            assert isinstance(blk.attn, UnifiedAttention) and isinstance(blk.mlp, GatedMlp)
            assert type(blk.norm1) is torch.nn.LayerNorm  # residual widths fixed: timm's own norms
    kinds = ("attention", "heads", "head_dim", "ffn", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert set(net.groups) == {"stages.0.embed", "stages.1.embed"} | {
        f"blocks.{i}.{k}" for i in range(4) for k in kinds
    }
    assert net.groups["blocks.3.attention"].choices == ("conv1x1", "msa")
    assert {p for p, g in net.groups.items() if g.decision} == {
        f"blocks.{i}.{k}" for i in range(4) for k in ("attention", "ffn")
    }
    text = repr(net)
    for i in range(4):
        assert f"blocks.{i}.attention: conv1x1 | msa" in text and f"blocks.{i}.ffn: hidden=" in text
        assert f"ffn=blocks.{i}.ffn" in text  # the FFN reads its mask from the board
    assert "heads=blocks." not in text  # fixed groups read no mask


@pytest.mark.parametrize("name", GEOMETRIES)
def test_open_residual_widths_mask_the_stream_and_keep_timm_names(name):
    net = lower(every_dimension(GEOMETRIES[name]()))
    dense_twin(net)  # same state-dict keys as timm (plus mixing matrices and conv BatchNorms)
    m = net.model
    for r in net.rows:
        blk = m.get_submodule(r.plan.geom.module)
        assert isinstance(blk.norm1, MaskedLayerNorm) and isinstance(blk.norm2, MaskedLayerNorm)
        assert blk.norm1.group == ("embed" if name != "swin" else f"stages.{r.plan.geom.stage}.embed")
    if name == "swin":
        stem_norm = m.patch_embed.norm
        assert isinstance(stem_norm, MaskedLayerNorm) and stem_norm.group == "stages.0.embed"
        down = m.layers[1].downsample
        assert isinstance(down.reduction, MaskedLinear) and down.reduction.out_group == "stages.1.embed"
        assert isinstance(down.norm, MaskedLayerNorm)
        assert (
            down.norm.group == "stages.0.embed" and down.norm.repeat == 4
        )  # the 2x2 neighbours side by side
        assert m.norm.group == "stages.1.embed"
    else:
        assert isinstance(m.norm_pre, EmbedMask) and isinstance(m.norm, MaskedLayerNorm)


def test_a_fixed_narrower_group_keeps_its_largest_units():
    space = tiny_vit_space(
        ops=lambda i: ("msa",) if i == 0 else ("skip", "msa"),
        ffn=lambda i, h: FfnChoice(widths=(h // 2,)) if i == 1 else FfnChoice(group=4),
    )
    net = lower(space)
    assert net.fixed.paths() == ["blocks.1.ffn"]
    keep = net.fixed.get("blocks.1.ffn") > 0
    assert int(keep.sum()) == space.plans[1].geom.hidden // 2
    scores = net.unit_scores("blocks.1.ffn")
    assert scores[keep].min() >= scores[~keep].max()  # by L1 magnitude
    assert torch.equal(net.mask("blocks.1.ffn"), keep.float())  # in force from the start ...
    net.set_masks({"blocks.1.ffn": None})
    net.reset()
    assert torch.equal(net.mask("blocks.1.ffn"), keep.float())  # ... and after every reset
    kept = net.kept_for(space.largest())
    assert set(kept) == {"blocks.1.ffn"} and torch.equal(kept["blocks.1.ffn"], keep.nonzero().flatten())
    assert "fixed.blocks__1__ffn" in net.state_dict()  # saved with the supernet


def test_vit_conv_matches_the_reference_construction():
    """conv3x3 from §1's formulas, written with explicit per-head loops, against the module."""
    torch.manual_seed(0)
    net = lower(tiny_vit_space(ops=("conv3x3", "conv5x5", "msa")), alpha=0.7)
    attn = net.rows[1].attn
    with torch.no_grad():
        attn.mix.normal_()
    x = torch.randn(2, 17, 32)  # 1 cls + 4x4 patches, C = 32
    attn.eval().choose(0)  # conv3x3
    out = attn(x)
    h, d, C = attn.num_heads, attn.head_dim, 32
    A5 = torch.softmax(attn.mix.detach() / 0.7, dim=0).view(h, 5, 5)
    A = A5[:, 1:4, 1:4].reshape(h, 9)  # the centre 3x3 of the shared 5x5 mixing matrix
    Wv = attn.qkv.weight[2 * C :].view(h, d, C)
    bv = attn.qkv.bias[2 * C :].view(h, d)
    Wo = attn.proj.weight.view(C, h, d)
    kernel = torch.zeros(d, C, 3, 3)
    bias = torch.zeros(d)
    expand = torch.zeros(C, d)
    for head in range(h):
        for p in range(9):
            kernel[:, :, p // 3, p % 3] += A[head, p] * Wv[head]
            bias += A[head, p] * bv[head]
            expand += A[head, p] * Wo[:, head]
    fmap = x[:, 1:].reshape(2, 4, 4, C).permute(0, 3, 1, 2)
    y = F.relu(attn.bns["conv3x3"](F.conv2d(fmap, kernel, bias, padding=1)))
    y = F.linear(y.permute(0, 2, 3, 1).reshape(2, 16, d), expand, attn.proj.bias)
    torch.testing.assert_close(out[:, 1:], y.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :1], x[:, :1])  # the cls token passes the branch unchanged


def test_swin_convs_run_on_the_full_unshifted_map():
    torch.manual_seed(0)
    net = lower(tiny_swin_space(ops=("skip", "conv3x3", "msa"))).eval()
    block = net.model.layers[0].blocks[1]
    assert any(block.shift_size)  # an odd block: MSA there uses shifted windows
    attn = block.attn
    x = torch.randn(2, 16, 16, 16)
    attn.choose(1)
    kernel, bias, expand = attn.conv_weights(3)
    ref = F.relu(attn.bns["conv3x3"](F.conv2d(x.permute(0, 3, 1, 2), kernel, bias, padding=1)))
    ref = F.linear(ref.permute(0, 2, 3, 1), expand, attn.proj.bias)
    torch.testing.assert_close(block._attn(x), ref)
    attn.choose(0)
    assert torch.equal(block._attn(x), torch.zeros_like(x))  # skip contributes zero
    attn.choose(2)  # msa: timm's own shifted-window path, unchanged
    twin = dense_twin(net).layers[0].blocks[1]
    with torch.no_grad():
        assert (block._attn(x) - twin._attn(x)).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "name,model", [("vit", "deit_small_patch16_224"), ("swin", "swin_tiny_patch4_window7_224")]
)
def test_real_shapes_on_the_meta_device(name, model):
    space = make_space(resolve(model), ALL_OPS, nested_ffn)
    net = lower(space, device="meta").eval()
    assert net.rows[0].attn.qkv.weight.device.type == "meta"
    y = net(torch.empty(2, 3, 224, 224, device="meta"))
    assert y.shape == (2, 1000)
    b = space.geometry.blocks[0]
    assert net.rows[0].attn.mix.shape == (b.heads, 25)
    gates = SpvitGates(net)
    assert gates.sample_generator is None
    gates.draw(net, training=True)  # no host sync on meta: every block stays at msa
    assert all(r.attn.op == "msa" for r in net.rows)
    assert net(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 1000)


@pytest.mark.parametrize("gate_last", [False, True])
def test_a_packed_glu_masks_each_neuron_with_its_two_fc1_rows(gate_last: bool) -> None:
    """timm's GluMlp (SwiGLUPacked: SiLU on fc1's first half; gate_last: on the second): a batch-wide or per-sample
    neuron mask equals zeroing fc2's columns of the dropped neurons; the importance reads both fc1 rows."""
    from timm.layers import GluMlp

    torch.manual_seed(0)
    mlp = GluMlp(8, 12, act_layer=torch.nn.SiLU, gate_last=gate_last)
    dense = GluMlp(8, 12, act_layer=torch.nn.SiLU, gate_last=gate_last)
    dense.load_state_dict(mlp.state_dict())
    board = MaskBoard()
    gated = GatedMlp(mlp, "blocks.0.ffn", board, FfnGroups(ffn="blocks.0.ffn"))
    assert (gated.hidden, gated.glu, gated.gate_last) == (6, True, gate_last)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), dense(x), rtol=0, atol=0)
        keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
        board.set("blocks.0.ffn", keep)
        batch = gated(x)
        board.set("blocks.0.ffn", keep.expand(2, 6))
        sample = gated(x)
        dense.fc2.weight.mul_(keep)
        torch.testing.assert_close(batch, dense(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(sample, dense(x), rtol=0, atol=1e-6)
    w1, w2 = mlp.fc1.weight.detach(), mlp.fc2.weight.detach()
    want = torch.stack([torch.cat([w1[j], w1[6 + j]]).norm() * w2[:, j].norm() for j in range(6)])
    torch.testing.assert_close(gated.importance(), want)


def test_check_lowerable_refuses_what_the_supernet_cannot_represent():
    space = tiny_vit_space()
    p = space.plans[0]
    unsorted = dataclasses.replace(p, attention=("msa", "skip"))
    with pytest.raises(ValueError, match="blocks.0.attention.*not sorted"):
        check_lowerable(dataclasses.replace(space, plans=(unsorted,) + space.plans[1:]))
    empty = dataclasses.replace(p, attention=())
    with pytest.raises(ValueError, match="blocks.0.attention: no candidate"):
        check_lowerable(dataclasses.replace(space, plans=(empty,) + space.plans[1:]))
    wide = dataclasses.replace(p, ffn=FfnChoice(widths=(64, 2 * p.geom.hidden)))
    with pytest.raises(ValueError, match="blocks.0.ffn: widths"):
        check_lowerable(dataclasses.replace(space, plans=(wide,) + space.plans[1:]))
    check_lowerable(every_dimension(space.geometry))  # heads, head_dim, density and embed are all lowerable


def _timm_weights(space) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    g = space.geometry
    return timm.create_model(g.model, pretrained=False, **g.kwargs()).state_dict()


@pytest.mark.parametrize("fmt", ["state_dict", "deit_model_key", "safetensors"])
def test_checkpoint_loading_through_timm(tmp_path, fmt):
    space = tiny_distilled_space()
    sd = _timm_weights(space)
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": sd} if fmt == "deit_model_key" else sd, path)
    net = lower(space, weights=str(path))
    for k, v in sd.items():
        assert torch.equal(net.model.state_dict()[k], v), k


def test_checkpoint_errors_are_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found"):
        lower(tiny_vit_space(), weights=str(tmp_path / "missing.pth"))
    other = _timm_weights(tiny_vit_space(embed_dim=64))
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(UsageError) as e:
        lower(tiny_vit_space(), weights=str(tmp_path / "other.pth"))
    assert "does not fit" in str(e.value) and "\n" not in str(e.value)
