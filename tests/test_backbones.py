"""Backbone resolution: every geometry fact is checked against the real timm modules (built on the meta device)."""

from __future__ import annotations

import pytest
import timm
import torch
from _spaces import every_dimension
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from spvit_dsl.space.backbones import (
    OVERRIDE_KEYS,
    BadOverride,
    UnknownBackbone,
    current_timm_names,
    default_tag,
    refusal,
    resolve,
    supported_names,
    tags,
    timm_names,
)
from spvit_dsl.space.cost import breakdown, dense_arch, dense_cost
from spvit_dsl.space.geometry import CPB_HIDDEN, META_HIDDEN
from spvit_dsl.space.groups import groups
from spvit_dsl.space.plan import Geometry
from spvit_dsl.supernet.lower import lower

TINY_VIT = dict(image=32, patch=4, embed_dim=64, depth=6, heads=2, channels=1, classes=10)
TINY_SWIN = dict(image=32, patch=2, embed_dim=16, depth=(2, 2, 2), heads=(1, 2, 4), window=4, classes=10)
SWIN_CLAMPED = dict(
    image=64, patch=4, embed_dim=16, depth=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=4, mlp_ratio=2
)


def meta_model(g: Geometry) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(g.model, pretrained=False, **g.kwargs())


def check_vit(g: Geometry, m: torch.nn.Module) -> None:
    identity = torch.nn.Identity
    assert g.family == "vit" and g.window_size == 0
    assert m.num_prefix_tokens == g.prefix_tokens
    assert (m.cls_token is not None, m.num_reg_tokens, hasattr(m, "dist_token")) == (
        g.class_token,
        g.reg_tokens,
        g.dist_token,
    )
    assert m.global_pool == g.global_pool and m.no_embed_class == g.no_embed_class
    assert (not isinstance(m.norm_pre, identity), not isinstance(m.norm, identity)) == (
        g.pre_norm,
        g.final_norm,
    )
    assert (not isinstance(m.fc_norm, identity)) == g.fc_norm
    assert m.patch_embed.proj.in_channels == g.in_chans
    assert (m.patch_embed.proj.bias is not None) == g.patch_bias
    assert m.patch_embed.proj.kernel_size == (g.patch_size, g.patch_size)
    assert m.embed_dim == g.embed_dim and len(m.blocks) == g.depth == g.depths[0]
    assert m.num_classes == g.num_classes and m.head.out_features == g.num_classes
    assert m.pos_embed.shape[1] == (g.blocks[0].patches if g.no_embed_class else g.blocks[0].tokens)
    for b, blk in zip(g.blocks, m.blocks, strict=True):
        assert (not isinstance(blk.ls1, identity), blk.attn.qkv.bias is not None) == (
            b.layer_scale,
            b.qkv_bias,
        )
        assert type(blk.mlp.act).__name__ == g.act
        assert tuple(m.patch_embed.grid_size) == b.grid
        assert (b.stage, b.index_in_stage, b.window, b.shift) == (0, b.index, 0, 0)
        assert blk.norm1.normalized_shape == (b.dim,)
        assert (blk.attn.num_heads, blk.attn.head_dim) == (b.heads, b.head_dim)
        assert blk.attn.qkv.in_features == b.dim and blk.attn.qkv.out_features == 3 * b.heads * b.head_dim
        assert blk.mlp.fc2.in_features == b.hidden and blk.mlp.fc2.out_features == b.dim
        # timm's packed SwiGLU: fc1 holds every neuron's value and gate rows, SiLU on the first half
        assert (type(blk.mlp).__name__ == "GluMlp") == b.ffn_glu
        assert blk.mlp.fc1.out_features == b.fc1_per_neuron * b.hidden
        assert not b.ffn_glu or (not blk.mlp.gate_last and g.act == "SiLU")


