"""The compact network's shape (build stage, torch): Geometry + FrozenArch → a timm model with compact blocks.

Input: the dense backbone's :class:`~spvit_dsl.space.plan.Geometry` and one point :class:`~spvit_dsl.space.plan.FrozenArch`.
Output: ``timm.create_model(geometry.model, pretrained=False, **geometry.kwargs())`` with each block rebuilt for its
choices (randomly initialised; :mod:`spvit_dsl.compact.build` fills the weights):

* ``msa`` — timm's own attention, untouched; ``conv{k}x{k}`` — a :class:`~.modules.ConvBranch` with the block's dense
  per-head width ``d`` as bottleneck; ``skip`` — a :class:`~.modules.SkipBranch` (no parameters);
* FFN width ``w`` — timm's ``Mlp`` with ``fc1 = Linear(C, w)`` and ``fc2 = Linear(w, C)``; width 0 —
  :class:`~.modules.FfnBias` (fc2's bias only).

The result keeps timm's interface (``forward_features``, ``forward_head``, ``num_classes``, ``reset_classifier``) and
carries ``spvit_geometry`` and ``spvit_arch`` attributes. Its parameter count is ``cost.arch_cost(...).params``.
"""

from __future__ import annotations

from contextlib import nullcontext

import timm
import torch
from timm.layers import use_fused_attn
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

from ..lang.errors import UsageError
from ..space.ops import OPS
from ..space.plan import BlockArch, BlockGeom, FrozenArch, Geometry
from .modules import CompactBlock, CompactSwinBlock, ConvBranch, FfnBias, SkipBranch

__all__ = ["block_modules", "check_buildable", "create_compact", "create_dense", "fuse_window_attention"]


def check_buildable(geometry: Geometry, arch: FrozenArch) -> None:
    """Raise :class:`UsageError` for choices the compact builder cannot realise (yet)."""
    if len(arch.blocks) != geometry.depth:
        raise UsageError(
            f"the architecture has {len(arch.blocks)} blocks but {geometry.model} has {geometry.depth}"
        )
    if arch.embed != geometry.embed_dim:
        raise UsageError(
            f"build cannot change the embedding width yet (frozen {arch.embed}, backbone "
            f"{geometry.embed_dim})"
        )
    for b, a in zip(geometry.blocks, arch.blocks, strict=True):
        where = f"blocks[{b.index}]"
        if a.heads != b.heads or a.head_dim != b.head_dim:
            raise UsageError(
                f"{where}: build supports only the backbone's heads/head_dim ({b.heads}x{b.head_dim}), "
                f"found {a.heads}x{a.head_dim}"
            )
        if a.density != 1.0:
            raise UsageError(f"{where}: build cannot realise weight sparsity (density {a.density:g}) yet")
        if not 0 <= a.ffn <= b.hidden:
            raise UsageError(f"{where}: FFN width {a.ffn} outside 0..{b.hidden}")
        OPS.get(a.op)  # unknown op: the registry's own error


def create_compact(
    geometry: Geometry, arch: FrozenArch, device: torch.device | str | None = None, **timm_kwargs: object
) -> nn.Module:
    """The compact timm model of ``arch`` (random init); ``device="meta"`` builds it without memory.

    ``timm_kwargs`` go to ``timm.create_model`` after the geometry's (training options such as ``drop_path_rate``;
    nothing that changes shapes).
    """
    check_buildable(geometry, arch)
    with torch.device(device) if device is not None else nullcontext():
        model = timm.create_model(geometry.model, pretrained=False, **{**geometry.kwargs(), **timm_kwargs})
        for block, geom, choice in zip(
            block_modules(model, geometry.family), geometry.blocks, arch.blocks, strict=True
        ):
            _rebuild_block(block, geom, choice, geometry.family)
    fuse_window_attention(model)
    model.spvit_geometry = geometry
    model.spvit_arch = arch
    return model


def create_dense(geometry: Geometry, device: torch.device | str | None = None) -> nn.Module:
    """The dense timm backbone of ``geometry`` (random init): what a compact network is measured against."""
    with torch.device(device) if device is not None else nullcontext():
        model = timm.create_model(geometry.model, pretrained=False, **geometry.kwargs())
    return fuse_window_attention(model)


def fuse_window_attention(model: nn.Module) -> nn.Module:
    """Swin's window attention through ``F.scaled_dot_product_attention``, as timm already does for ViT.

    timm 1.0.31 keeps Swin on the unfused path unless ``TIMM_FUSED_ATTN=2`` (an "experimental" flag); the function
    is the same, and on CPU the fused kernel runs the whole network about 1.4x faster, because the 49 × 49 window
    matmuls are far from BLAS-efficient. ``TIMM_FUSED_ATTN=0`` (timm's own switch) still turns it off.
    """
    enabled = use_fused_attn()
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.fused_attn = enabled
    return model


def block_modules(model: nn.Module, family: str) -> list[nn.Module]:
    """The transformer blocks in global order (ViT ``blocks.i``, Swin ``layers.s.blocks.j``)."""
    if family == "swin":
        blocks = [b for stage in model.layers for b in stage.blocks]  # type: ignore[union-attr]
        kind: type = SwinTransformerBlock
    else:
        blocks = list(model.blocks)  # type: ignore[arg-type]
        kind = VitBlock
    bad = [type(b).__name__ for b in blocks if not isinstance(b, kind)]
    if bad:
        raise UsageError(f"cannot build {type(model).__name__}: unsupported block type {bad[0]}")
    return blocks


def _rebuild_block(block: nn.Module, geom: BlockGeom, choice: BlockArch, family: str) -> None:
    block.__class__ = CompactSwinBlock if family == "swin" else CompactBlock
    if choice.op == "skip":
        block.attn = SkipBranch()
    elif choice.op != "msa":
        kernel = OPS.get(choice.op).kernel
        if kernel is None:
            raise UsageError(f"blocks[{geom.index}]: build has no module for op '{choice.op}'")
        drop = float(getattr(block.attn.proj_drop, "p", 0.0))
        block.attn = ConvBranch(
            geom.dim,
            geom.head_dim,
            kernel,
            geom.grid,
            prefix=geom.prefix_tokens,
            layout="map" if family == "swin" else "tokens",
            drop=drop,
        )
    _narrow_mlp(block, choice.ffn)


def _narrow_mlp(block: nn.Module, width: int) -> None:
    mlp = block.mlp
    if width == mlp.fc1.out_features:
        return
    if width == 0:
        block.mlp = FfnBias(mlp.fc2.out_features)
        return
    mlp.fc1 = nn.Linear(mlp.fc1.in_features, width, bias=mlp.fc1.bias is not None)
    mlp.fc2 = nn.Linear(width, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)
