"""Masked linear layers and LayerNorms as autograd functions that save no weight-sized or extra activation-sized
tensors (lowering stage, torch).

Applying masks with plain tensor ops makes autograd keep every intermediate product: a weight masked by a row mask,
a column mask and a sparsity mask keeps three weight-sized copies until the backward, and a mask-weighted LayerNorm
keeps four activation-sized ones. These functions keep what the unmasked layer keeps (the input, the weight, small
per-token statistics) plus the masks, and recompute the rest in the backward (a few weight-sized passes, negligible
beside the matmuls), so a supernet step with every group's mask active costs about what a dense step costs.

* :func:`masked_linear` — ``y = x (W ⊙ (r ⊗ c) ⊙ E)ᵀ + b ⊙ r`` for a row mask ``r`` (output channels), a column mask
  ``c`` (input channels) and an elementwise mask ``E`` (unstructured sparsity), any of them absent;
* :func:`weighted_layer_norm` — a LayerNorm over the channels a mask ``m`` keeps: mask-weighted mean and variance,
  ``y = m ⊙ (x̂ ⊙ w + b)``; ``m`` is ``(C,)`` or one mask per sample ``(B, C)``.

Both take soft masks and give gradients to every input, masks included (checked by ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["masked_linear", "weighted_layer_norm"]


def _scale_(t: Tensor, row: Tensor | None, col: Tensor | None) -> Tensor:
    """``t ⊙ (row ⊗ col)`` in place."""
    if row is not None:
        t.mul_(row.to(t.dtype)[:, None])
    if col is not None:
        t.mul_(col.to(t.dtype))
    return t


def _masked(weight: Tensor, row: Tensor | None, col: Tensor | None, elem: Tensor | None) -> Tensor:
    """``weight ⊙ (row ⊗ col) ⊙ elem`` in one allocation (the row and column masks applied in place)."""
    return _scale_(weight * elem.to(weight.dtype) if elem is not None else weight.clone(), row, col)


class _MaskedLinear(torch.autograd.Function):
    """``y = x (W ⊙ (r ⊗ c) ⊙ E)ᵀ + b ⊙ r``; saves ``x``, ``W`` and the masks, recomputes the masked weight.

    Gradients with ``G = ∂y-weighted outer product gᵀx`` (the gradient of the masked weight): ``∂W = G ⊙ (r ⊗ c) ⊙ E``,
    ``∂r = (G ⊙ W ⊙ E) c + b ⊙ Σ g``, ``∂c = rᵀ (G ⊙ W ⊙ E)``, ``∂E = G ⊙ W ⊙ (r ⊗ c)``, ``∂b = r ⊙ Σ g``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, row: Tensor | None, col: Tensor | None,
                elem: Tensor | None) -> Tensor:  # fmt: skip
        b = bias * row.to(bias.dtype) if bias is not None and row is not None else bias
        ctx.save_for_backward(x, weight, bias, row, col, elem)
        return F.linear(x, _masked(weight, row, col, elem), b)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, row, col, elem = ctx.saved_tensors
        need_x, need_w, need_b, need_r, need_c, need_e = ctx.needs_input_grad
        dtype = gy.dtype  # autocast: the matmuls ran in the output's dtype
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_w = grad_b = grad_r = grad_c = grad_e = None
        if need_x:
            w = _masked(weight, row, col, elem)
            grad_x = (g2 @ w.to(dtype)).reshape(*gy.shape[:-1], weight.shape[1]).to(x.dtype)
            del w
        if need_w or need_r or need_c or need_e:
            G = (g2.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(weight.dtype)  # ∂ loss / ∂ (masked weight)
            if need_r or need_c or need_e:
                gw = G * weight  # G ⊙ W
                if need_r or need_c:
                    p = gw * elem.to(gw.dtype) if elem is not None else gw  # G ⊙ W ⊙ E
                    if need_r:
                        grad_r = p @ col.to(p.dtype) if col is not None else p.sum(1)
                        if bias is not None:
                            grad_r = grad_r + bias * g2.sum(0).to(bias.dtype)
                        grad_r = grad_r.to(row.dtype)
                    if need_c:
                        grad_c = (row.to(p.dtype) @ p if row is not None else p.sum(0)).to(col.dtype)
                    del p
                if need_e:  # elem is given, so p was a new tensor and gw is free to overwrite
                    grad_e = _scale_(gw, row, col).to(elem.dtype)
                del gw
            if need_w:  # G is not needed any more: the weight's gradient overwrites it
                if elem is not None:
                    G.mul_(elem.to(G.dtype))
                grad_w = _scale_(G, row, col)
        if need_b:
            s = g2.sum(0).to(bias.dtype)
            grad_b = s * row.to(bias.dtype) if row is not None else s
        return grad_x, grad_w, grad_b, grad_r, grad_c, grad_e


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    row: Tensor | None = None,
    col: Tensor | None = None,
    elem: Tensor | None = None,
) -> Tensor:
    """``F.linear(x, weight ⊙ (row ⊗ col) ⊙ elem, bias ⊙ row)``; masks ``None`` are all ones.

    Shapes: ``weight`` (out, in), ``row`` (out,), ``col`` (in,), ``elem`` (out, in), ``x`` (..., in) → (..., out).
    Saves no masked weight for the backward (it is recomputed).
    """
    if row is None and col is None and elem is None:
        return F.linear(x, weight, bias)
    return _MaskedLinear.apply(x, weight, bias, row, col, elem)