def check_swin(g: Geometry, m: torch.nn.Module) -> None:
    assert g.family == "swin" and g.prefix_tokens == 0
    assert m.patch_embed.proj.in_channels == g.in_chans
    assert m.patch_embed.proj.kernel_size == (g.patch_size, g.patch_size)
    assert m.num_classes == g.num_classes and m.head.fc.out_features == g.num_classes
    assert m.num_features == g.num_features
    if g.swin_v2_cr:
        check_swin_v2_cr(g, m)
        return
    timm_blocks = [(s, i, blk) for s, layer in enumerate(m.layers) for i, blk in enumerate(layer.blocks)]
    assert len(timm_blocks) == g.depth and tuple(len(layer.blocks) for layer in m.layers) == g.depths
    for b, (s, i, blk) in zip(g.blocks, timm_blocks, strict=True):
        assert (b.stage, b.index_in_stage, b.prefix_tokens) == (s, i, 0)
        assert blk.dim == b.dim and tuple(blk.input_resolution) == b.grid
        assert blk.window_size == (b.window, b.window) and blk.shift_size == (b.shift, b.shift)
        assert blk.attn.num_heads == b.heads and blk.attn.qkv.out_features == 3 * b.heads * b.head_dim
        assert blk.mlp.fc1.out_features == b.hidden
        assert b.swin_v2 == g.swin_v2 and not b.swin_v2_cr and not b.extra_norm
        if g.swin_v2:  # scaled cosine attention: q/v biases, a logit scale and the position-bias MLP per head
            assert blk.attn.qkv.bias is None and blk.attn.q_bias.shape == blk.attn.v_bias.shape == (b.dim,)
            assert blk.attn.logit_scale.shape == (b.heads, 1, 1)
            assert (
                blk.attn.cpb_mlp[0].out_features == CPB_HIDDEN and blk.attn.cpb_mlp[2].out_features == b.heads
            )
            assert not hasattr(blk.attn, "relative_position_bias_table")
    assert type(m).__name__ == ("SwinTransformerV2" if g.swin_v2 else "SwinTransformer")
    for s, layer in enumerate(m.layers[1:], 1):  # v2 normalises the merged map after its reduction, v1 before
        norm = layer.downsample.norm.normalized_shape[0]
        assert norm == (g.stage_dim(s) if g.swin_v2 else 4 * g.stage_dim(s - 1))
    assert g.final_norm and not isinstance(m.norm, torch.nn.Identity)


def check_swin_v2_cr(g: Geometry, m: torch.nn.Module) -> None:
    """timm's SwinV2-CR: blocks at ``stages.{s}.blocks.{j}``, a fused qkv bias, a logit scale of shape (heads,), the
    pairwise position-bias MLP ``meta_mlp`` (2 → 384 → heads), ``norm3`` where the geometry says, v1's merging, no
    final norm."""
    assert type(m).__name__ == "SwinTransformerV2Cr" and g.swin_v2_cr and not g.swin_v2 and not g.final_norm
    assert not hasattr(m, "norm") and tuple(len(stage.blocks) for stage in m.stages) == g.depths
    modules = dict(m.named_modules())
    for b in g.blocks:
        blk = modules[b.module]
        assert (b.prefix_tokens, b.swin_v2, b.swin_v2_cr) == (0, True, True)
        assert blk.dim == b.dim and tuple(blk.feat_size) == b.grid
        assert blk.window_size == (b.window, b.window) and blk.shift_size == (b.shift, b.shift)
        attn = blk.attn
        assert attn.num_heads == b.heads and attn.qkv.out_features == 3 * b.heads * b.head_dim
        assert attn.qkv.bias is not None and attn.logit_scale.shape == (b.heads,)
        assert (attn.meta_mlp.fc1.in_features, attn.meta_mlp.fc1.out_features) == (2, META_HIDDEN)
        assert attn.meta_mlp.fc2.out_features == b.heads and attn.meta_mlp.fc2.bias is not None
        assert blk.mlp.fc1.out_features == b.hidden
        assert (not isinstance(blk.norm3, torch.nn.Identity)) == b.extra_norm
    assert g.blocks[-1].extra_norm  # the last stage always ends with a norm3: the network's final norm
    assert isinstance(m.stages[0].downsample, torch.nn.Identity)
    for s, stage in enumerate(m.stages[1:], 1):  # v1's order: LayerNorm(4C), then the reduction
        assert stage.downsample.norm.normalized_shape == (4 * g.stage_dim(s - 1),)
        assert stage.downsample.reduction.out_features == g.stage_dim(s)


def check(g: Geometry) -> None:
    m = meta_model(g)
    (check_swin if g.family == "swin" else check_vit)(g, m)
    assert [b.index for b in g.blocks] == list(range(g.depth))


# --- the name list -------------------------------------------------------------------------------------------


def test_snapshot_equals_installed_timm():
    """Names and tags here; every fact of every supported name in test_every_supported_name_matches_timm."""
    import timm.models

    assert timm_names() == current_timm_names()
    for n in timm_names():  # in timm's order: its default tag first
        cfgs = timm.models.get_arch_pretrained_cfgs(n).values()
        assert list(tags(n).items()) == [(c.tag or "", int(c.num_classes or 0)) for c in cfgs]
        assert default_tag(n) == (timm.models.get_pretrained_cfg(n).tag or "")
    assert (
        "swinv2_tiny_window8_256" in timm_names()
    )  # the snapshot covers every pattern, not only supported ones


