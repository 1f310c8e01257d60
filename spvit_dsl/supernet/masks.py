"""Masks of the supernet's unit groups (lowering stage, torch): where they live and the pure functions applying them.

Every unit group of the space (:mod:`spvit_dsl.space.groups`) has one mask, held by a :class:`MaskBoard` shared by the
supernet's modules and set by the search strategy before each forward:

* ``None`` — every unit kept (the module runs exactly timm's computation);
* a 1-D tensor of shape ``(units,)`` — one mask for the whole batch: applied to the *weights* (rows or columns
  scaled), which costs one weight-sized multiply and no extra activation memory;
* a 2-D tensor of shape ``(batch, units)`` — one mask per sample (batched ablations, e.g. UP-ViT's scoring): applied
  to the activations;
* ``weights`` groups (unstructured sparsity) take a mask of the weight's own shape.

A mask may be soft (a value in [0, 1] per unit) or hard (0 or 1). With hard masks the supernet computes exactly what
the compact network built from the same kept units computes (:mod:`spvit_dsl.compact`), which the property tests
check. Removing residual channels changes LayerNorm statistics, so LayerNorms of a masked stream normalise over the
kept channels only (:func:`masked_layer_norm`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ._masked_ops import masked_linear, weighted_layer_norm

__all__ = [
    "EmbedMask",
    "FixedMasks",
    "MaskBoard",
    "MaskedLayerNorm",
    "MaskedLinear",
    "masked_layer_norm",
    "per_sample",
    "scale_axis",
]


class MaskBoard:
    """Group path → current mask (``None``: all kept). Shared by reference, so setting a mask needs no plumbing."""

    def __init__(self) -> None:
        self._masks: dict[str, Tensor | None] = {}

    def get(self, path: str | None) -> Tensor | None:
        return self._masks.get(path) if path is not None else None

    def set(self, path: str, mask: Tensor | None) -> None:
        self._masks[path] = mask

    def update(self, masks: Mapping[str, Tensor | None]) -> None:
        self._masks.update(masks)

    def clear(self) -> None:
        self._masks.clear()

    def items(self) -> Iterator[tuple[str, Tensor | None]]:
        return iter(list(self._masks.items()))

    def snapshot(self) -> dict[str, Tensor | None]:
        return dict(self._masks)


class FixedMasks(nn.Module):
    """Masks of groups fixed below their dense size, kept as buffers so checkpoints restore them exactly (they are
    chosen from the weights at lowering, which change during a search). Buffer names replace '.' by '__'."""

    def set(self, path: str, mask: Tensor) -> None:
        self.register_buffer(path.replace(".", "__"), mask)

    def get(self, path: str) -> Tensor | None:
        return self._buffers.get(path.replace(".", "__"))

    def paths(self) -> list[str]:
        return [k.replace("__", ".") for k in self._buffers]

    def as_dict(self) -> dict[str, Tensor]:
        return {k.replace("__", "."): v for k, v in self._buffers.items() if v is not None}


def per_sample(mask: Tensor | None) -> bool:
    """Whether ``mask`` is one mask per sample (``(batch, units)``) rather than one for the batch."""
    return mask is not None and mask.dim() == 2


def scale_axis(weight: Tensor, mask: Tensor | None, axis: int, repeat: int = 1) -> Tensor:
    """``weight`` with slices along ``axis`` scaled by a 1-D ``mask`` tiled ``repeat`` times (``None``: unchanged).

    ``repeat`` covers layouts such as qkv's rows ``(3, D)``: the same mask scales q, k and v.
    """
    if mask is None:
        return weight
    m = mask.to(weight.dtype)
    if repeat > 1:
        m = m.repeat(repeat)
    shape = [1] * weight.dim()
    shape[axis] = -1
    return weight * m.view(shape)


def masked_layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None, eps: float
) -> Tensor:
    """LayerNorm of ``x`` (..., C) over the channels ``mask`` keeps, zero on the others.

    ``mask``: ``None`` (plain ``F.layer_norm``), ``(C,)`` or ``(B, C)`` for ``x`` of shape ``(B, ..., C)``. The
    statistics are mask-weighted: ``μ = Σ m·x / Σ m``, ``σ² = Σ m·(x − μ)² / Σ m``; with a 0/1 mask they are those
    of the kept channels, so the result equals a LayerNorm of the compact network on the kept channels. Saves only
    what ``F.layer_norm`` saves for the backward (see :mod:`._masked_ops`).
    """
    if mask is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return weighted_layer_norm(x, mask, weight, bias, eps)


class MaskedLayerNorm(nn.LayerNorm):
    """timm's LayerNorm over a residual stream whose channels a group masks (``group``: its path on ``board``).

    Subclasses ``nn.LayerNorm`` and adopts the original's parameters, so state-dict keys do not change.
    ``repeat``: the stream is ``repeat`` copies of the group's channels side by side (Swin's patch merging norm sees
    the 2x2 neighbours concatenated: ``(4, C)``).
    """

    def __init__(self, norm: nn.LayerNorm, board: MaskBoard, group: str, repeat: int = 1) -> None:
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        self.weight, self.bias = norm.weight, norm.bias  # adopted: same tensors, same keys
        self.board, self.group, self.repeat = board, group, repeat

    def forward(self, x: Tensor) -> Tensor:
        mask = self.board.get(self.group)
        if mask is not None and self.repeat > 1:
            mask = mask.repeat(*([1] * (mask.dim() - 1)), self.repeat)
        return masked_layer_norm(x, self.weight, self.bias, mask, self.eps)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", group={self.group}"
            + (f", repeat={self.repeat}" if self.repeat > 1 else "")
        )


class EmbedMask(nn.Module):
    """Multiplies a residual stream (B, ..., C) by its group's mask: a ViT's stream start, in place of timm's
    ``norm_pre`` (an identity) after the position embedding, so patch, class and position embeddings are masked."""

    def __init__(self, board: MaskBoard, group: str) -> None:
        super().__init__()
        self.board, self.group = board, group

    def forward(self, x: Tensor) -> Tensor:
        mask = self.board.get(self.group)
        if mask is None:
            return x
        m = mask.to(x.dtype)
        if m.dim() == 2:
            m = m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])
        return x * m

    def extra_repr(self) -> str:
        return f"group={self.group}"


class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` whose output channels a group masks (Swin's patch-merging reduction starts a stage's
    stream). Adopts the original's parameters, so state-dict keys do not change."""

    def __init__(self, linear: nn.Linear, board: MaskBoard, out_group: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.board, self.out_group = board, out_group

    def forward(self, x: Tensor) -> Tensor:
        mask = self.board.get(self.out_group)
        if mask is None or per_sample(mask):
            y = F.linear(x, self.weight, self.bias)
            return y if mask is None else y * mask.to(y.dtype).view(mask.shape[0], *([1] * (y.dim() - 2)), -1)
        return masked_linear(x, self.weight, self.bias, row=mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_group={self.out_group}"