class _WeightedLayerNorm(torch.autograd.Function):
    """Rows of ``x`` are tokens (R, C) or, for one mask per sample, (B, T, C); ``m`` broadcasts as (C,) / (B, 1, C).

    Saves the normalised ``x̂`` (in place of the input ``F.layer_norm`` saves: the same memory) and the per-row
    ``1/σ``; the backward needs nothing else. Gradients, with ``a = m / Σm``, ``s = m ⊙ w`` and ``g`` the incoming
    gradient: ``∂x = r ⊙ (g ⊙ s − a·Σ(g ⊙ s) − a ⊙ x̂·Σ(g ⊙ s ⊙ x̂))``; ``∂w = Σ_t g ⊙ x̂ ⊙ m``; ``∂b = Σ_t g ⊙ m``;
    ``∂m = Σ_t g ⊙ (x̂ ⊙ w + b) − (x̂·Σ(g ⊙ s) + ½(x̂² − v/(v+eps))·Σ(g ⊙ s ⊙ x̂)) / Σm`` (the mask moves the mean and
    the variance too).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        shape = x.shape
        per_sample = mask.dim() == 2
        xr = x.reshape(mask.shape[0], -1, shape[-1]) if per_sample else x.reshape(-1, shape[-1])
        m = mask.to(x.dtype)
        mb = m[:, None, :] if per_sample else m  # broadcast against xr
        count = m.sum(-1)  # (B,) or ()
        mcol = m[:, :, None] if per_sample else m  # for matrix-vector products over channels
        cnt = count[:, None] if per_sample else count
        mean = (xr @ mcol).squeeze(-1) / cnt if per_sample else (xr @ m) / count
        xhat = xr - mean[..., None]
        var = ((xhat * xhat) @ mcol).squeeze(-1) / cnt if per_sample else ((xhat * xhat) @ m) / count
        rstd = torch.rsqrt(var + eps)
        xhat.mul_(rstd[..., None])
        scale = mb * weight if weight is not None else mb  # m ⊙ w
        y = torch.addcmul(mb * bias, xhat, scale) if bias is not None else xhat * scale
        ctx.save_for_backward(xhat, mask, weight, bias, rstd)
        ctx.eps, ctx.shape = eps, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        xhat, mask, weight, bias, rstd = ctx.saved_tensors
        need_x, need_m, need_w, need_b, _ = ctx.needs_input_grad
        shape = ctx.shape
        per_sample = mask.dim() == 2
        g = gy.reshape(xhat.shape).to(xhat.dtype)
        m = mask.to(xhat.dtype)
        mb = m[:, None, :] if per_sample else m
        count = m.sum(-1)
        scale = mb * weight if weight is not None else mb.expand(xhat.shape[-1]) if not per_sample else mb
        scol = scale.transpose(-1, -2) if per_sample else scale  # (B, C, 1) for per-sample products
        tokens = 1 if per_sample else 0
        gxh = g * xhat  # the one product of full size every gradient shares
        s1 = (g @ scol).squeeze(-1) if per_sample else g @ scale  # Σ_c g ⊙ s, per row
        s2 = (gxh @ scol).squeeze(-1) if per_sample else gxh @ scale  # Σ_c g ⊙ s ⊙ x̂, per row
        grad_x = grad_m = grad_w = grad_b = None
        gx = gxh.sum(tokens) if (need_w or need_m) else None  # Σ_t g ⊙ x̂
        gs = g.sum(tokens) if (need_b or need_m) else None  # Σ_t g
        if need_w:
            grad_w = (gx * m).sum(0) if per_sample else gx * m
        if need_b:
            grad_b = (gs * m).sum(0) if per_sample else gs * m
        if need_m:
            assert gx is not None and gs is not None  # computed above whenever need_m
            direct = (gx * weight if weight is not None else gx) + (gs * bias if bias is not None else 0.0)
            var_ratio = 1.0 - ctx.eps * rstd * rstd  # v / (v + eps), per row
            sq = xhat * xhat
            if per_sample:
                stats = (s1[:, None, :] @ xhat).squeeze(1) + 0.5 * (s2[:, None, :] @ sq).squeeze(1)
                stats = (stats - 0.5 * (var_ratio * s2).sum(1, keepdim=True)) / count[:, None]
            else:
                stats = (s1 @ xhat + 0.5 * (s2 @ sq) - 0.5 * (var_ratio * s2).sum()) / count
            grad_m = (direct - stats).reshape(mask.shape).to(mask.dtype)
        if need_x:
            a = mb / (count[:, None, None] if per_sample else count)  # m / Σm
            t = torch.addcmul(s1[..., None], xhat, s2[..., None])  # s1 + s2·x̂, per row
            grad = g * scale
            grad.addcmul_(t, a, value=-1.0)  # g ⊙ s − a ⊙ (s1 + s2·x̂)
            grad.mul_(rstd[..., None])
            grad_x = grad.reshape(shape)
        return grad_x, grad_m, grad_w, grad_b, None


def weighted_layer_norm(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """LayerNorm of ``x`` (B, ..., C) over the channels ``mask`` keeps (``(C,)`` or ``(B, C)``), zero elsewhere:
    ``μ = Σ m·x / Σ m``, ``σ² = Σ m·(x − μ)² / Σ m``, ``y = m ⊙ ((x − μ)/√(σ² + eps) ⊙ weight + bias)``."""
    return _WeightedLayerNorm.apply(x, mask, weight, bias, eps)
