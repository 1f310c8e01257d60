"""The unified attention op of the SPViT supernet (lowering stage, torch).

Input: a timm ``Attention`` (ViT/DeiT) or ``WindowAttention`` (Swin) module, the block's candidate ops and its
geometry. Output: one module computing any candidate from the *same* parameters (SPViT §1, single-path weight
sharing):

* ``msa`` — the backbone's own attention, from ``qkv`` and ``proj`` (adopted under their timm names, so a dense
  state dict loads unchanged); Swin keeps its relative position bias and shifted-window mask;
* ``conv{k}x{k}`` — a bottleneck conv built from the value and output projections: ``v`` is the last third of
  ``qkv`` (sliced at run time); a learnable mixing matrix ``mix`` (h × K², K the largest kernel among the
  candidates, initialised to ones) gives ``A = softmax(mix / alpha)`` over heads; kernel position ``p`` (row-major
  in the K × K window) is ``Σ_h A[h,p] · W_v[h]`` with bias ``Σ_h A[h,p] · b_v[h]``; a k × k conv uses the centre
  k × k positions of the same ``mix``, so conv1x1 ⊂ conv3x3 ⊂ conv5x5; the expansion is
  ``Σ_h (Σ_{p in k×k} A[h,p]) · W_o[:,h]`` plus ``proj.bias``; one fresh BatchNorm per conv op, then ReLU;
* ``skip`` — the attention branch contributes zero.

Convs run on the patch-token map: for ViT the prefix (cls/distillation) tokens pass the branch unchanged (as in the
official code); for Swin they run on the full, unshifted (B, H, W, C) map (see :mod:`spvit_dsl.supernet._timm`), during the
search and after it alike.

Only the branch of the selected level is computed. During the search its output is multiplied by the level's
straight-through weight (forward value 1) so the gate logits get gradients; the multiplication is folded into the
branch's final projection (weight and bias scaled), so it stores no extra activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from torch import Tensor, nn

from ..space.ops import OPS
from ..space.plan import BlockGeom

__all__ = ["UnifiedAttention", "gated_linear"]


def gated_linear(z: Tensor, weight: Tensor, bias: Tensor | None, w: Tensor | None) -> Tensor:
    """``w · F.linear(z, weight, bias)`` for a scalar straight-through gate ``w`` (plain ``F.linear`` when None).

    The gate scales the weight and bias, not the output: the same values and gradients, but no extra activation is
    stored for the backward and no extra pass over the activations is made.
    """
    if w is None:
        return F.linear(z, weight, bias)
    w = w.to(weight.dtype)
    return F.linear(z, weight * w, bias * w if bias is not None else None)


def _kernel(op: str) -> int:
    k = OPS.get(op).kernel
    assert k is not None, op
    return k


class UnifiedAttention(nn.Module):
    """One block's attention candidates over shared weights; ``candidates`` are sorted along the single path."""

    def __init__(
        self,
        attn: nn.Module,
        geom: BlockGeom,
        candidates: tuple[str, ...],
        decision: str,
        *,
        alpha: float,
        window: bool,
    ) -> None:
        super().__init__()
        _check_attn(attn, decision)
        self.decision = decision
        self.candidates = tuple(candidates)
        self.window = window  # Swin WindowAttention layout
        self.grid = geom.grid
        self.prefix = geom.prefix_tokens
        self.alpha = float(alpha)
        self.num_heads: int = attn.num_heads
        self.qkv: nn.Linear = attn.qkv
        self.proj: nn.Linear = attn.proj
        self.head_dim = self.qkv.out_features // (3 * self.num_heads)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.fused_attn: bool = bool(getattr(attn, "fused_attn", True))
        self.attn_drop: nn.Module = attn.attn_drop
        self.proj_drop: nn.Module = attn.proj_drop
        self._adopt_msa_extras(attn)
        self._build_convs()
        self._level = len(self.candidates) - 1
        self._weight: Tensor | None = None

    # --- construction ----------------------------------------------------------------------------------------

    def _adopt_msa_extras(self, attn: nn.Module) -> None:
        if self.window:
            self.window_size: tuple[int, int] = tuple(attn.window_size)  # type: ignore[assignment]
            self.window_area = self.window_size[0] * self.window_size[1]
            self.relative_position_bias_table = attn.relative_position_bias_table
            self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        else:
            self.q_norm: nn.Module = attn.q_norm
            self.k_norm: nn.Module = attn.k_norm
            self.norm: nn.Module = attn.norm

    def _build_convs(self) -> None:
        kernels = [_kernel(op) for op in self.candidates if op not in ("skip", "msa")]
        self.max_kernel = max(kernels, default=0)
        ref = self.qkv.weight
        if kernels:
            self.mix = nn.Parameter(
                torch.ones(self.num_heads, self.max_kernel**2, device=ref.device, dtype=ref.dtype)
            )
        bns = {
            op: nn.BatchNorm2d(self.head_dim, device=ref.device, dtype=ref.dtype)
            for op in self.candidates
            if op not in ("skip", "msa")
        }
        self.bns = nn.ModuleDict(bns)

    # --- the choice of the next forward ----------------------------------------------------------------------

    def choose(self, level: int, weight: Tensor | None = None) -> None:
        """Select the candidate the next forward computes, with its straight-through weight (None: plain)."""
        if not 0 <= level < len(self.candidates):
            raise ValueError(f"{self.decision}: level {level} out of range for {self.candidates}")
        self._level = level
        self._weight = weight

    @property
    def op(self) -> str:
        return self.candidates[self._level]

    # --- forward ---------------------------------------------------------------------------------------------

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, mask: Tensor | None = None
    ) -> Tensor:
        """ViT: ``x`` is (B, N, C) tokens. Swin: ``x`` is (B·nW, window area, C) windows (msa only; convs and skip
        of a Swin block go through :meth:`forward_map`)."""
        op = self.op
        if op == "msa":
            if self.window:
                return self._window_msa(x, mask)
            return self._msa(x, attn_mask, is_causal)
        if self.window:
            raise RuntimeError(f"{self.decision}: Swin conv/skip levels run on the full map (forward_map)")
        if op == "skip":
            return torch.zeros_like(x)
        B, N, C = x.shape
        H, W = self.grid
        patches = x[:, self.prefix :].reshape(B, H, W, C)
        out = self._conv(patches, op).reshape(B, H * W, C)
        if self.prefix == 0:
            return out
        head = x[:, : self.prefix]
        if self._weight is not None:
            head = head * self._weight.to(head.dtype)
        return torch.cat([head, out], dim=1)

    def forward_map(self, x: Tensor) -> Tensor:
        """A conv or skip level on a full (B, H, W, C) map (Swin)."""
        if self.op == "skip":
            return torch.zeros_like(x)
        return self._conv(x, self.op)

    # --- the candidates --------------------------------------------------------------------------------------

    def _msa(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0  # type: ignore[attr-defined]
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(gated_linear(x, self.proj.weight, self.proj.bias, self._weight))

    def _rel_pos_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def _window_msa(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B_, N, _ = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            bias = self._rel_pos_bias()
            if mask is not None:
                nw = mask.shape[0]
                bias = bias + mask.view(1, nw, 1, N, N).expand(B_ // nw, -1, h, -1, -1).reshape(-1, h, N, N)
            dropout = self.attn_drop.p if self.training else 0.0  # type: ignore[attr-defined]
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + self._rel_pos_bias()
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(-1, nw, h, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, h, N, N)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(gated_linear(x, self.proj.weight, self.proj.bias, self._weight))

    def head_mix(self, k: int) -> Tensor:
        """``A`` restricted to the centre k × k positions: (heads, k²)."""
        K = self.max_kernel
        A = torch.softmax(self.mix / self.alpha, dim=0).view(self.num_heads, K, K)
        o = (K - k) // 2
        return A[:, o : o + k, o : o + k].reshape(self.num_heads, k * k)

    def conv_weights(self, k: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """(kernel (d, C, k, k), kernel bias (d,) or None, expansion (C, d)) of the k × k bottleneck conv.

        Mixed by broadcasting, not by a matmul: this is once-per-forward weight preparation whose cost does not
        grow with the batch, and it stays out of FLOP counts of the per-image network (docs/supernet.md).
        """
        h, d = self.num_heads, self.head_dim
        A = self.head_mix(k)  # (h, k²)
        w_v = self.qkv.weight[2 * self.attn_dim :].view(h, d, -1)  # (h, d, C)
        kernel = (A.t()[:, :, None, None] * w_v[None]).sum(1)  # (k², d, C)
        kernel = kernel.permute(1, 2, 0).reshape(d, -1, k, k)
        a = A.sum(1)  # (h,): Σ over the kernel positions
        bias = None
        if self.qkv.bias is not None:
            bias = (a[:, None] * self.qkv.bias[2 * self.attn_dim :].view(h, d)).sum(0)
        w_o = self.proj.weight.view(-1, h, d)  # (C, h, d)
        expand = (w_o * a[None, :, None]).sum(1)  # (C, d)
        return kernel, bias, expand

    def _conv(self, x: Tensor, op: str) -> Tensor:
        """Bottleneck conv on a (B, H, W, C) map → (B, H, W, C)."""
        k = _kernel(op)
        kernel, bias, expand = self.conv_weights(k)
        if k == 1:
            # (B, d, H, W) with channels-last strides, as BatchNorm2d wants
            y = F.linear(x, kernel.flatten(1), bias).permute(0, 3, 1, 2)
        else:
            y = F.conv2d(x.permute(0, 3, 1, 2), kernel, bias, padding=k // 2)
        y = F.relu(self.bns[op](y)).permute(0, 2, 3, 1)
        return self.proj_drop(gated_linear(y, expand, self.proj.bias, self._weight))

    def extra_repr(self) -> str:
        s = f"{self.decision}: {' | '.join(self.candidates)}, heads={self.num_heads}, head_dim={self.head_dim}"
        if self.max_kernel:
            s += f", mix={self.num_heads}x{self.max_kernel**2}, alpha={self.alpha:g}"
        return s + (", window" if self.window else "")


def _check_attn(attn: nn.Module, decision: str) -> None:
    if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not isinstance(
        getattr(attn, "proj", None), nn.Linear
    ):
        raise NotImplementedError(
            f"{decision}: unsupported attention {type(attn).__name__} (needs a fused qkv Linear)"
        )
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError(f"{decision}: gated attention (timm 'gated=True') cannot be lowered")
