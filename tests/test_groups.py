"""The coupled tensor slices of every unit group (space/groups.py) against timm's own models, one tiny configuration
per layout (ViT, distilled DeiT, layer-scale DeiT-III, DINOv2-g's packed SwiGLU FFN, Swin v1, SwinV2, timm's
SwinV2-CR):

* every slice names a tensor of timm's state dict, and its axis holds ``outer · units · inner`` positions;
* every parameter of the model belongs to some group, except the few no group prunes (the classifier's bias, the
  first layer of the SwinV2 and SwinV2-CR position-bias MLPs, shared by every head);
* cutting every embedding width, per-head width and FFN width through the slices gives exactly the state dict of
  timm's model built at the smaller sizes (a strict load).
"""

from __future__ import annotations

import pytest
import timm
import torch

from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.groups import UnitGroup, groups, slices
from spvit_dsl.space.plan import BlockPlan, FfnChoice, Geometry, Space

# name → (timm model, overrides, overrides of the same backbone at half the widths)
LAYOUTS: dict[str, tuple[str, dict[str, object], dict[str, object]]] = {
    "vit": (
        "deit_tiny_patch16_224",
        dict(image=32, patch=8, embed_dim=32, depth=2, heads=2),
        dict(embed_dim=16),
    ),
    "distilled": (
        "deit_tiny_distilled_patch16_224",
        dict(image=32, patch=8, embed_dim=32, depth=2, heads=2),
        dict(embed_dim=16),
    ),
    "deit3": (
        "deit3_small_patch16_224",
        dict(image=32, patch=8, embed_dim=32, depth=2, heads=2),
        dict(embed_dim=16),
    ),
    "swiglu": (  # fc1 int(48 · 16/3) = 256 rows: 128 neurons of a value and a gate row each; 64 at width 24
        "vit_giant_patch14_dinov2",
        dict(image=32, patch=8, embed_dim=48, depth=2, heads=2),
        dict(embed_dim=24),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(image=36, patch=2, embed_dim=16, depth=(2, 2, 1), heads=(1, 2, 2), window=4, classes=10),
        dict(embed_dim=8),
    ),
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(image=36, patch=2, embed_dim=16, depth=(2, 2, 1), heads=(1, 2, 2), window=4, classes=10),
        dict(embed_dim=8),
    ),
    "swinv2_cr": (  # stage-end norm3s in every stage
        "swinv2_cr_tiny_ns_224",
        dict(image=36, patch=2, embed_dim=16, depth=(2, 2, 1), heads=(1, 2, 2), window=4, classes=10),
        dict(embed_dim=8),
    ),
}
# parameters no unit group owns (ViT: ``head.bias``; Swin: ``head.fc.bias``; SwinV2: ``cpb_mlp.0``, 2 → 512;
# SwinV2-CR: ``meta_mlp.fc1``, 2 → 384)
UNOWNED = (
    "head.bias",
    "head_dist.bias",
    "head.fc.bias",
    "attn.cpb_mlp.0.weight",
    "attn.cpb_mlp.0.bias",
    "attn.meta_mlp.fc1.weight",
    "attn.meta_mlp.fc1.bias",
)


def _every_dimension(g: Geometry) -> Space:
    plans = tuple(
        BlockPlan(
            b, ("msa",), FfnChoice(group=1), tuple(range(1, b.heads + 1)), tuple(range(1, b.head_dim + 1))
        )
        for b in g.blocks
    )
    return Space(g, plans, tuple(tuple(range(1, d + 1)) for d in g.dims))


def _state(g: Geometry) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(g.model, pretrained=False, **g.kwargs()).state_dict()


def _structured(g: Geometry) -> list[UnitGroup]:
    return [grp for grp in groups(_every_dimension(g)) if grp.structured]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_slice_is_a_tensor_axis_of_the_right_length(layout: str) -> None:
    model, overrides, _ = LAYOUTS[layout]
    g = resolve(model, overrides)
    state = _state(g)
    owned = set()
    for grp in _structured(g):
        for s in slices(g, grp):
            assert s.tensor in state, (grp.path, s.tensor)
            assert state[s.tensor].shape[s.axis] == s.outer * grp.size * s.inner, (grp.path, s)
            owned.add(s.tensor)
    assert sorted(n for n in state if n not in owned and not n.endswith(UNOWNED)) == []


def test_swinv2_slices_name_its_own_tensors() -> None:
    model, overrides, _ = LAYOUTS["swinv2"]
    g = resolve(model, overrides)
    by_path = {grp.path: slices(g, grp) for grp in _structured(g)}
    attn = "layers.1.blocks.0.attn"
    assert [(s.tensor, s.axis, s.outer, s.inner) for s in by_path["blocks.2.heads"]] == [
        (f"{attn}.qkv.weight", 0, 3, 16),
        (f"{attn}.q_bias", 0, 1, 16),
        (f"{attn}.v_bias", 0, 1, 16),
        (f"{attn}.proj.weight", 1, 1, 16),
        (f"{attn}.logit_scale", 0, 1, 1),
        (f"{attn}.cpb_mlp.2.weight", 0, 1, 1),
    ]
    assert [(s.tensor, s.outer) for s in by_path["blocks.2.head_dim"]] == [
        (f"{attn}.qkv.weight", 6),
        (f"{attn}.q_bias", 2),
        (f"{attn}.v_bias", 2),
        (f"{attn}.proj.weight", 2),
    ]
    stage1 = [(s.tensor, s.axis, s.outer) for s in by_path["stages.1.embed"]]
    assert stage1[:3] == [
        ("layers.1.downsample.reduction.weight", 0, 1),
        ("layers.1.downsample.norm.weight", 0, 1),
        ("layers.1.downsample.norm.bias", 0, 1),
    ]
    assert stage1[-1] == (
        "layers.2.downsample.reduction.weight",
        1,
        4,
    )  # no norm over 4C: v2 normalises after
    assert not any("qkv.bias" in t or "relative_position" in t for t, _, _ in stage1)


