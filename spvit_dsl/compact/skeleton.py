"""The compact network's shape (build stage, torch): Geometry + FrozenArch → a smaller timm model.

Input: the dense backbone's :class:`~spvit_dsl.space.geometry.Geometry` and one point
:class:`~spvit_dsl.space.plan.FrozenArch`. Output: ``timm.create_model`` at the point's residual widths (ViT
``embed_dim=E``; Swin one width per stage) with each block rebuilt for its choices, randomly initialised
(:mod:`spvit_dsl.compact.build` fills the weights):

* ``msa`` — :class:`~.modules.CompactAttention` / :class:`~.modules.CompactWindowAttention`: timm's attention with the
  kept heads × per-head width and the dense network's softmax scale; ``conv{k}x{k}`` — a
  :class:`~.modules.ConvBranch` whose bottleneck is the kept per-head width; ``skip`` — a :class:`~.modules.SkipBranch`
  (no parameters) and no ``norm1``;
* FFN width ``w`` — timm's ``Mlp`` with ``fc1 = Linear(E, w)`` and ``fc2 = Linear(w, E)`` (timm's packed SwiGLU
  ``GluMlp``: ``fc1 = Linear(E, 2w)``, its value and gate halves); width 0 — :class:`~.modules.FfnBias` (fc2's bias
  only).

The result keeps timm's interface (``forward_features``, ``forward_head``, ``num_classes``, ``reset_classifier``) and
carries ``spvit_geometry`` and ``spvit_arch`` attributes. Its parameter count is ``cost.arch_cost(...).params`` for
a dense point (for a sparse one, counted over non-zero weights once the weights are in).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import timm
import torch
from timm.layers import GluMlp, Mlp, use_fused_attn
from timm.layers.attention import Attention
from timm.models.swin_transformer import WindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention
from torch import nn

from ..lang.errors import UsageError
from ..space.geometry import BlockGeom, Geometry
from ..space.ops import OPS
from ..space.plan import BlockArch, FrozenArch
from ..supernet._timm import backbone_blocks, swin_stages
from .modules import (
    CompactAttention,
    CompactBlock,
    CompactSwinBlock,
    CompactSwinV2Block,
    CompactSwinV2CrBlock,
    CompactWindowAttention,
    CompactWindowAttentionV2,
    CompactWindowAttentionV2Cr,
    ConvBranch,
    FfnBias,
    SkipBranch,
)

__all__ = [
    "block_modules",
    "check_buildable",
    "create_compact",
    "create_dense",
    "fuse_window_attention",
    "sparse_layers",
    "sparsify_",
]


def check_buildable(geometry: Geometry, arch: FrozenArch) -> None:
    """Raise :class:`UsageError` for a point the compact builder cannot realise."""
    if len(arch.blocks) != geometry.depth:
        raise UsageError(
            f"the architecture has {len(arch.blocks)} blocks but {geometry.model} has {geometry.depth}"
        )
    if len(arch.embed) != geometry.stages or any(
        not 1 <= e <= d for e, d in zip(arch.embed, geometry.dims, strict=True)
    ):
        raise UsageError(f"embedding widths {arch.embed} do not fit {geometry.model} (dense {geometry.dims})")
    if geometry.global_pool == "map" and arch.embed != geometry.dims:
        raise UsageError(
            f"{geometry.model}'s attention-pool (MAP) head keeps the embedding width {geometry.dims[0]}"
        )
    for b, a in zip(geometry.blocks, arch.blocks, strict=True):
        where = f"blocks[{b.index}]"
        if not (1 <= a.heads <= b.heads and 1 <= a.head_dim <= b.head_dim):
            raise UsageError(
                f"{where}: {a.heads} heads of {a.head_dim} do not fit {b.heads} heads of {b.head_dim}"
            )
        if not 0 <= a.ffn <= b.hidden:
            raise UsageError(f"{where}: FFN width {a.ffn} outside 0..{b.hidden}")
        OPS.get(a.op)  # unknown op: the registry's own error


def _timm_kwargs(geometry: Geometry, arch: FrozenArch) -> dict[str, Any]:
    """The backbone's constructor arguments at the point's residual widths (blocks are rebuilt afterwards; Swin
    stages whose width is not stage 0's times 2^s are resized by :func:`_resize_swin_stages`, since timm 1.0.31
    cannot take per-stage widths)."""
    kwargs = geometry.kwargs()
    if arch.embed != geometry.dims:
        heads: object = (1,) * geometry.stages if geometry.family == "swin" else 1
        kwargs |= {"embed_dim": arch.embed[0], "num_heads": heads}
        # timm's GluMlp needs an even int(E · ratio); every FFN is rebuilt anyway
        if any(b.ffn_glu for b in geometry.blocks):
            kwargs["mlp_ratio"] = 2.0
    return kwargs


def _resize_swin_stages(model: nn.Module, widths: tuple[int, ...]) -> None:
    """Patch merging, the final norm and the head at per-stage widths (blocks are rebuilt by :func:`_rebuild_block`)."""
    from timm.layers import ClassifierHead, trunc_normal_  # noqa: PLC0415
    from timm.models import swin_transformer, swin_transformer_v2, swin_transformer_v2_cr  # noqa: PLC0415

    # the Swin classes resolve() accepts
    assert isinstance(
        model,
        swin_transformer.SwinTransformer
        | swin_transformer_v2.SwinTransformerV2
        | swin_transformer_v2_cr.SwinTransformerV2Cr,
    )
    cr = isinstance(model, swin_transformer_v2_cr.SwinTransformerV2Cr)
    v1 = isinstance(model, swin_transformer.SwinTransformer)
    for s, stage in enumerate(swin_stages(model)):
        if s == 0:
            continue
        down = stage.get_submodule("downsample")  # a PatchMerging in every stage after the first
        reduction, norm = down.get_submodule("reduction"), down.get_submodule("norm")
        assert isinstance(reduction, nn.Linear) and isinstance(norm, nn.LayerNorm)
        if reduction.out_features == widths[s] and reduction.in_features == 4 * widths[s - 1]:
            continue
        if cr:  # timm's SwinV2-CR merging always doubles: resize its two layers (v1's order: norm, reduction)
            down.norm = nn.LayerNorm(4 * widths[s - 1], eps=norm.eps)
            down.reduction = nn.Linear(4 * widths[s - 1], widths[s], bias=False)
        else:
            merging = swin_transformer.PatchMerging if v1 else swin_transformer_v2.PatchMerging
            stage.downsample = merging(widths[s - 1], widths[s], norm_layer=type(norm))
        trunc_normal_(stage.get_submodule("downsample.reduction").weight, std=0.02)
    if model.num_features != widths[-1]:  # timm built the final norm and the head at num_features
        if not cr:  # SwinV2-CR has no final norm (its last block's norm3, rebuilt with the block)
            assert isinstance(model.norm, nn.LayerNorm)
            model.norm = nn.LayerNorm(widths[-1], eps=model.norm.eps)
        head = model.head
        model.head = ClassifierHead(
            widths[-1],
            model.num_classes,
            pool_type="avg" if cr else str(model.global_pool),
            input_fmt="NCHW" if cr else "NHWC",
        )
        model.head.drop = head.drop
        if isinstance(model.head.fc, nn.Linear):
            trunc_normal_(model.head.fc.weight, std=0.02)
            nn.init.zeros_(model.head.fc.bias)
        model.num_features = model.head_hidden_size = widths[-1]


def create_compact(
    geometry: Geometry, arch: FrozenArch, device: torch.device | str | None = None, **timm_kwargs: Any
) -> nn.Module:
    """The compact timm model of ``arch`` (random init); ``device="meta"`` builds it without memory.

    ``timm_kwargs`` go to ``timm.create_model`` after the geometry's (training options such as ``drop_path_rate``;
    nothing that changes shapes).
    """
    check_buildable(geometry, arch)
    with torch.device(device) if device is not None else nullcontext():
        model = timm.create_model(
            geometry.model, pretrained=False, **{**_timm_kwargs(geometry, arch), **timm_kwargs}
        )
        if geometry.family == "swin":
            _resize_swin_stages(model, arch.embed)
        for block, geom, choice in zip(
            block_modules(model, geometry.family), geometry.blocks, arch.blocks, strict=True
        ):
            _rebuild_block(block, geom, choice, arch.embed[geom.stage], geometry.family)
    fuse_window_attention(model)
    # nn.Module.__setattr__ takes any value; its stub only allows Tensor | Module
    model.spvit_geometry = geometry  # type: ignore[assignment]
    model.spvit_arch = arch  # type: ignore[assignment]
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
        if isinstance(m, WindowAttention | CompactWindowAttentionV2 | CompactWindowAttentionV2Cr):
            m.fused_attn = enabled  # type: ignore[misc]  # Final for TorchScript only; timm's own switch
    return model


def block_modules(model: nn.Module, family: str) -> list[nn.Module]:
    """The transformer blocks in global order (ViT ``blocks.i``, Swin ``layers.s.blocks.j``), as lowering lists them
    (:func:`~spvit_dsl.supernet._timm.backbone_blocks`); a block type neither knows is a :class:`UsageError`."""
    try:
        return backbone_blocks(model, family)
    except NotImplementedError as exc:
        raise UsageError(str(exc).replace("cannot lower", "cannot build", 1)) from None


def _rebuild_block(block: nn.Module, geom: BlockGeom, choice: BlockArch, dim: int, family: str) -> None:
    if family != "swin":
        block.__class__ = CompactBlock
    elif geom.swin_v2_cr:
        block.__class__ = CompactSwinV2CrBlock
    elif geom.swin_v2:
        block.__class__ = CompactSwinV2Block
    else:
        block.__class__ = CompactSwinBlock
    for name in ("norm1", "norm2", "norm3"):
        norm = getattr(block, name, None)
        if isinstance(norm, nn.LayerNorm) and norm.normalized_shape[0] != dim:
            setattr(block, name, nn.LayerNorm(dim, eps=norm.eps))
    old = block.attn
    # the attentions of the blocks block_modules accepts (a latency table rebuilds copies of compact blocks)
    assert isinstance(
        old,
        Attention
        | WindowAttention
        | WindowAttentionV2
        | CompactWindowAttentionV2
        | WindowMultiHeadAttention
        | CompactWindowAttentionV2Cr,
    )
    drop = float(getattr(old.proj_drop, "p", 0.0))
    qkv_bias = (old.q_bias if geom.swin_v2 and not geom.swin_v2_cr else old.qkv.bias) is not None
    scale = geom.head_dim**-0.5  # the dense network's, whatever the kept per-head width
    if choice.op == "skip":
        block.attn = SkipBranch()
        block.norm1 = nn.Identity()
        if hasattr(block, "ls1"):
            block.ls1 = nn.Identity()  # the layer scale belongs to the branch it scales
    elif choice.op == "msa":
        if geom.swin_v2_cr:
            block.attn = CompactWindowAttentionV2Cr(dim, choice.heads, choice.head_dim, old, proj_drop=drop)
        elif geom.swin_v2:
            block.attn = CompactWindowAttentionV2(
                dim, choice.heads, choice.head_dim, old, qkv_bias=qkv_bias, proj_drop=drop
            )
        elif family == "swin":
            block.attn = CompactWindowAttention(
                dim,
                choice.heads,
                choice.head_dim,
                geom.window,
                scale=scale,
                qkv_bias=qkv_bias,
                proj_drop=drop,
            )
        else:
            block.attn = CompactAttention(
                dim, choice.heads, choice.head_dim, scale=scale, qkv_bias=qkv_bias, proj_drop=drop
            )
    else:
        kernel = OPS.get(choice.op).kernel
        if kernel is None:
            raise UsageError(f"blocks[{geom.index}]: build has no module for op '{choice.op}'")
        layout = "map" if family == "swin" else "tokens"
        block.attn = ConvBranch(
            dim, choice.head_dim, kernel, geom.grid, prefix=geom.prefix_tokens, layout=layout, drop=drop
        )
    _narrow_mlp(block, dim, choice.ffn)


def _narrow_mlp(block: nn.Module, dim: int, width: int) -> None:
    """The block's FFN at ``width`` neurons over ``dim`` channels: timm's own module with resized fc1/fc2 (a packed
    GLU's fc1 keeps both halves, ``2·width`` rows, which its ``forward`` splits), or :class:`FfnBias` at width 0."""
    mlp = block.mlp
    if width == 0:
        block.mlp = FfnBias(dim)
        return
    assert isinstance(mlp, Mlp | GluMlp)  # the FFNs of the blocks block_modules accepts
    fc1, fc2 = mlp.fc1, mlp.fc2
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)  # timm's MLPs without use_conv
    rows = 2 * width if isinstance(mlp, GluMlp) else width
    if (fc1.in_features, fc1.out_features) == (dim, rows):
        return
    mlp.fc1 = nn.Linear(dim, rows, bias=fc1.bias is not None)
    mlp.fc2 = nn.Linear(width, dim, bias=fc2.bias is not None)


