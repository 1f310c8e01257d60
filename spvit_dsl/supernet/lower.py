"""The *lower* stage: Space → Supernet (torch).

Input: a checked :class:`~spvit_dsl.space.plan.Space` (the backbone's geometry and one plan per block). Output: a
:class:`~spvit_dsl.supernet.Supernet` over the real timm model: ``timm.create_model`` builds the backbone (random init,
pretrained weights from the hub, or a checkpoint file), then each block's attention becomes a
:class:`~spvit_dsl.supernet.UnifiedAttention` over the block's declared candidates (reusing ``qkv``/``proj`` in place) and
each FFN a :class:`~spvit_dsl.supernet.GatedMlp`, with gates only where a decision has more than one candidate.
Implements SPViT's single-path weight sharing (He et al., TPAMI 2024, §1–§2); docs/supernet.md has the design.
"""

from __future__ import annotations

import torch

from ..space.ops import by_level
from ..space.plan import BlockPlan, Convention, Space
from ._timm import backbone_blocks, create_backbone, patch_swin_block
from .attention import UnifiedAttention
from .ffn import GatedMlp
from .gates import FfnGate, OpGate
from .net import BlockRow, GateDict, Supernet

__all__ = ["DEFAULT_ALPHA", "lower"]

# Official temperature of the head-mixing softmax: DeiT's A may sharpen, Swin's stays near uniform.
DEFAULT_ALPHA = {"vit": 1e-2, "swin": 1e2}


def lower(
    space: Space,
    *,
    weights: str = "none",
    convention: Convention = "exact",
    alpha: float | None = None,
    gate_init: float = 1.5,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Supernet:
    """Lower ``space`` to a gated supernet over its timm backbone.

    ``weights``: ``"none"`` (random init), ``"pretrained"`` (timm hub) or a checkpoint path (timm state dict,
    DeiT's ``{'model': ...}`` .pth, ``.safetensors``); a missing or mismatched file is a
    :class:`~spvit_dsl.lang.errors.UsageError`. ``alpha``: mixing-softmax temperature (None or 0: 1e-2 ViT, 1e2 Swin).
    ``gate_init``: initial gate logit. ``seed``: gate-noise seed. ``device``: where to build (``"meta"`` works).
    """
    check_lowerable(space)
    geometry = space.geometry
    model = create_backbone(geometry, weights, device)
    blocks = backbone_blocks(model, geometry.family)
    if len(blocks) != len(space.plans):
        raise ValueError(f"{geometry.model} has {len(blocks)} blocks but the space plans {len(space.plans)}")
    alpha = alpha or DEFAULT_ALPHA[geometry.family]
    gates = GateDict()
    rows = [
        _lower_block(block, plan, geometry.family, alpha, gate_init, gates)
        for block, plan in zip(blocks, space.plans, strict=True)
    ]
    return Supernet(space, model, rows, gates, convention=convention, seed=seed, alpha=alpha)


def check_lowerable(space: Space) -> None:
    """The SPViT supernet searches attention ops and FFN widths only; anything else is NotImplementedError."""
    g = space.geometry
    if len(space.embed) > 1 or (space.embed and space.embed[0] != g.embed_dim):
        raise NotImplementedError(
            f"the spvit supernet cannot search or change the embedding width "
            f"(declared {space.embed}, backbone {g.embed_dim})"
        )
    for p in space.plans:
        b = p.geom
        for name, values, dense in (
            ("heads", p.heads, b.heads),
            ("head_dim", p.head_dim, b.head_dim),
            ("density", p.density, 1.0),
        ):
            if tuple(values) != (dense,):
                raise NotImplementedError(
                    f"blocks.{b.index}.{name}: the spvit supernet supports only the "
                    f"backbone's {name} ({dense}), found {tuple(values)}"
                )
        if not p.attention:
            raise ValueError(f"blocks.{b.index}.attention: no candidate op")
        if tuple(p.attention) != by_level(p.attention):
            raise ValueError(f"blocks.{b.index}.attention: candidates {p.attention} are not sorted by level")
        widths = p.ffn.candidates(b.hidden)
        if not widths or max(widths) > b.hidden or min(widths) < 0:
            raise ValueError(f"blocks.{b.index}.ffn: widths {widths} outside 0..{b.hidden}")


def _lower_block(
    block: torch.nn.Module, plan: BlockPlan, family: str, alpha: float, gate_init: float, gates: GateDict
) -> BlockRow:
    """Swap in the unified attention and the gated MLP; create the block's gates."""
    b = plan.geom
    attn_name, ffn_name = f"blocks.{b.index}.attention", f"blocks.{b.index}.ffn"
    attn = UnifiedAttention(
        block.attn, b, tuple(plan.attention), attn_name, alpha=alpha, window=family == "swin"
    )
    _check_geometry(attn, block, plan)
    mlp = GatedMlp(block.mlp, ffn_name)
    block.attn, block.mlp = attn, mlp
    if family == "swin":
        patch_swin_block(block)
    device = attn.qkv.weight.device
    op_gate = None
    if len(plan.attention) > 1:
        op_gate = OpGate(attn_name, tuple(plan.attention), gate_init).to(device)
        gates[attn_name] = op_gate
    ffn_gate = None
    widths = plan.ffn.candidates(b.hidden)
    importance = mlp.importance()
    if len(widths) > 1:
        ffn_gate = FfnGate(
            ffn_name, b.hidden, plan.ffn, importance if not plan.ffn.granular else None, gate_init
        )
        gates[ffn_name] = ffn_gate.to(device)
    elif widths[0] != b.hidden:
        mlp.set_fixed_keep(_top(importance, widths[0]))
    return BlockRow(plan, attn, mlp, op_gate, ffn_gate)


def _top(importance: torch.Tensor, width: int) -> torch.Tensor:
    order = torch.sort(importance.float(), descending=True, stable=True).indices
    keep = torch.zeros(importance.numel(), dtype=torch.bool, device=importance.device)
    keep[order[:width]] = True
    return keep


def _check_geometry(attn: UnifiedAttention, block: torch.nn.Module, plan: BlockPlan) -> None:
    b = plan.geom
    found = (attn.qkv.in_features, attn.num_heads, attn.head_dim, block.mlp.fc1.out_features)
    if found != (b.dim, b.heads, b.head_dim, b.hidden):
        raise ValueError(
            f"blocks.{b.index}: timm block has (dim, heads, head_dim, hidden) = {found}, "
            f"the space says {(b.dim, b.heads, b.head_dim, b.hidden)}"
        )
