"""The *lower* stage: Space → Supernet (torch).

Input: a checked :class:`~spvit_dsl.space.plan.Space` (the backbone's geometry, one plan per block, the embedding
widths of every stage). Output: a :class:`~spvit_dsl.supernet.Supernet` over the real timm model:
``timm.create_model`` builds the backbone (random init, pretrained weights from the hub, or a checkpoint file), then

* each block's attention becomes a :class:`~.attention.UnifiedAttention` over the block's declared ops (reusing
  ``qkv``/``proj`` in place; SPViT's single-path weight sharing, He et al., TPAMI 2024, §1–§2) and each FFN a
  :class:`~.ffn.GatedMlp`;
* every unit group that may keep less than all of its units reads a mask from the shared board; a group whose
  residual channels may shrink also gets LayerNorms that normalise over the kept channels
  (:class:`~.masks.MaskedLayerNorm`), a masked stream start (ViT: after the position embedding; Swin: patch
  embedding's norm and each patch merging's reduction) and masked branch outputs;
* a group fixed below its dense size (``ffn: width 768``) keeps its largest units by L1 magnitude, as a constant mask.

With every mask ``None`` the supernet computes exactly what the dense timm model computes. docs/supernet.md and
docs/unit-groups.md have the design.
"""

from __future__ import annotations

import torch
from torch import nn

from ..space.groups import UnitGroup, block_path, embed_path, groups
from ..space.ops import by_level
from ..space.plan import BlockPlan, Convention, Space
from ._timm import backbone_blocks, create_backbone, patch_swin_block, submodule
from .attention import AttentionGroups, UnifiedAttention
from .ffn import FfnGroups, GatedMlp
from .masks import EmbedMask, MaskBoard, MaskedLayerNorm, MaskedLinear
from .net import BlockRow, Supernet

__all__ = ["DEFAULT_ALPHA", "check_lowerable", "lower"]

# Official temperature of the head-mixing softmax: DeiT's A may sharpen, Swin's stays near uniform.
DEFAULT_ALPHA = {"vit": 1e-2, "swin": 1e2}


