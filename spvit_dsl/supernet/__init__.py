"""Stage — lower (torch): a checked space → a masked supernet over the real timm backbone.

:func:`~.lower.lower` builds a :class:`Supernet`; its pieces are the unified attention op (:class:`UnifiedAttention`:
SPViT's candidate ops over shared weights), the masked FFN (:class:`GatedMlp`) and the mask board every unit group
writes to (:mod:`.masks`). Strategies set masks; :meth:`Supernet.cost` prices expected counts differentiably.
"""

from __future__ import annotations

from .attention import AttentionGroups, UnifiedAttention
from .ffn import FfnGroups, GatedMlp
from .flops import count_macs
from .io import load_supernet, read_metadata, save_supernet, space_from_json, space_to_json
from .masks import MaskBoard, MaskedLayerNorm, masked_layer_norm
from .net import BlockRow, Supernet

__all__ = [
    "AttentionGroups",
    "BlockRow",
    "FfnGroups",
    "GatedMlp",
    "MaskBoard",
    "MaskedLayerNorm",
    "Supernet",
    "UnifiedAttention",
    "count_macs",
    "load_supernet",
    "masked_layer_norm",
    "read_metadata",
    "save_supernet",
    "space_from_json",
    "space_to_json",
]
