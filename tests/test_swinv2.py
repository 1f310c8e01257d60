"""SwinV2 (timm's ``swin_transformer_v2``: res-post-norm blocks, scaled cosine attention, the continuous position
bias, v2 patch merging) and timm's SwinV2-CR (``swin_transformer_v2_cr``: the position-bias MLP over every pair of
window positions, v1 merging, main-branch norms) through the supernet and the compact build, on small padded
configurations (``_frozen.SWINV2_BACKBONE``, ``SWINV2_CR_BACKBONE``). Every compact point equals the masked supernet
and the cost model: tests/test_build_dims.py (its SPECS include both); every timm name: tests/test_backbones.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _frozen import SWINV2_BACKBONE, SWINV2_CR_BACKBONE, images, search_and_build
from _spaces import dense_twin, every_dimension

from spvit_dsl.compact.build import build
from spvit_dsl.compile.program import compile_text
from spvit_dsl.search import run_search
from spvit_dsl.supernet.lower import lower

BACKBONES = {"swinv2": SWINV2_BACKBONE, "swinv2_cr": SWINV2_CR_BACKBONE}
KINDS = pytest.mark.parametrize("kind", sorted(BACKBONES))


def _program(kind: str, tail: str = ""):
    return compile_text(f"{BACKBONES[kind]}\n{tail}", f"/nowhere/{kind}.vit")


def _first_block(net):
    return net.model.get_submodule(net.geometry.blocks[0].module)


def _randomised(net):
    torch.manual_seed(0)
    for p in net.model.parameters():  # trained-looking weights: no zero biases, no unit norms
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@KINDS
def test_the_supernet_with_every_unit_kept_is_the_dense_timm_model(kind: str) -> None:
    geometry = _program(kind).space.geometry
    assert all(b.swin_v2 for b in geometry.blocks)
    assert (geometry.swin_v2, geometry.swin_v2_cr) == (
        (False, True) if kind == "swinv2_cr" else (True, False)
    )
    if kind == "swinv2_cr":  # the "ns" name ends every stage with a main-branch norm
        assert [b.extra_norm for b in geometry.blocks] == [False, True, False, True]
    assert geometry.blocks[0].attention_tokens > geometry.blocks[0].patches  # the windows pad the map
    net = _randomised(lower(every_dimension(geometry)))
    dense = dense_twin(net).eval()
    x = images(geometry)
    with torch.no_grad():
        torch.testing.assert_close(net(x), dense(x), rtol=0, atol=1e-5)


@KINDS
def test_a_post_norm_block_applies_the_level_weight_after_its_norm(kind: str) -> None:
    """SPViT's straight-through level weight must reach the loss: inside the branch, norm1 (a LayerNorm) would cancel
    any scale, so a SwinV2 block multiplies norm1's output (value 1 forward, a real gradient backward)."""
    program = _program(kind, "blocks all { attention: one of {skip, conv3x3, msa} }\n")
    net = _randomised(lower(program.space))
    block = _first_block(net)
    x = torch.randn(2, *program.space.geometry.blocks[0].grid, 16)
    for level in (1, 2):  # conv3x3, msa
        weight = torch.ones((), requires_grad=True)
        net.set_op(0, level, weight)
        out = block(x)
        out.square().sum().backward()
        net.set_op(0, level, None)
        torch.testing.assert_close(out, block(x))  # the forward value is unchanged
        # the reference: x + w · norm1(branch), then the FFN, with the block's own modules
        ref_weight = torch.ones((), requires_grad=True)
        branch = block._shifted_window_attn(x) if kind == "swinv2_cr" else block._attn(x)
        h = (x + ref_weight * block.norm1(branch)).reshape(2, -1, 16)
        (h + block.norm2(block.mlp(h))).square().sum().backward()
        assert weight.grad is not None and ref_weight.grad is not None and abs(float(ref_weight.grad)) > 1e-3
        torch.testing.assert_close(weight.grad, ref_weight.grad)


@KINDS
def test_a_skip_level_adds_nothing_not_norm1_of_zero(kind: str) -> None:
    """x + norm1(0) would add norm1's bias: a skipped SwinV2 attention branch is not run at all."""
    program = _program(kind, "blocks all { attention: one of {skip, msa} }\n")
    net = _randomised(lower(program.space))
    block = _first_block(net)
    net.set_op(0, 0)  # skip
    x = torch.randn(2, *program.space.geometry.blocks[0].grid, 16)
    with torch.no_grad():
        tokens = x.reshape(2, -1, 16)
        want = (tokens + block.norm2(block.mlp(tokens))).reshape(x.shape)
        torch.testing.assert_close(block(x), want)