def test_supported_names_cover_the_families():
    names = set(supported_names())
    assert {
        "deit_tiny_patch16_224",
        "deit_base_distilled_patch16_384",
        "deit3_small_patch16_224",  # layer scale
        "vit_huge_patch14_224",
        "vit_base_patch16_clip_224",  # pre-norm
        "vit_base_patch16_clip_quickgelu_224",
        "vit_base_patch16_siglip_gap_224",  # no class token, average pooling
        "vit_small_patch14_dinov2",
        "vit_small_patch14_reg4_dinov2",  # register tokens
        "vit_medium_patch16_reg4_gap_256",
        "vit_so400m_patch14_siglip_gap_224",
        "vit_so150m2_patch16_reg1_gap_256",  # no qkv bias
        "vit_base_patch16_siglip_224",  # attention-pool (MAP) head
        "vit_so400m_patch14_siglip_384",
        "swin_tiny_patch4_window7_224",
        "swin_large_patch4_window12_384",
        "swinv2_tiny_window8_256",
        "swinv2_base_window12to16_192to256",  # pre-trained at window 12, run at window 16
        "swinv2_cr_tiny_ns_224",  # timm's SwinV2-CR, with stage-end norms
        "swinv2_cr_giant_384",
    } <= names
    assert len([n for n in names if n.startswith("swinv2_") and not n.startswith("swinv2_cr_")]) == 12
    assert len([n for n in names if n.startswith("swinv2_cr_")]) == 16
    assert not [n for n in names if "_s3_" in n or "resnet" in n or "_r50_" in n]
    assert names <= set(timm_names())
    assert {
        "vit_giant_patch14_dinov2",
        "vit_giant_patch14_reg4_dinov2",
        "vit_giant_patch14_reg1_tipsv2",
    } <= names
    assert len(names) >= 178
    assert (
        resolve("vit_tiny_patch16_224", {}).tag == "augreg_in21k_ft_in1k"
    )  # timm's default, not the first by name
    assert resolve("vit_tiny_patch16_224", {}).num_classes == 1000


def test_every_refused_name_names_the_missing_feature():
    refused = {n: refusal(n) for n in timm_names() if n not in supported_names()}
    assert refused and all(refused.values())
    assert (
        refusal("vit_base_patch16_siglip_224") is None
    )  # the attention-pool (MAP) head is priced, not pruned
    assert refusal("swinv2_tiny_window8_256") is None and refusal("swinv2_cr_tiny_ns_224") is None
    assert "Swin-S3" in (refusal("swin_s3_tiny_224") or "")
    assert "hybrid" in (refusal("vit_base_r50_s16_384") or "")
    assert "rotary" in (refusal("vit_base_patch16_rope_reg1_gap_256") or "")
    for name, why in refused.items():
        with pytest.raises(UnknownBackbone) as e:
            resolve(name, {})
        assert str(e.value) == f"timm model '{name}' is not supported: spvit-dsl does not lower {why} yet"
        assert all(s in supported_names() for s in e.value.suggestions)  # never a refused name


