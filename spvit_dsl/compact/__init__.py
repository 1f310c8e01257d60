"""Stage — compact networks (torch): plain modules with no masks and no supernet.

:func:`create_compact` gives the shape of a frozen point over its timm backbone; :mod:`.slice` cuts the kept units
out of a supernet; :mod:`.build` fills the weights from a search checkpoint or dense weights, saves and loads;
:mod:`.export` writes ONNX and TorchScript; :mod:`.speed` measures latency.
"""

from __future__ import annotations

from .modules import (
    CompactAttention,
    CompactBlock,
    CompactSwinBlock,
    CompactWindowAttention,
    CompactWindowAttentionV2,
    CompactWindowAttentionV2Cr,
    ConvBranch,
    FfnBias,
    SkipBranch,
)
from .skeleton import check_buildable, create_compact, create_dense

__all__ = [
    "CompactAttention",
    "CompactBlock",
    "CompactSwinBlock",
    "CompactWindowAttention",
    "CompactWindowAttentionV2",
    "CompactWindowAttentionV2Cr",
    "ConvBranch",
    "FfnBias",
    "SkipBranch",
    "check_buildable",
    "create_compact",
    "create_dense",
]