@KINDS
def test_per_sample_channel_masks_equal_the_batch_wide_mask(kind: str) -> None:
    """Cosine attention normalises q and k over their channels: a removed per-head channel leaves both, whether the
    mask is batch-wide (qkv rows) or per sample (UP-ViT's probes, OFB's scoring)."""
    program = _program(kind, "blocks all { head_dim: 1..8 }\n")
    net = _randomised(lower(program.space))
    g = program.space.geometry
    path = "blocks.0.head_dim"
    mask = torch.ones(g.blocks[0].head_dim)
    mask[[1, 4, 5]] = 0
    x = images(g)
    with torch.no_grad():
        net.set_masks({path: mask})
        batch_wide = net(x)
        net.set_masks({path: mask.expand(x.shape[0], -1).clone()})
        per_sample = net(x)
        net.set_masks({path: None})
        dense = net(x)
    torch.testing.assert_close(per_sample, batch_wide, rtol=0, atol=1e-5)
    assert not torch.allclose(batch_wide, dense, atol=1e-4)


@KINDS
def test_spvit_searches_freezes_and_builds(kind: str, tmp_path: Path) -> None:
    tail = (
        "blocks all { attention: one of {skip, conv3x3, msa}; ffn: groups of 8 }\n"
        "budget { flops <= 70% }\n"
        "search spvit { data = digits; epochs = 1; batch_size = 64 }\n"
    )
    program = compile_text(f"{BACKBONES[kind].replace('{ ', '{ channels = 1; ')}\n{tail}", "/nowhere/v2.vit")
    search_and_build(program, tmp_path)


@KINDS
def test_a_network_exports_to_onnx(kind: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra (onnx, onnxruntime)")
    from spvit_dsl.compact.export import export_onnx, onnx_max_error

    tail = "stage 1 { embed: 16..32 step 8; heads: 1..2 }\nblocks all { ffn: groups of 8 }\nbudget { flops <= 60% }\n"
    tail += "search magnitude { }\n"
    result = run_search(_program(kind, tail), out=str(tmp_path / "run"), quiet=True)
    model = build(result.frozen_path, weights=result.checkpoint_path).eval()
    export_onnx(model, str(tmp_path / "m.onnx"))
    assert onnx_max_error(model, str(tmp_path / "m.onnx")) < 1e-4


@pytest.mark.parametrize(
    ("model", "warns"),
    [
        ("vit_small_patch16_224", False),
        ("swin_tiny_patch4_window7_224", False),
        ("swinv2_tiny_window8_256", False),
        ("swinv2_cr_tiny_ns_224", True),
    ],
)
def test_a_patch_override_warns_only_where_timm_cannot_resample_the_pretrained_patch_embedding(
    model: str, warns: bool
):
    program = compile_text(
        f"backbone {model} {{ weights = pretrained; patch = 8 }}\nblocks all {{ ffn: groups of 96 }}\nbudget {{ flops <= 90% }}\nsearch random {{ }}",
        "/nowhere/patch.vit",
    )
    found = [w for w in program.warnings if w.message.startswith("patch changes the patch embedding")]
    assert bool(found) == warns
    if warns:
        assert (
            found[0].span.line == 1 and "SwinV2-CR checkpoint filter does not resample it" in found[0].message
        )


def test_timm_resamples_the_patch_embedding_of_swinv2_checkpoints_but_not_of_swinv2_cr_ones():
    """The fact the warning above rests on, read from timm (meta-device models, one real weight tensor)."""
    import timm
    from timm.models import swin_transformer_v2, swin_transformer_v2_cr

    checkpoint = {"patch_embed.proj.weight": torch.randn(96, 3, 4, 4)}
    for module, name in (
        (swin_transformer_v2, "swinv2_tiny_window8_256"),
        (swin_transformer_v2_cr, "swinv2_cr_tiny_ns_224"),
    ):
        with torch.device("meta"):
            model = timm.create_model(name, patch_size=8)
        out = module.checkpoint_filter_fn(dict(checkpoint), model)["patch_embed.proj.weight"]
        assert out.shape[-2:] == ((8, 8) if module is swin_transformer_v2 else (4, 4))


def test_a_vit_head_count_override_on_pretrained_weights_warns_that_they_load_into_another_function():
    program = compile_text(
        "backbone vit_small_patch16_224 { weights = pretrained; heads = 3; classes = 10 }\n"
        "blocks all { ffn: groups of 96 }\n"
        "budget { flops <= 90% }\nsearch random { }",
        "/nowhere/heads.vit",
    )
    (found,) = [w for w in program.warnings if w.message.startswith("heads changes")]
    assert "they load" in found.message and "another function" in found.message and found.span.line == 1
    plain = compile_text(
        "backbone vit_small_patch16_224 { weights = none; heads = 3 }\nblocks all { ffn: groups of 96 }\n"
        "budget { flops <= 90% }\nsearch random { }",
        "/nowhere/heads.vit",
    )
    assert not [w for w in plain.warnings if w.message.startswith("heads changes")]