def _count(g: Geometry) -> tuple[int, int]:
    """(parameters, FlopCounterMode's multiply-adds ÷ 2) of timm's own model, on the meta device."""
    m = meta_model(g).requires_grad_(False)  # FlopCounterMode's module tracker trips on the MAP head's latent
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False  # FlopCounterMode does not see the fused kernel
    x = torch.empty(1, g.in_chans, g.img_size, g.img_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(x)
    return sum(p.numel() for p in m.parameters()), counter.get_total_flops() // 2


@pytest.mark.parametrize("name", supported_names())
def test_every_supported_name_matches_timm(name: str):
    g = resolve(name, {})
    import timm.models

    assert g.model == name and g.kwargs() == {"img_size": g.img_size, "num_classes": g.num_classes}
    assert g.num_classes == (
        timm.models.get_pretrained_cfg(name).num_classes or 1000
    )  # the default tag's head
    check(g)
    params, macs = _count(g)
    assert dense_cost(g, "exact").params == dense_cost(g, "paper").params == params
    assert breakdown(g, dense_arch(g), "exact")["matmul"] == macs
    space = every_dimension(g)  # the supernet lowers with every dimension open (on the meta device)
    net = lower(space, device="meta")
    assert len(net.rows) == g.depth and set(net.groups) == {grp.path for grp in groups(space)}


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_size_tables(name: str):
    g = resolve(name, {})
    assert (g.embed_dim, g.depths, g.num_heads, g.blocks[0].hidden) in {
        ((384, (12,), (6,), 1536)),
        ((192, (12,), (3,), 768)),
    }
    assert g.prefix_tokens == (2 if "distilled" in name else 1)
    assert g.blocks[0].grid == (14, 14) and g.blocks[0].tokens == 196 + g.prefix_tokens


def test_swinv2_geometry_from_the_name():
    """``window12to16_192to256``: pre-trained at window 12 on 192 pixels, runs at window 16 on 256 (timm's factory)."""
    g = resolve("swinv2_base_window12to16_192to256", {})
    assert g.swin_v2 and all(b.swin_v2 for b in g.blocks) and (g.window_size, g.img_size) == (16, 256)
    assert (g.embed_dim, g.depths, g.num_heads) == (128, (2, 2, 18, 2), (4, 8, 16, 32))
    assert [(b.grid[0], b.window, b.shift) for b in g.blocks[:2]] == [(64, 16, 0), (64, 16, 8)]
    assert {(b.grid[0], b.window, b.shift) for b in g.blocks if b.stage == 3} == {(8, 8, 0)}
    assert g.tag == "ms_in22k_ft_in1k" and resolve("swinv2_large_window12_192", {}).num_classes == 21841
    assert not resolve("swin_tiny_patch4_window7_224", {}).swin_v2


def test_swinv2_cr_geometry_from_the_snapshot():
    """timm's SwinV2-CR sizes as its factories set them; norm3 at the stage ends of ``*_ns_*`` names, every sixth
    block of huge/giant and the last block of every name (its final norm)."""
    g = resolve("swinv2_cr_tiny_ns_224", {})
    assert g.swin_v2_cr and not g.swin_v2 and not g.final_norm and g.family == "swin"
    assert all(b.swin_v2 and b.swin_v2_cr for b in g.blocks) and g.tag == "sw_in1k"
    assert (g.embed_dim, g.depths, g.num_heads, g.window_size, g.img_size) == (
        96,
        (2, 2, 6, 2),
        (3, 6, 12, 24),
        7,
        224,
    )
    assert [b.index for b in g.blocks if b.extra_norm] == [1, 3, 9, 11]
    assert g.blocks[0].module == "stages.0.blocks.0" and g.blocks[9].module == "stages.2.blocks.5"
    assert [b.index for b in resolve("swinv2_cr_tiny_224", {}).blocks if b.extra_norm] == [11]
    giant = resolve("swinv2_cr_giant_384", {})
    assert [b.index_in_stage for b in giant.blocks if b.extra_norm] == [5, 11, 17, 23, 29, 35, 41, 1]
    assert (giant.embed_dim, giant.window_size, giant.tag) == (512, 12, "untrained")
    assert resolve("swinv2_cr_huge_384", {}).num_heads == (11, 22, 44, 88)
    assert resolve("swinv2_cr_small_ns_256", {}).window_size == 8


def test_swinv2_cr_keeps_the_names_window_and_tells_timm():
    """timm derives a SwinV2-CR window from the image (grid // 8) unless given one; spvit-dsl keeps the name's."""
    assert resolve("swinv2_cr_tiny_224", dict(image=256)).kwargs() == {
        "img_size": 256,
        "num_classes": 1000,
        "window_size": 7,
    }
    assert "window_size" not in resolve("swinv2_cr_tiny_224", dict(image=256, window=8)).kwargs()
    assert resolve("swinv2_cr_tiny_384", dict(image=224)).window_size == 12
    assert resolve("swinv2_cr_tiny_384", dict(image=224)).kwargs()["window_size"] == 12


def test_swin_tiny_geometry():
    g = resolve("swin_tiny_patch4_window7_224", {})
    assert [b.grid[0] for b in g.blocks] == [56] * 2 + [28] * 2 + [14] * 6 + [7] * 2
    assert [b.dim for b in g.blocks] == [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2
    assert [b.shift for b in g.blocks] == [0, 3] * 5 + [0, 0]  # the last stage's window covers its 7x7 grid
    assert all(b.head_dim == 32 for b in g.blocks)


# --- overrides -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("deit_tiny_patch16_224", TINY_VIT),
        ("vit_small_patch16_224", dict(image=48, patch=8, depth=2, classes=3, mlp_ratio=3)),
        ("deit_small_distilled_patch16_224", dict(image=384)),
        ("deit_base_patch16_224", dict(embed_dim=96, heads=4, depth=1, image=32)),
        (
            "vit_so400m_patch14_siglip_gap_224",
            dict(embed_dim=48, heads=2, depth=1, image=28),
        ),  # mlp_ratio 3.7362
        ("vit_small_patch14_reg4_dinov2", dict(image=28, depth=2, global_pool="avg")),
        ("vit_base_patch16_clip_224.openai", dict(image=32, depth=1)),
        # timm's packed SwiGLU: fc1 int(C · 16/3) = 170 wide, 85 neurons; fc1 int(1536 · 4) = 6144, 3072 neurons
        ("vit_giant_patch14_dinov2", dict(image=32, patch=8, embed_dim=32, depth=3, heads=2, classes=10)),
        ("vit_giant_patch14_reg4_dinov2", dict(image=28, depth=2, mlp_ratio=4, global_pool="avg")),
        ("vit_giant_patch14_reg1_tipsv2", dict(image=28, embed_dim=48, heads=2, depth=1)),
        ("swin_tiny_patch4_window7_224", TINY_SWIN),
        ("swin_tiny_patch4_window7_224", SWIN_CLAMPED),
        ("swin_tiny_patch4_window7_224", dict(image=256)),  # a 64x64 grid: windows of 7 padded to 70x70
        ("swin_tiny_patch4_window7_224", dict(window=6)),  # 56 and 28 padded, 14 padded to 18, 7 covered
        ("swin_tiny_patch4_window7_224", dict(image=200)),  # 25x25 merged as 26x26: stage 2 sees 13x13
        (
            "swin_base_patch4_window12_384",
            dict(image=96, embed_dim=16, depth=(1, 1, 2, 1), heads=(1, 1, 2, 2), window=3, channels=4),
        ),
        ("swinv2_tiny_window8_256", TINY_SWIN),
        ("swinv2_tiny_window8_256", dict(image=36, patch=2, embed_dim=8, depth=(2, 2, 1), heads=(1, 2, 2))),
        ("swinv2_base_window12to16_192to256", dict(window=12)),  # the pre-training window
        ("swinv2_small_window16_256", dict(image=200, mlp_ratio=2)),  # 50x50 windows of 16 padded to 64x64
        ("swinv2_large_window12_192.ms_in22k", dict(classes=10, image=96)),
        ("swinv2_cr_tiny_224", TINY_SWIN),
        ("swinv2_cr_tiny_ns_224", dict(image=36, patch=2, embed_dim=8, depth=(2, 2, 1), heads=(1, 2, 2))),
        ("swinv2_cr_tiny_224", dict(image=256)),  # timm would derive windows of 8: the name's 7 is passed
        ("swinv2_cr_base_384", dict(image=224, window=12)),
        ("swinv2_cr_small_ns_256", dict(image=200, mlp_ratio=2)),  # 50x50 windows of 8 padded to 56x56
        ("swinv2_cr_small_224.sw_in1k", dict(classes=10, image=96)),
        # norm3 every sixth block moves with the depth: stage 1's sixth block, stage 2's sixth and twelfth
        ("swinv2_cr_huge_224", dict(image=64, embed_dim=12, depth=(1, 7, 13, 2), heads=(1, 2, 2, 4))),
    ],
)
def test_overrides_build_matching_timm_models(name: str, overrides: dict[str, object]):
    g = resolve(name, overrides)
    check(g)
    assert g.img_size == overrides.get("image", g.img_size)
    import timm.models

    tagged = f"{g.model}.{g.tag}"
    assert g.num_classes == overrides.get(
        "classes", timm.models.get_pretrained_cfg(tagged).num_classes or 1000
    )


