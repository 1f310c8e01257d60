"""Optimiser parameter groups shared by the search and fine-tuning (runtime, torch).

timm's and DeiT's recipe: AdamW with weight decay on matrices and kernels only; none on 1-D parameters (norms,
biases, BatchNorm) and none on the parameters a timm model lists in ``no_weight_decay()`` (class and position tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["adamw", "param_groups"]


def param_groups(
    module: nn.Module, weight_decay: float, exclude: set[int] | None = None
) -> list[dict[str, Any]]:
    """Two AdamW groups of ``module``'s trainable parameters: with ``weight_decay`` and without.

    ``exclude``: ids of parameters to leave out (e.g. trained by another optimizer). The timm model may be the
    module itself or its ``model`` attribute (a supernet).
    """
    exclude = exclude or set()
    model: Any = getattr(module, "model", module)  # a timm model: no_weight_decay() is not on nn.Module
    prefix = "model." if model is not module else ""
    skip = {prefix + n for n in model.no_weight_decay()} if hasattr(model, "no_weight_decay") else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if id(p) in exclude or not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(params: Any, *, lr: float, weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the fused kernel where torch has one for the parameters' device (CPU and CUDA).

    The fused kernel computes the same update in one pass over each tensor; on CPU it is ~3x faster than the default
    loop, and unlike it does not slow down ~10x on tensors whose second moment holds exact zeros (the weights a
    sparsity mask removes get exactly zero gradients).
    """
    groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in tensors
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None, **kwargs)
