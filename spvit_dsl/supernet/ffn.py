"""The FFN of the supernet (lowering stage, torch): timm's ``Mlp`` or packed GLU ``GluMlp`` with masked hidden
neurons, residual channels and weights.

Input: a timm ``Mlp`` or ``GluMlp`` (its ``fc1``/``act``/``drop1``/``norm``/``fc2``/``drop2`` are adopted under the
same names, so state-dict keys do not change) and the paths of its unit groups on the supernet's
:class:`~.masks.MaskBoard`. Output: ``fc2(m_ffn · act(fc1(x)))`` with the residual mask on fc2's output rows (SPViT
§2: the neuron mask multiplies the activations after GELU, before fc2). A packed GLU (timm's ``SwiGLUPacked``:
DINOv2-g; Shazeer, "GLU Variants Improve Transformer", 2020) splits fc1's ``2w`` outputs into halves ``a, b`` and
computes ``fc2(m_ffn · (act(a) ⊙ b))`` (timm's ``gate_last=False``; ``a ⊙ act(b)`` when it is True): neuron ``j``
reads fc1 rows ``j`` and ``w + j``, and one mask entry covers both.

A batch-wide mask scales *weights* instead of activations — ``(h ⊙ m) W₂ᵀ = h (W₂ diag m)ᵀ``, the same values and
gradients — through :func:`~._masked_ops.masked_linear`, which keeps no masked weight for the backward; a per-sample
mask ``(B, units)`` scales the activations. The straight-through FFN mask of a SPViT search is a batch-wide mask like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers import GluMlp
from torch import Tensor, nn

from ._masked_ops import masked_linear
from .masks import MaskBoard, per_sample

__all__ = ["FfnGroups", "GatedMlp"]


@dataclass(frozen=True)
class FfnGroups:
    """Paths of the unit groups one FFN reads from the mask board (None: not masked)."""

    ffn: str | None = None
    embed: str | None = None
    fc1: str | None = None  # weights mask of fc1
    fc2: str | None = None  # weights mask of fc2


class GatedMlp(nn.Module):
    """timm's ``Mlp`` (or packed GLU ``GluMlp``) with masked hidden neurons; ``decision`` names its FFN group
    (``blocks.{i}.ffn``)."""

    def __init__(
        self, mlp: nn.Module, decision: str, board: MaskBoard | None = None, groups: FfnGroups = FfnGroups()
    ) -> None:
        super().__init__()
        fc1, fc2 = _check_mlp(mlp, decision)
        self.decision = decision
        self.fc1: nn.Linear = fc1
        self.act: nn.Module = mlp.get_submodule("act")
        self.drop1: nn.Module = mlp.get_submodule("drop1")
        self.norm: nn.Module = mlp.get_submodule("norm")
        self.fc2: nn.Linear = fc2
        self.drop2: nn.Module = mlp.get_submodule("drop2")
        # a packed GLU: fc1's two halves, act on the first (timm's gate_last=False) or on the second
        self.glu = isinstance(mlp, GluMlp)
        self.gate_last = bool(getattr(mlp, "gate_last", False))
        self.board = board if board is not None else MaskBoard()
        self.groups = groups

    @property
    def hidden(self) -> int:
        """The FFN's current neurons: fc2's input (a packed GLU's fc1 has twice as many outputs)."""
        return self.fc2.in_features

    def importance(self) -> Tensor:
        """‖fc1 rows of neuron j‖ · ‖fc2 column j‖ (a packed GLU: the norm of its value and gate rows as one
        vector): the order in which nested widths keep neurons. Shape ``(hidden,)``."""
        w1 = self.fc1.weight.detach()
        rows = w1.reshape(-1, self.hidden, w1.shape[1]).transpose(0, 1).reshape(self.hidden, -1)
        return rows.norm(dim=1) * self.fc2.weight.detach().norm(dim=0)

    def _activate(self, h: Tensor) -> Tensor:
        """``act(h)``; a packed GLU: ``act(a) ⊙ b`` over fc1's halves ``(a, b)`` (timm's ``GluMlp.forward``)."""
        if not self.glu:
            return self.act(h)
        a, b = h.chunk(2, dim=-1)
        return a * self.act(b) if self.gate_last else self.act(a) * b

    def forward(self, x: Tensor) -> Tensor:
        board, g = self.board, self.groups
        m_ffn, m_embed = board.get(g.ffn), board.get(g.embed)
        h = masked_linear(x, self.fc1.weight, self.fc1.bias, elem=board.get(g.fc1))
        h = self.norm(self.drop1(self._activate(h)))
        if per_sample(m_ffn):
            h = h * m_ffn.to(h.dtype).view(m_ffn.shape[0], *([1] * (h.dim() - 2)), -1)  # type: ignore[union-attr]
            m_ffn = None
        row = None if per_sample(m_embed) else m_embed
        out = masked_linear(h, self.fc2.weight, self.fc2.bias, row=row, col=m_ffn, elem=board.get(g.fc2))
        if per_sample(m_embed):
            out = out * m_embed.to(out.dtype).view(m_embed.shape[0], *([1] * (out.dim() - 2)), -1)  # type: ignore[union-attr]
        return self.drop2(out)

    def extra_repr(self) -> str:
        masked = [f"{k}={v}" for k, v in vars(self.groups).items() if v is not None]
        glu = ", glu" if self.glu else ""
        return f"{self.decision}: hidden={self.hidden}{glu}" + (
            f", groups: {', '.join(masked)}" if masked else ""
        )


def _check_mlp(mlp: nn.Module, decision: str) -> tuple[nn.Linear, nn.Linear]:
    """``mlp``'s ``fc1`` and ``fc2``; NotImplementedError for an FFN that cannot be gated."""
    names = ("fc1", "act", "drop1", "norm", "fc2", "drop2")
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if (
        not all(hasattr(mlp, n) for n in names)
        or not isinstance(fc1, nn.Linear)
        or not isinstance(fc2, nn.Linear)
    ):
        raise NotImplementedError(
            f"{decision}: only timm's Mlp and GluMlp (fc1 → act → fc2 with nn.Linear) can be gated, found "
            f"{type(mlp).__name__}"
        )
    if not isinstance(mlp.norm, nn.Identity):
        raise NotImplementedError(
            f"{decision}: an FFN with a hidden-layer norm (scale_mlp_norm) cannot be gated"
        )
    return fc1, fc2