def test_tiny_vit_kwargs_name_only_what_differs():
    g = resolve("deit_tiny_patch16_224", TINY_VIT)
    assert g.kwargs() == {
        "img_size": 32,
        "num_classes": 10,
        "patch_size": 4,
        "embed_dim": 64,
        "depth": 6,
        "num_heads": 2,
        "in_chans": 1,
    }
    assert g.blocks[0].grid == (8, 8) and g.blocks[0].head_dim == 32 and g.depth == 6
    same = resolve("deit_tiny_patch16_224", dict(patch=16, embed_dim=192, heads=3, mlp_ratio=4.0, image=224))
    assert same.kwargs() == {"img_size": 224, "num_classes": 1000}


def test_swin_window_clamped_like_timm():
    g = resolve("swin_tiny_patch4_window7_224", SWIN_CLAMPED)
    assert [(b.grid[0], b.window, b.shift) for b in g.blocks] == [
        (16, 4, 0),
        (16, 4, 2),
        (8, 4, 0),
        (8, 4, 2),
        (4, 4, 0),
        (4, 4, 0),
        (2, 2, 0),
        (2, 2, 0),
    ]
    assert g.window_size == 4 and g.kwargs()["window_size"] == 4 and g.kwargs()["depths"] == (2, 2, 2, 2)
    assert g.blocks[0].hidden == 32


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(
        ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224"]
    ),
    image=st.sampled_from([16, 24, 32, 48, 64]),
    patch=st.sampled_from([1, 2, 4]),
    embed=st.sampled_from([4, 8, 12]),
    depth=st.lists(st.integers(1, 2), min_size=1, max_size=4),
    heads=st.lists(st.sampled_from([1, 2, 4]), min_size=4, max_size=4),
    window=st.integers(1, 8),
)
def test_any_swin_resolve_accepts_matches_timm(name, image, patch, embed, depth, heads, window):
    overrides = dict(
        image=image,
        patch=patch,
        embed_dim=embed,
        depth=tuple(depth),
        heads=tuple(heads[: len(depth)]),
        window=window,
    )
    try:
        g = resolve(name, overrides)
    except BadOverride:
        reject()
    check(g)


