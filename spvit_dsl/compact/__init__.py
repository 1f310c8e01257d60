"""The compact networks of frozen specs (build stage, torch): plain modules with no gates and no supernet.

:func:`create_compact` gives the shape of a frozen architecture over its timm backbone; :mod:`spvit_dsl.compact.build`
fills its weights (folded from a search checkpoint, or gathered from dense weights), saves and loads it.
"""

from __future__ import annotations

from .modules import CompactBlock, CompactSwinBlock, ConvBranch, FfnBias, SkipBranch
from .skeleton import check_buildable, create_compact, create_dense

__all__ = [
    "CompactBlock",
    "CompactSwinBlock",
    "ConvBranch",
    "FfnBias",
    "SkipBranch",
    "check_buildable",
    "create_compact",
    "create_dense",
]
