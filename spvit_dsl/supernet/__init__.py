"""Torch modules of the lowering stage: the gated SPViT supernet over timm backbones.

:func:`spvit_dsl.supernet.lower.lower` builds a :class:`Supernet`; its pieces are the unified attention op
(:class:`UnifiedAttention`), the gated FFN (:class:`GatedMlp`) and the gates (:class:`OpGate`, :class:`FfnGate`).
"""

from __future__ import annotations

from .attention import UnifiedAttention, gated_linear
from .ffn import GatedMlp
from .flops import count_macs
from .gates import FfnGate, OpGate, binary_concrete, indicator, leading_ones, level_weight
from .io import load_supernet, read_metadata, save_supernet, space_from_json, space_to_json
from .net import BlockRow, GateDict, Supernet, Unit

__all__ = [
    "BlockRow",
    "FfnGate",
    "GateDict",
    "GatedMlp",
    "OpGate",
    "Supernet",
    "UnifiedAttention",
    "Unit",
    "binary_concrete",
    "count_macs",
    "gated_linear",
    "indicator",
    "leading_ones",
    "level_weight",
    "load_supernet",
    "read_metadata",
    "save_supernet",
    "space_from_json",
    "space_to_json",
]