# --- errors --------------------------------------------------------------------------------------------------


def test_unknown_name_suggests_supported_names_only():
    with pytest.raises(UnknownBackbone) as e:
        resolve("deit_smal_patch16_224", {})
    assert str(e.value) == "unknown backbone 'deit_smal_patch16_224'"
    assert e.value.suggestions[0] == "deit_small_patch16_224"
    assert all(s in supported_names() for s in e.value.suggestions)
    assert "did you mean 'deit_small_patch16_224'" in e.value.hint
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownBackbone, match="unknown backbone 'resnet5'"):
        resolve("resnet5", {})


@pytest.mark.parametrize(
    ("name", "feature"),
    [
        ("eva02_base_patch14_224", "Eva blocks: rotary position embeddings and a SwiGLU FFN"),
        ("eva_giant_patch14_224", "timm's Eva model class"),  # EVA-01: neither rotary embeddings nor SwiGLU
        (
            "vit_base_patch16_rope_reg1_gap_256",
            "Eva blocks: rotary position embeddings yet",
        ),  # no SwiGLU there
        ("beit_base_patch16_224", "relative-position bias"),
        ("xcit_small_12_p16_224", "cross-covariance attention"),
        ("levit_128", "attention bias"),
        ("aimv2_large_patch14_224", "a norm after the patch embedding"),
        ("beit3_base_patch16_224", "q/k or attention-output normalisation"),
        ("flexivit_base", "plain VisionTransformer"),
        ("resnet50", "convolutional network (timm's resnet family)"),
        ("convnext_tiny", "convolutional network (timm's convnext family)"),
    ],
)
def test_a_timm_name_outside_the_families_names_the_missing_feature(name: str, feature: str):
    import timm

    assert timm.is_model(name)
    with pytest.raises(UnknownBackbone) as e:
        resolve(name, {})
    assert str(e.value).startswith(f"timm model '{name}' ") and feature in str(e.value)
    assert "family) is not supported" not in str(e.value)  # the old message named only the family
    assert e.value.timm and not e.value.hint.startswith("did you mean")
    if "plain VisionTransformer" in feature:  # the message says to start from the closest vit_* name: offered
        assert e.value.hint.startswith("the closest supported backbones: 'vit_base_patch")
    if "convolutional network" in feature:  # no ViT is close to a ConvNet
        assert e.value.hint == ""
    assert all(s in supported_names() for s in e.value.suggestions)


@pytest.mark.parametrize(
    "name", ["eva_giant_patch14_224", "eva02_tiny_patch14_224", "aimv2_large_patch14_224"]
)
def test_the_snapshot_reads_the_missing_feature_of_other_vits_from_the_model(name: str):
    """timm's VisionTransformer and Eva networks under other names: the snapshot's phrase is what the model says."""
    from spvit_dsl.space import _timm_snapshot, backbones

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert backbones._raw()["others_refused"][name] == _timm_snapshot._refusal(model)