def test_swinv2_cr_slices_name_its_own_tensors() -> None:
    model, overrides, _ = LAYOUTS["swinv2_cr"]
    g = resolve(model, overrides)
    by_path = {grp.path: slices(g, grp) for grp in _structured(g)}
    attn = "stages.1.blocks.0.attn"
    assert [(s.tensor, s.axis, s.outer, s.inner) for s in by_path["blocks.2.heads"]] == [
        (f"{attn}.qkv.weight", 0, 3, 16),
        (f"{attn}.qkv.bias", 0, 3, 16),
        (f"{attn}.proj.weight", 1, 1, 16),
        (f"{attn}.logit_scale", 0, 1, 1),
        (f"{attn}.meta_mlp.fc2.weight", 0, 1, 1),
        (f"{attn}.meta_mlp.fc2.bias", 0, 1, 1),
    ]
    assert [(s.tensor, s.outer) for s in by_path["blocks.2.head_dim"]] == [
        (f"{attn}.qkv.weight", 6),
        (f"{attn}.qkv.bias", 6),
        (f"{attn}.proj.weight", 2),
    ]
    stage1 = [(s.tensor, s.axis, s.outer) for s in by_path["stages.1.embed"]]
    assert stage1[0] == ("stages.1.downsample.reduction.weight", 0, 1)  # v1's merging: the norm is over 4C
    assert ("stages.1.blocks.1.norm3.weight", 0, 1) in stage1 and (
        "stages.1.blocks.0.norm3.weight",
        0,
        1,
    ) not in stage1
    assert stage1[-3:] == [
        ("stages.2.downsample.norm.weight", 0, 4),
        ("stages.2.downsample.norm.bias", 0, 4),
        ("stages.2.downsample.reduction.weight", 1, 4),
    ]
    last = [s.tensor for s in by_path["stages.2.embed"]]
    assert last[-3:] == ["stages.2.blocks.0.norm3.weight", "stages.2.blocks.0.norm3.bias", "head.fc.weight"]
    assert not any(t.startswith("norm.") or "layers." in t for t in last)


def _cut(state: dict[str, torch.Tensor], g: Geometry, grp: UnitGroup, keep: int) -> None:
    """Keep ``keep`` of the group's units (a random order, as a search ranks them) in every tensor it owns."""
    kept = torch.randperm(grp.size, generator=torch.Generator().manual_seed(len(grp.path)))[:keep].tolist()
    for s in slices(g, grp):
        index = torch.tensor(s.positions(kept, grp.size))
        state[s.tensor] = state[s.tensor].index_select(s.axis, index)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cutting_through_the_slices_gives_timms_smaller_model(layout: str) -> None:
    """Half of every embedding width, per-head width and FFN width (heads kept: timm ties head_dim to C/heads)."""
    model, overrides, half = LAYOUTS[layout]
    g = resolve(model, overrides)
    small = resolve(model, overrides | half)
    state = _state(g)
    for grp in _structured(g):
        if grp.kind != "heads":
            _cut(state, g, grp, grp.size // 2)
    target = timm.create_model(small.model, pretrained=False, **small.kwargs())
    target.load_state_dict(state, strict=True)


def test_a_swiglu_neuron_owns_its_value_and_gate_rows() -> None:
    """timm's packed SwiGLU (``GluMlp``, SiLU on fc1's first half): the FFN cut through the slices to any neurons, in
    any order, computes what the dense FFN computes with the other neurons' fc2 columns zeroed."""
    model, overrides, _ = LAYOUTS["swiglu"]
    g = resolve(model, overrides)
    (grp,) = [grp for grp in _structured(g) if grp.path == "blocks.0.ffn"]
    assert grp.size == g.blocks[0].hidden == 128 and g.blocks[0].ffn_glu
    torch.manual_seed(0)
    dense = timm.create_model(g.model, pretrained=False, **g.kwargs()).blocks[0].mlp
    assert type(dense).__name__ == "GluMlp" and not dense.gate_last
    kept = [5, 127, 0, 64, 63]
    state = {f"blocks.0.mlp.{k}": v for k, v in dense.state_dict().items()}
    for s in slices(g, grp):
        assert s.outer == (2 if ".fc1." in s.tensor else 1)
        state[s.tensor] = state[s.tensor].index_select(s.axis, torch.tensor(s.positions(kept, grp.size)))
    small = type(dense)(48, 2 * len(kept), act_layer=torch.nn.SiLU, gate_last=False)
    small.load_state_dict({k.removeprefix("blocks.0.mlp."): v for k, v in state.items()}, strict=True)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        dense.fc2.weight[:, [j for j in range(grp.size) if j not in kept]] = 0
        torch.testing.assert_close(small(x), dense(x), rtol=0, atol=1e-6)
