"""Leaf modules and block types of the compact network (build stage, torch).

Input: nothing but shapes; output: plain ``nn.Module`` pieces that a frozen SPViT architecture is made of, with no
gates, no shared supernet weights and no dependency on the search code (He et al., TPAMI 2024, §4: "a finished conv
layer folds into a plain Conv2d(C,d,k) → BN → ReLU → Conv2d(d,C,1)"):

* :class:`ConvBranch` — the attention branch of a ``conv{k}x{k}`` block on the patch-token map;
* :class:`SkipBranch` — the attention branch of a ``skip`` block: it contributes exactly zero (and the compact
  blocks do not even compute ``norm1`` for it);
* :class:`FfnBias` — an FFN kept at width 0: what remains is fc2's bias (the cost model counts it);
* :class:`CompactBlock` / :class:`CompactSwinBlock` — timm's ViT and Swin blocks whose ``forward`` skips the
  attention branch of a skip block and hands the full, unshifted (B, H, W, C) map to a Swin conv branch;
* :class:`CompactAttention` / :class:`CompactWindowAttention` — timm's ``Attention`` / ``WindowAttention`` with an
  explicit head count and per-head width and the *original* softmax scale (UP-ViT and OFB keep ``1/√d`` of the dense
  head width when they prune per-head channels);
* :class:`CompactWindowAttentionV2` / :class:`CompactSwinV2Block` — SwinV2's scaled cosine window attention and
  res-post-norm block (timm's ``swin_transformer_v2``) with any head count and per-head width;
  :class:`CompactWindowAttentionV2Cr` / :class:`CompactSwinV2CrBlock` likewise for timm's SwinV2-CR.

Kept FFNs stay timm's ``Mlp`` (or packed SwiGLU ``GluMlp``) with narrower ``fc1``/``fc2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock
from timm.models.vision_transformer import Block as VitBlock
from torch import Tensor, nn

from ..supernet.attention import window_bias

__all__ = [
    "PREFIX_PASSTHROUGH",
    "CompactAttention",
    "CompactBlock",
    "CompactSwinBlock",
    "CompactSwinV2Block",
    "CompactSwinV2CrBlock",
    "CompactWindowAttention",
    "CompactWindowAttentionV2",
    "CompactWindowAttentionV2Cr",
    "ConvBranch",
    "FfnBias",
    "SkipBranch",
]

# What a conv branch outputs for the prefix (cls/distillation) tokens of a ViT: True = its own input (the tokens
# "pass the branch unchanged", as the official code and spvit_dsl.supernet.UnifiedAttention do), False = zero.
PREFIX_PASSTHROUGH = True


class ConvBranch(nn.Module):
    """``Conv2d(C, d, k, padding=k//2) → BatchNorm2d(d) → ReLU → Conv2d(d, C, 1)`` on the patch-token map.

    ``layout="tokens"`` (ViT): input (B, prefix + H·W, C); the prefix tokens are not on the map (see
    :data:`PREFIX_PASSTHROUGH`). ``layout="map"`` (Swin): input and output (B, H, W, C), the full unshifted map.

    The parameters are those of the plain modules above (``conv``, ``bn``, ``proj``), and so is the function computed,
    but the forward runs channels-last and calls the 1 × 1 convolutions as matrix products on the tokens (``F.linear``
    with the conv weight): for these thin bottlenecks CPU BLAS runs them 2-4x faster than the convolution kernels, and
    no layout copies are needed. BatchNorm2d sees a (B·H·W, d, 1, 1) view: the same per-channel statistics.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        kernel: int,
        grid: tuple[int, int],
        *,
        prefix: int = 0,
        layout: str = "tokens",
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if layout not in ("tokens", "map"):
            raise ValueError(f"unknown layout '{layout}'")
        self.kernel, self.grid, self.prefix, self.layout = kernel, tuple(grid), prefix, layout
        self.conv = nn.Conv2d(dim, bottleneck, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(bottleneck)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(bottleneck, dim, 1)
        self.proj_drop = nn.Dropout(drop)

    def _reduce(self, x: Tensor) -> Tensor:
        """The k × k conv C → d of a (B, H, W, C) map, channels-last: (B, H, W, d)."""
        if self.kernel == 1:
            return F.linear(x, self.conv.weight.flatten(1), self.conv.bias)
        return self.conv(x.permute(0, 3, 1, 2)).permute(
            0, 2, 3, 1
        )  # a channels-last conv: no copies around it

    def _mix(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        y = self._reduce(x)
        B, H, W, d = y.shape
        y = self.act(self.bn(y.reshape(B * H * W, d, 1, 1))).view(B, H, W, d)  # BN2d statistics over B·H·W
        return self.proj_drop(F.linear(y, self.proj.weight.flatten(1), self.proj.bias))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if self.layout == "map":
            return self._mix(x)
        B, N, C = x.shape
        H, W = self.grid
        out = self._mix(x[:, self.prefix :].reshape(B, H, W, C)).reshape(B, H * W, C)
        if self.prefix == 0:
            return out
        head = x[:, : self.prefix] if PREFIX_PASSTHROUGH else x.new_zeros(B, self.prefix, C)
        return torch.cat([head, out], dim=1)

    def extra_repr(self) -> str:
        return (
            f"conv{self.kernel}x{self.kernel}, grid={self.grid}, prefix={self.prefix}, layout={self.layout}"
        )


class CompactAttention(Attention):
    """timm's ``Attention`` with ``num_heads`` heads of ``head_dim`` channels over a ``dim``-wide stream, computing
    ``softmax(q·kᵀ · scale)`` with the given ``scale`` (the dense network's), fused or not as timm chooses."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        scale: float,
        qkv_bias: bool,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            attn_head_dim=head_dim,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.scale = scale

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:.6g}"


class CompactWindowAttention(WindowAttention):
    """timm's ``WindowAttention`` with an explicit head count and per-head width and the dense network's scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        window_size: int,
        *,
        scale: float,
        qkv_bias: bool,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            head_dim=head_dim,
            window_size=window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.head_dim, self.scale = head_dim, scale

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        rows, N, _ = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(rows, N, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = window_bias(self._get_rel_pos_bias(), mask, rows)
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale)
        else:
            x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(rows, N, -1)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window_size}, scale={self.scale:.6g}"


def _cosine_attention(
    attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, bias: Tensor, mask: Tensor | None
) -> Tensor:
    """SwinV2's scaled cosine attention over windows (timm's two SwinV2 window attentions compute the same):
    ``softmax(cos(q, k) · exp(min(logit_scale, ln 100)) + bias + mask) · v``.

    ``q, k, v``: (rows, heads, N, d), rows = B·nW image-major; ``logit_scale``: ``heads`` values (any shape);
    ``bias``: (heads, N, N); ``mask``: the shifted-window mask (nW, N, N) or None. ``attn`` supplies
    ``fused_attn``, ``attn_drop`` and ``training``. Returns (rows, heads, N, d)."""
    rows, h, N, _ = q.shape
    q = F.normalize(q, dim=-1) * torch.clamp(logit_scale.view(h, 1, 1), max=math.log(100.0)).exp()
    k = F.normalize(k, dim=-1)
    attn_bias = window_bias(bias, mask, rows)
    drop = attn.get_submodule("attn_drop")
    if attn.fused_attn:
        p = float(getattr(drop, "p", 0.0)) if attn.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p, scale=1.0)
    return drop((q @ k.transpose(-2, -1) + attn_bias).softmax(dim=-1)) @ v


class CompactWindowAttentionV2(nn.Module):
    """SwinV2's window attention (Liu et al., CVPR 2022; timm's ``swin_transformer_v2.WindowAttention``) with
    ``num_heads`` heads of ``head_dim`` channels over a ``dim``-wide stream.

    Computes ``softmax(cos(q, k) · exp(min(logit_scale, ln 100)) + 16·sigmoid(B) + mask) · v`` per window, ``B`` the
    continuous position bias ``cpb_mlp(relative_coords_table)`` gathered by ``relative_position_index``; ``qkv`` has
    no bias of its own: ``q_bias`` and ``v_bias`` (k has none). The two index buffers are taken from the dense
    block's attention (``like``): they depend on the window and the pre-training window only. Input (B·nW, N, C),
    output the same; parameter names are timm's, so the dense state dict's slices load unchanged.
    """

    relative_coords_table: Tensor
    relative_position_index: Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        like: nn.Module,
        *,
        qkv_bias: bool,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.window_size: tuple[int, int] = tuple(like.window_size)  # type: ignore[arg-type]
        self.fused_attn = use_fused_attn()
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        hidden = like.get_submodule("cpb_mlp.0")
        assert isinstance(hidden, nn.Linear)
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, hidden.out_features, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(hidden.out_features, num_heads, bias=False),
        )
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        for name in ("relative_coords_table", "relative_position_index"):
            self.register_buffer(name, like.get_buffer(name).clone(), persistent=False)

    def _bias(self) -> Tensor:
        """(heads, N, N): ``16·sigmoid`` of the continuous position bias."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        area = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        rows, N, _ = x.shape
        h = self.num_heads
        bias = None
        if self.q_bias is not None and self.v_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = (
            F.linear(x, self.qkv.weight, bias).reshape(rows, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        )
        x = _cosine_attention(self, q, k, v, self.logit_scale, self._bias(), mask)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(rows, N, -1)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window_size}, cosine"


class CompactWindowAttentionV2Cr(nn.Module):
    """timm's SwinV2-CR window attention (``swin_transformer_v2_cr.WindowMultiHeadAttention``) with ``num_heads``
    heads of ``head_dim`` channels over a ``dim``-wide stream: ``softmax(cos(q, k) · exp(min(logit_scale, ln 100)) +
    B + mask) · v``, ``B`` = ``meta_mlp`` (2 → hidden → heads, timm's ``Mlp`` with ReLU and its dropouts) over the log
    coordinates of every pair of window positions (``relative_coordinates_log``, taken from the dense block's attention
    ``like``). ``qkv`` has one fused bias. Input (B·nW, N, C), output the same; timm's parameter names."""

    relative_coordinates_log: Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        like: nn.Module,
        *,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        from timm.layers import Mlp  # noqa: PLC0415

        inner = num_heads * head_dim
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.window_size: tuple[int, int] = tuple(like.window_size)  # type: ignore[arg-type]
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * inner, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        meta = like.get_submodule("meta_mlp")
        fc1 = meta.get_submodule("fc1")
        assert isinstance(fc1, nn.Linear)
        drop = (
            float(getattr(meta.get_submodule("drop1"), "p", 0.0)),
            float(getattr(meta.get_submodule("drop2"), "p", 0.0)),
        )
        self.meta_mlp = Mlp(
            2, hidden_features=fc1.out_features, out_features=num_heads, act_layer=nn.ReLU, drop=drop
        )
        self.logit_scale = nn.Parameter(torch.full((num_heads,), math.log(10.0)))
        self.register_buffer(
            "relative_coordinates_log", like.get_buffer("relative_coordinates_log").clone(), persistent=False
        )

    def _bias(self) -> Tensor:
        """(heads, N, N): the position-bias MLP over every pair of window positions."""
        area = self.window_size[0] * self.window_size[1]
        return (
            self.meta_mlp(self.relative_coordinates_log).transpose(1, 0).reshape(self.num_heads, area, area)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        rows, N, _ = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(rows, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = _cosine_attention(self, q, k, v, self.logit_scale, self._bias(), mask)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(rows, N, -1)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window_size}, cosine, pairwise bias"


class SkipBranch(nn.Module):
    """The attention branch of a ``skip`` block: contributes zero (compact blocks never call it)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return torch.zeros_like(x)


class FfnBias(nn.Module):
    """An FFN kept at width 0: ``fc2(0) = fc2.bias`` for every token (the one parameter the cost model keeps)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        # a fresh (C,) tensor broadcast without a copy (a bare view of the parameter confuses module hooks)
        return (self.bias + 0).expand(x.shape)

    def extra_repr(self) -> str:
        return f"width=0, dim={self.bias.numel()}"


class CompactBlock(VitBlock):
    """timm's ViT block; a skip block has no attention branch at all (``norm1`` is an identity, never run)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not isinstance(self.attn, SkipBranch):
            x = x + self.drop_path1(
                self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
            )
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class CompactSwinBlock(SwinTransformerBlock):
    """timm's Swin block: conv branches see the full unshifted map; skip blocks have no attention branch."""

    def _attn(self, x: Tensor) -> Tensor:
        if isinstance(self.attn, ConvBranch):
            return self.attn(x)
        return super()._attn(x)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        if not isinstance(self.attn, SkipBranch):
            x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class CompactSwinV2Block(SwinTransformerV2Block):
    """timm's SwinV2 block (res-post-norm): conv branches see the full unshifted map; a skip block has no attention
    branch at all (``norm1`` of a zero branch would add its bias: the supernet runs no branch either)."""

    def _attn(self, x: Tensor) -> Tensor:
        if isinstance(self.attn, ConvBranch):
            return self.attn(x)
        return super()._attn(x)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        if not isinstance(self.attn, SkipBranch):
            x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)


class CompactSwinV2CrBlock(SwinTransformerV2CrBlock):
    """timm's SwinV2-CR block (res-post-norm, then its main-branch ``norm3``): conv branches see the full unshifted
    map; a skip block has no attention branch at all."""

    def _shifted_window_attn(self, x: Tensor) -> Tensor:
        if isinstance(self.attn, ConvBranch):
            return self.attn(x)
        return super()._shifted_window_attn(x)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.attn, SkipBranch):
            x = x + self.drop_path1(self.norm1(self._shifted_window_attn(x)))
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return self.norm3(x).reshape(B, H, W, C)