def test_every_timm_module_without_a_feature_phrase_is_convolutional():
    """A module missing from ``_others._MODULES`` is refused as a convolutional network: its source may define no
    attention, transformer or token-mixer class (byobnet's SelfAttnBlock serves the byoanet family, mapped)."""
    import importlib
    import inspect
    import re

    from spvit_dsl.space import _others, backbones

    modules = set(backbones._others().values())
    assert set(_others._MODULES) <= modules  # no stale entries
    read = {
        backbones._others()[n] for n in backbones._raw()["others_refused"]
    }  # read from the models themselves
    assert read == {"vision_transformer", "eva"}
    for module in sorted(modules - set(_others._MODULES) - read):
        source = inspect.getsource(importlib.import_module(f"timm.models.{module}"))
        found = set(re.findall(r"^class (\w*(?:Attn|Attention|Transformer|Former|Mixer)\w*)", source, re.M))
        assert found <= {"SelfAttnBlock", "ConvMixer"}, (module, found)


def test_unsupported_timm_name():
    with pytest.raises(UnknownBackbone, match="timm model 'swin_s3_tiny_224' is not supported") as e:
        resolve("swin_s3_tiny_224", {})
    assert e.value.suggestions and all(s in supported_names() for s in e.value.suggestions)
    assert "swin_s3_tiny_224" not in e.value.suggestions
    assert e.value.hint.startswith("the closest supported backbones: ")


# --- pretrained tags -------------------------------------------------------------------------------------------


def test_a_tag_selects_its_weights_and_its_class_count():
    import timm.models  # the tag's configuration ships with timm: no network

    for model in (
        "vit_base_patch16_224.augreg_in21k",
        "vit_base_patch16_clip_224.openai",
        "deit3_small_patch16_224",
    ):
        g = resolve(model, {})
        name, _, tag = model.partition(".")
        cfg = timm.models.get_pretrained_cfg(f"{name}.{g.tag}")
        assert g.model == name and (tag == "" or g.tag == tag)
        assert g.num_classes == (cfg.num_classes or 1000)
    assert resolve("vit_base_patch16_224.augreg_in21k", {}).num_classes == 21843
    assert resolve("vit_base_patch16_224", dict(tag="augreg_in21k", classes=10)).num_classes == 10
    same = resolve("vit_base_patch16_224", dict(tag="augreg_in21k"))
    assert same == resolve("vit_base_patch16_224.augreg_in21k", {})


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        (
            "vit_base_patch16_224.augreg_in12k",
            {},
            "timm has no pretrained tag 'augreg_in12k' for vit_base_patch16_224",
        ),
        (
            "vit_base_patch16_224.augreg_in1k",
            dict(tag="mae"),
            "the backbone name already says tag 'augreg_in1k'",
        ),
        ("vit_base_patch16_224", dict(tag=3), "tag must be a pretrained tag name, found 3"),
    ],
)
def test_bad_tags(model: str, overrides: dict[str, object], message: str):
    with pytest.raises(BadOverride) as e:
        resolve(model, overrides)
    assert e.value.key == "tag" and str(e.value) == message


def test_pattern_name_timm_lacks():
    with pytest.raises(UnknownBackbone, match="'deit_small_patch16_384' is not a timm model") as e:
        resolve("deit_small_patch16_384", {})
    assert "deit_small_patch16_224" in e.value.suggestions