def sparse_layers(model: nn.Module) -> dict[str, tuple[nn.Linear, float]]:
    """The layers of a compact network that its point keeps sparse: module path → (layer, density)."""
    geometry, arch = model.spvit_geometry, model.spvit_arch
    assert isinstance(geometry, Geometry) and isinstance(arch, FrozenArch)  # set by create_compact
    out = {}
    for b, a in zip(geometry.blocks, arch.canonical().blocks, strict=True):
        for layer, suffix in (
            ("qkv", "attn.qkv"),
            ("proj", "attn.proj"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
        ):
            density = a.density.of(layer)
            if density < 1:
                module = model.get_submodule(f"{b.module}.{suffix}")
                assert isinstance(module, nn.Linear)
                out[f"{b.module}.{suffix}"] = (module, density)
    return out


@torch.no_grad()
def sparsify_(model: nn.Module) -> None:
    """Zero all but the ``round(density · n)`` largest-magnitude weights of every sparse layer, in place (a freshly
    initialised sparse network: its non-zero count is the cost model's)."""
    for layer, density in sparse_layers(model).values():
        w = layer.weight
        keep = round(density * w.numel())
        order = torch.sort(w.abs().flatten(), descending=True, stable=True).indices
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[order[:keep]] = True
        w.mul_(mask.view_as(w).to(w.dtype))
