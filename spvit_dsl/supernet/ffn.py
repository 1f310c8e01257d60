"""The gated FFN of the SPViT supernet (lowering stage, torch): timm's ``Mlp`` with a keep mask on its neurons.

Input: a timm ``Mlp`` (its ``fc1``/``act``/``drop1``/``norm``/``fc2``/``drop2`` are adopted under the same names, so
state-dict keys do not change). Output: a module computing ``fc2(mask · act(fc1(x)))`` (SPViT §2: the mask multiplies
the activations after GELU, before fc2).

What one forward computes depends on the choice the supernet hands over before each forward (:meth:`choose`):

* a straight-through mask (search): all neurons are computed; the mask scales the *columns of fc2's weight*
  instead of the activations — ``(h ⊙ m) W₂ᵀ = h (W₂ diag m)ᵀ``, the same values and gradients — so the mask costs
  one weight-sized multiply, no extra activation memory and no extra pass over the activations;
* a fixed keep set (evaluation, a fixed architecture): only the kept neurons are computed (rows of ``fc1`` and
  columns of ``fc2`` are gathered), so FLOP counts match the compact network; all kept = timm's dense path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatedMlp"]


class GatedMlp(nn.Module):
    """timm's ``Mlp`` with gated hidden neurons; ``decision`` names its FFN decision (``blocks.{i}.ffn``)."""

    def __init__(self, mlp: nn.Module, decision: str) -> None:
        super().__init__()
        _check_mlp(mlp, decision)
        self.decision = decision
        self.fc1: nn.Linear = mlp.fc1
        self.act: nn.Module = mlp.act
        self.drop1: nn.Module = mlp.drop1
        self.norm: nn.Module = mlp.norm
        self.fc2: nn.Linear = mlp.fc2
        self.drop2: nn.Module = mlp.drop2
        self.hidden = self.fc1.out_features
        self._mask: Tensor | None = None  # straight-through per-neuron mask (search)
        self._index: Tensor | None = None  # kept neurons (fixed choice); None = all

    def choose(self, *, mask: Tensor | None = None, kept: Tensor | None = None) -> None:
        """Set what the next forward computes: a straight-through ``mask``, or a bool ``kept`` set, or dense."""
        self._mask = mask
        self._index = None
        if kept is not None and not bool(kept.all()):
            self._index = kept.nonzero().squeeze(1)

    def set_fixed_keep(self, keep: Tensor) -> None:
        """Declare a fixed FFN width below the dense one: the neurons in ``keep`` (a persistent bool buffer)."""
        self.register_buffer("keep", keep.to(torch.bool))

    def fixed_keep(self) -> Tensor | None:
        """The declared fixed keep mask, or None when the block's FFN is gated or dense."""
        return getattr(self, "keep", None)

    def kept_index(self) -> Tensor | None:
        """The neurons the current fixed choice computes (None: all, or a straight-through mask)."""
        return self._index

    def importance(self) -> Tensor:
        """‖fc1 row j‖ · ‖fc2 column j‖: the order in which nested widths keep neurons."""
        return self.fc1.weight.detach().norm(dim=1) * self.fc2.weight.detach().norm(dim=0)

    def forward(self, x: Tensor) -> Tensor:
        if self._mask is not None:
            h = self.norm(self.drop1(self.act(self.fc1(x))))
            weight = self.fc2.weight * self._mask.to(self.fc2.weight.dtype)
            return self.drop2(F.linear(h, weight, self.fc2.bias))
        if self._index is None:
            h = self.act(self.fc1(x))
            return self.drop2(self.fc2(self.norm(self.drop1(h))))
        return self._forward_kept(x, self._index)

    def _forward_kept(self, x: Tensor, index: Tensor) -> Tensor:
        if index.device != self.fc1.weight.device:  # fixed before the module moved
            index = self._index = index.to(self.fc1.weight.device)
        b1 = self.fc1.bias.index_select(0, index) if self.fc1.bias is not None else None
        h = F.linear(x, self.fc1.weight.index_select(0, index), b1)
        h = self.drop1(self.act(h))
        return self.drop2(F.linear(h, self.fc2.weight.index_select(1, index), self.fc2.bias))

    def extra_repr(self) -> str:
        return f"{self.decision}: hidden={self.hidden}"


def _check_mlp(mlp: nn.Module, decision: str) -> None:
    names = ("fc1", "act", "drop1", "norm", "fc2", "drop2")
    if not all(hasattr(mlp, n) for n in names) or not isinstance(getattr(mlp, "fc1", None), nn.Linear):
        raise NotImplementedError(
            f"{decision}: only timm's Mlp (fc1 → act → fc2 with nn.Linear) can be gated, "
            f"found {type(mlp).__name__}"
        )
    if not isinstance(mlp.norm, nn.Identity):
        raise NotImplementedError(
            f"{decision}: an FFN with a hidden-layer norm (scale_mlp_norm) cannot be gated"
        )