@pytest.mark.parametrize(
    "name, overrides, key, message",
    [
        ("deit_tiny_patch16_224", dict(imgae=32), "imgae", "unknown backbone override 'imgae'"),
        ("deit_tiny_patch16_224", dict(image=225), "image", "image 225 is not divisible by patch 16"),
        ("deit_tiny_patch16_224", dict(patch=15), "patch", "image 224 is not divisible by patch 15"),
        ("deit_tiny_patch16_224", dict(heads=5), "heads", "5 heads do not divide the width 192"),
        ("deit_tiny_patch16_224", dict(embed_dim=100), "embed_dim", "3 heads do not divide the width 100"),
        (
            "deit_tiny_patch16_224",
            dict(depth=(2, 2)),
            "depth",
            "a ViT backbone takes a single depth (the same for every block)",
        ),
        ("deit_tiny_patch16_224", dict(window=7), "window", "window applies to Swin backbones only"),
        ("deit_tiny_patch16_224", dict(global_pool="max"), "global_pool", "global_pool must be token or avg"),
        (
            "vit_base_patch16_siglip_gap_224",
            dict(global_pool="token"),
            "global_pool",
            "vit_base_patch16_siglip_gap_224 has no class token",
        ),
        (
            "deit_tiny_distilled_patch16_224",
            dict(global_pool="avg"),
            "global_pool",
            "a distilled DeiT's heads read",
        ),
        (
            "swin_tiny_patch4_window7_224",
            dict(global_pool="avg"),
            "global_pool",
            "global_pool applies to ViT backbones",
        ),
        (
            "deit_tiny_patch16_224",
            dict(image="224"),
            "image",
            "image must be a positive integer, found '224'",
        ),
        ("deit_tiny_patch16_224", dict(classes=0), "classes", "classes must be a positive integer, found 0"),
        ("deit_tiny_patch16_224", dict(depth=True), "depth", "depth must be a positive integer, found True"),
        ("deit_tiny_patch16_224", dict(mlp_ratio=-1.0), "mlp_ratio", "mlp_ratio must be a positive number"),
        ("deit_tiny_patch16_224", dict(mlp_ratio=0.001), "mlp_ratio", "mlp_ratio 0.001 leaves an empty FFN"),
        (
            "vit_giant_patch14_dinov2",
            dict(embed_dim=34, heads=2),
            "embed_dim",
            "vit_giant_patch14_dinov2's SwiGLU FFN splits fc1's int(34 · 5.33333) = 181 outputs into two equal "
            "halves: the width must be even",
        ),
        (
            "vit_giant_patch14_dinov2",
            dict(mlp_ratio=4.0007),
            "mlp_ratio",
            "vit_giant_patch14_dinov2's SwiGLU FFN splits fc1's int(1536 · 4.0007) = 6145 outputs",
        ),
        (
            "swin_tiny_patch4_window7_224",
            dict(depth=12),
            "depth",
            "a Swin backbone takes one depth per stage",
        ),
        (
            "swin_tiny_patch4_window7_224",
            dict(heads=(3, 6, 12, 25)),
            "heads",
            "25 heads do not divide the width 768 of stage 3",
        ),
        ("swin_tiny_patch4_window7_224", dict(depth=(2, 2)), "depth", "depth has 2 stages but heads has 4"),
    ],
)
def test_bad_overrides(name: str, overrides: dict[str, object], key: str, message: str):
    with pytest.raises(BadOverride) as e:
        resolve(name, overrides)
    assert e.value.key == key
    assert str(e.value).startswith(message)
    assert e.value.on_value == (key != "imgae")
    assert isinstance(e.value, ValueError)


def test_bad_override_hints():
    hints = {}
    for overrides in (dict(imgae=32), dict(image=225), dict(heads=5)):
        with pytest.raises(BadOverride) as e:
            resolve("deit_tiny_patch16_224", overrides)
        hints[next(iter(overrides))] = e.value.hint
    assert hints == {
        "imgae": "did you mean 'image'?",
        "image": "use a multiple of 16, e.g. 224 or 240",
        "heads": "heads must divide the width; divisors: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64",
    }
    assert set(OVERRIDE_KEYS) == {
        "image",
        "classes",
        "channels",
        "embed_dim",
        "depth",
        "heads",
        "patch",
        "window",
        "mlp_ratio",
        "global_pool",
        "tag",
    }


@pytest.mark.parametrize("model", ["vit_" * 5000, "vit_base_patch16_224." + "x" * 100_000])
def test_a_huge_name_or_tag_is_quoted_short(model: str):
    with pytest.raises((UnknownBackbone, BadOverride)) as e:
        resolve(model, {})
    assert len(str(e.value)) < 200 and "…" in str(e.value)


def test_the_attention_pool_may_be_restated_and_its_hint_keeps_it():
    assert resolve("vit_base_patch16_siglip_224", dict(global_pool="map")).global_pool == "map"
    with pytest.raises(BadOverride) as e:
        resolve("vit_base_patch16_siglip_224", dict(global_pool="token"))
    assert e.value.hint == "keep global_pool = map (its attention pool), or use avg"
    with pytest.raises(BadOverride, match="global_pool must be token or avg, found 'map'"):
        resolve("deit_tiny_patch16_224", dict(global_pool="map"))  # a name's own pooling only


def test_a_divisibility_hint_stays_within_the_bounds():
    with pytest.raises(BadOverride) as e:
        resolve("vit_base_patch16_224", dict(image=16384, patch=14))
    assert e.value.hint == "use a multiple of 14, e.g. 16380"
