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


def _multiplier(row: Tensor | None, col: Tensor | None, elem: Tensor | None, like: Tensor) -> Tensor | None:
    """``(r ⊗ c) ⊙ E`` in ``like``'s dtype (None when no mask is given)."""
    out = None
    if row is not None:
        out = row.to(like.dtype)[:, None]
    if col is not None:
        c = col.to(like.dtype)[None, :]
        out = c if out is None else out * c
    if elem is not None:
        e = elem.to(like.dtype)
        out = e if out is None else out * e
    return out


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, row: Tensor | None, col: Tensor | None,
                elem: Tensor | None) -> Tensor:  # fmt: skip
        mult = _multiplier(row, col, elem, weight)
        w = weight if mult is None else weight * mult
        b = bias * row.to(bias.dtype) if bias is not None and row is not None else bias
        ctx.save_for_backward(x, weight, bias, row, col, elem)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, row, col, elem = ctx.saved_tensors
        need_x, need_w, need_b, need_r, need_c, need_e = ctx.needs_input_grad
        mult = _multiplier(row, col, elem, weight)
        dtype = gy.dtype  # autocast: the matmuls ran in the output's dtype
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_w = grad_b = grad_r = grad_c = grad_e = None
        if need_x:
            w = weight if mult is None else weight * mult
            grad_x = (g2 @ w.to(dtype)).reshape(*gy.shape[:-1], weight.shape[1]).to(x.dtype)
        if need_w or need_r or need_c or need_e:
            gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(
                weight.dtype
            )  # d loss / d (masked weight)
            if need_w:
                grad_w = gw if mult is None else gw * mult
            if need_r or need_c or need_e:
                gww = gw * weight  # d loss / d multiplier
                if need_e:
                    rc = _multiplier(row, col, None, weight)
                    grad_e = (gww if rc is None else gww * rc).to(elem.dtype)
                if need_r or need_c:
                    if elem is not None:
                        gww = gww * elem.to(gww.dtype)
                    if need_r:
                        grad_r = gww @ col.to(gww.dtype) if col is not None else gww.sum(1)
                        if bias is not None:
                            grad_r = grad_r + bias * g2.sum(0).to(bias.dtype)
                        grad_r = grad_r.to(row.dtype)
                    if need_c:
                        grad_c = (row.to(gww.dtype) @ gww if row is not None else gww.sum(0)).to(col.dtype)
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
    return _MaskedLinear.apply(x, weight, bias, row, col, elem)  # type: ignore[no-any-return]


class _WeightedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        shape = x.shape
        x3 = x.reshape(mask.shape[0] if mask.dim() == 2 else 1, -1, shape[-1])  # (B or 1, T, C)
        m = mask.to(x.dtype).reshape(-1, 1, shape[-1])  # (B or 1, 1, C)
        count = m.sum(-1, keepdim=True)  # (·, 1, 1)
        mean = (x3 * m).sum(-1, keepdim=True) / count
        xc = x3 - mean
        rstd = torch.rsqrt((xc * xc * m).sum(-1, keepdim=True) / count + eps)
        y = xc * rstd
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, mask, weight, bias, mean, rstd)
        ctx.eps = eps
        return (y * m).reshape(shape)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, mask, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_m, need_w, need_b, _ = ctx.needs_input_grad
        shape = x.shape
        x3 = x.reshape(mask.shape[0] if mask.dim() == 2 else 1, -1, shape[-1])
        g = gy.reshape(x3.shape).to(x.dtype)
        m = mask.to(x.dtype).reshape(-1, 1, shape[-1])
        count = m.sum(-1, keepdim=True)
        xhat = (x3 - mean) * rstd
        gm = g * m  # gradient reaching (x̂ ⊙ w + b)
        gxhat = gm * weight if weight is not None else gm
        grad_x = grad_m = grad_w = grad_b = None
        s1 = gxhat.sum(-1, keepdim=True)  # Σ_c g
        s2 = (gxhat * xhat).sum(-1, keepdim=True)  # Σ_c g x̂
        if need_x:
            a = m / count
            grad_x = (rstd * (gxhat - a * s1 - a * xhat * s2)).reshape(shape)
        if need_m:
            affine = xhat * weight if weight is not None else xhat
            if bias is not None:
                affine = affine + bias
            var_ratio = 1.0 - ctx.eps * rstd * rstd  # v / (v + eps)
            stats = -(xhat * s1 + 0.5 * (xhat * xhat - var_ratio) * s2) / count
            per_token = g * affine + stats
            grad_m = per_token.sum(1).reshape(mask.shape).to(mask.dtype)
        if need_w:
            grad_w = (gm * xhat).reshape(-1, shape[-1]).sum(0)
        if need_b:
            grad_b = gm.reshape(-1, shape[-1]).sum(0)
        return grad_x, grad_m, grad_w, grad_b, None


def weighted_layer_norm(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """LayerNorm of ``x`` (B, ..., C) over the channels ``mask`` keeps (``(C,)`` or ``(B, C)``), zero elsewhere:
    ``μ = Σ m·x / Σ m``, ``σ² = Σ m·(x − μ)² / Σ m``, ``y = m ⊙ ((x − μ)/√(σ² + eps) ⊙ weight + bias)``."""
    return _WeightedLayerNorm.apply(x, mask, weight, bias, eps)  # type: ignore[no-any-return]
