"""The op registry (pure Python): names a user may write as attention candidates.

Candidates of one attention layer are *nested* (SPViT's single path): skip ⊂ conv1x1 ⊂ conv3x3 ⊂ conv5x5 ⊂ msa
in parameters, so a block's candidates are always ordered by ``level`` and encoded by cumulative gates.
The torch implementations live in :mod:`spvit_dsl.supernet` and are looked up by the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._registry import Registry


@dataclass(frozen=True)
class OpInfo:
    name: str
    level: int  # position on the single path; higher levels contain the lower ones
    kernel: int | None  # conv kernel size, None for skip and msa
    doc: str


OPS: Registry[OpInfo] = Registry("op")


def register_op(info: OpInfo) -> OpInfo:
    return OPS.register(info.name, info)


register_op(OpInfo("skip", 0, None, "no token mixing: the attention branch contributes zero"))
register_op(
    OpInfo("conv1x1", 1, 1, "1x1 conv C→d, BatchNorm, ReLU, 1x1 conv d→C, built from the MSA weights")
)
register_op(
    OpInfo("conv3x3", 2, 3, "3x3 conv C→d, BatchNorm, ReLU, 1x1 conv d→C, built from the MSA weights")
)
register_op(
    OpInfo("conv5x5", 3, 5, "5x5 conv C→d, BatchNorm, ReLU, 1x1 conv d→C, built from the MSA weights")
)
register_op(OpInfo("msa", 4, None, "the backbone's own multi-head self-attention"))


def by_level(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Sort op names along the single path (skip first, msa last)."""
    return tuple(sorted(set(names), key=lambda n: OPS.get(n).level))