def lower(
    space: Space,
    *,
    weights: str = "none",
    convention: Convention = "exact",
    alpha: float | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Supernet:
    """Lower ``space`` to a masked supernet over its timm backbone.

    ``weights``: ``"none"`` (random init), ``"pretrained"`` (timm hub) or a checkpoint path (timm state dict,
    DeiT's ``{'model': ...}`` .pth, ``.safetensors``); a missing or mismatched file is a
    :class:`~spvit_dsl.lang.errors.UsageError`. ``alpha``: mixing-softmax temperature (None or 0: 1e-2 ViT, 1e2
    Swin). ``seed``: recorded for strategies that draw random masks. ``device``: where to build (``"meta"`` works).
    Raises ``NotImplementedError`` for a backbone layout the supernet cannot mask.
    """
    check_lowerable(space)
    geometry = space.geometry
    model = create_backbone(geometry, weights, device)
    blocks = backbone_blocks(model, geometry.family)
    if len(blocks) != len(space.plans):
        raise ValueError(f"{geometry.model} has {len(blocks)} blocks but the space plans {len(space.plans)}")
    alpha = alpha or DEFAULT_ALPHA[geometry.family]
    board = MaskBoard()
    active = _active(space)
    rows = [
        _lower_block(
            block, plan, geometry.family, alpha, board, active, embed_path(geometry, plan.geom.stage)
        )
        for block, plan in zip(blocks, space.plans, strict=True)
    ]
    _mask_stream(model, space, board, active)
    net = Supernet(
        space, model, rows, board, convention=convention, seed=seed, alpha=alpha, masked=frozenset(active)
    )
    _fix_reduced(net)
    return net


def check_lowerable(space: Space) -> None:
    """Refuse plans the supernet cannot represent (ValueError): unsorted or empty op lists, out-of-range widths."""
    for p in space.plans:
        b = p.geom
        if not p.attention:
            raise ValueError(f"blocks.{b.index}.attention: no candidate op")
        if tuple(p.attention) != by_level(p.attention):
            raise ValueError(f"blocks.{b.index}.attention: candidates {p.attention} are not sorted by level")
        widths = p.ffn.candidates(b.hidden)
        if not widths or max(widths) > b.hidden or min(widths) < 0:
            raise ValueError(f"blocks.{b.index}.ffn: widths {widths} outside 0..{b.hidden}")


def _dense_value(group: UnitGroup) -> object:
    return {"attention": group.choices[-1], "weights": 1.0}.get(group.kind, group.size)


def _active(space: Space) -> set[str]:
    """Paths of the groups that may keep less than all of their units (they need masks)."""
    return {g.path for g in groups(space) if g.kind != "attention" and tuple(g.choices) != (_dense_value(g),)}


def _lower_block(
    block: nn.Module,
    plan: BlockPlan,
    family: str,
    alpha: float,
    board: MaskBoard,
    active: set[str],
    embed: str,
) -> BlockRow:
    """Swap in the unified attention and the masked MLP (and masked norms when the stream's width may change)."""
    b = plan.geom
    i = b.index

    def path(kind: str) -> str | None:
        p = embed if kind == "embed" else block_path(i, kind)
        return p if p in active else None

    attn = UnifiedAttention(
        block.get_submodule("attn"),
        b,
        tuple(plan.attention),
        block_path(i, "attention"),
        alpha=alpha,
        window=family == "swin",
        board=board,
        groups=AttentionGroups(path("heads"), path("head_dim"), path("embed"), path("qkv"), path("proj")),
    )
    _check_maskable(attn, plan, path("heads") or path("head_dim"))
    mlp = GatedMlp(
        block.get_submodule("mlp"),
        block_path(i, "ffn"),
        board,
        FfnGroups(path("ffn"), path("embed"), path("fc1"), path("fc2")),
    )
    _check_geometry(attn, mlp, plan)
    block.attn, block.mlp = attn, mlp
    if embed in active:
        block.norm1 = MaskedLayerNorm(submodule(block, "norm1", nn.LayerNorm), board, embed)
        block.norm2 = MaskedLayerNorm(submodule(block, "norm2", nn.LayerNorm), board, embed)
        if b.extra_norm:  # SwinV2-CR's main-branch norm3
            block.norm3 = MaskedLayerNorm(submodule(block, "norm3", nn.LayerNorm), board, embed)
    if family == "swin":
        patch_swin_block(block)
    return BlockRow(plan, attn, mlp)


def _mask_stream(model: nn.Module, space: Space, board: MaskBoard, active: set[str]) -> None:
    """Where a masked residual stream starts and ends: the stem, Swin's patch merging, the final norm."""
    g = space.geometry
    if g.family == "vit":
        if "embed" not in active:
            return
        # the stream starts after the position embedding (patch, class, register tokens): timm's norm_pre
        model.norm_pre = (
            MaskedLayerNorm(submodule(model, "norm_pre", nn.LayerNorm), board, "embed")
            if g.pre_norm
            else EmbedMask(board, "embed")
        )
        if g.final_norm:
            model.norm = MaskedLayerNorm(submodule(model, "norm", nn.LayerNorm), board, "embed")
        if g.fc_norm:
            model.fc_norm = MaskedLayerNorm(submodule(model, "fc_norm", nn.LayerNorm), board, "embed")
        return
    stages = "stages" if g.swin_v2_cr else "layers"
    for s in range(g.stages):
        path = embed_path(g, s)
        if path in active:
            if s == 0:
                patch_embed = model.get_submodule("patch_embed")
                patch_embed.norm = MaskedLayerNorm(submodule(patch_embed, "norm", nn.LayerNorm), board, path)
            elif g.swin_v2:  # SwinV2's merging: reduction, then a norm over this stage's channels
                down = model.get_submodule(f"{stages}.{s}.downsample")
                down.norm = MaskedLayerNorm(submodule(down, "norm", nn.LayerNorm), board, path)
            else:
                down = model.get_submodule(f"{stages}.{s}.downsample")
                down.reduction = MaskedLinear(submodule(down, "reduction", nn.Linear), board, path)
            if s + 1 < g.stages:
                if not g.swin_v2:  # v1 normalises the 2x2 neighbours of this stage before the reduction
                    down = model.get_submodule(f"{stages}.{s + 1}.downsample")
                    down.norm = MaskedLayerNorm(submodule(down, "norm", nn.LayerNorm), board, path, repeat=4)
            elif (
                not g.swin_v2_cr
            ):  # SwinV2-CR has no final norm: its last block's norm3 (masked with the block)
                model.norm = MaskedLayerNorm(submodule(model, "norm", nn.LayerNorm), board, path)


def _fix_reduced(net: Supernet) -> None:
    """Groups with one candidate below the dense size keep their largest units, as constant masks."""
    if next(net.model.parameters()).device.type == "meta":
        return
    fixed = {
        path
        for path, g in net.groups.items()
        if g.kind != "attention" and len(g.choices) == 1 and g.choices[0] != _dense_value(g)
    }
    if not fixed:
        return
    for path, index in net.kept_for(net.space.largest()).items():  # canonical: no masks on layers not run
        if path in fixed:
            net.fixed.set(path, net.mask_of(path, index))
    net.reset()


def _check_geometry(attn: UnifiedAttention, mlp: GatedMlp, plan: BlockPlan) -> None:
    """The timm block has the space's shapes: (dim, heads, head_dim, FFN neurons, fc1 rows, packed GLU or not)."""
    b = plan.geom
    found = (attn.qkv.in_features, attn.num_heads, attn.head_dim, mlp.hidden, mlp.fc1.out_features, mlp.glu)
    want = (b.dim, b.heads, b.head_dim, b.hidden, b.fc1_per_neuron * b.hidden, b.ffn_glu)
    if found != want:
        raise ValueError(
            f"blocks.{b.index}: timm block has (dim, heads, head_dim, hidden, fc1 rows, glu) = {found}, "
            f"the space says {want}"
        )


def _check_maskable(attn: UnifiedAttention, plan: BlockPlan, masked: str | None) -> None:
    if masked is None or attn.window:
        return
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)):
        raise NotImplementedError(
            f"blocks.{plan.geom.index}: heads or per-head widths of an attention with q/k or output norms cannot be "
            "masked"
        )
