"""Default candidate grids a strategy fills in where a spec declares nothing (space stage, pure Python).

OFB (Ye et al., "Once for Both", CVPR 2024) searches every dimension of its space over fixed grids derived from the
dense sizes. The checker (:mod:`spvit_dsl.compile.check`) fills them, per dimension and per block, wherever a spec
with ``search ofb`` declares nothing (never in a frozen spec):

================  ==================================================================================
dimension         default candidates (D, H, d, h: the dense sizes)
================  ==================================================================================
embedding width   ⌈D/2⌉ up to D in steps of min(⌊D/32⌋, 12) (at least 1), D itself included
heads             2, 4, ..., H (H itself too when odd; H = 1 gives {1})
per-head width    round(d·k/8) for k = 2..8 (d/4, d/4 + d/8, ..., d), at least 1
FFN width         round(h·k/8) for k = 2..8 (h/4, h/4 + h/8, ..., h), at least 1
================  ==================================================================================

Rounding is half up; every grid is deduplicated and ascending and ends at the dense size. Heads and per-head
width are filled together as one joint choice (``BlockPlan.joint``).
"""

from __future__ import annotations

__all__ = ["ofb_embed", "ofb_ffn", "ofb_head_dim", "ofb_heads"]


def ofb_embed(dense: int) -> tuple[int, ...]:
    """Embedding widths of a stage of dense width ``dense``: ⌈D/2⌉..D step min(⌊D/32⌋, 12) (≥ 1), D included."""
    step = max(1, min(dense // 32, 12))
    return tuple(sorted({*range((dense + 1) // 2, dense + 1, step), dense}))


def ofb_heads(dense: int) -> tuple[int, ...]:
    """Head counts of a block of ``dense`` heads: the even counts 2..H, and H itself (H = 1, 3, 5, ...)."""
    return tuple(sorted({*range(2, dense + 1, 2), dense}))


def _eighths(dense: int) -> tuple[int, ...]:
    """round(dense·k/8) for k = 2..8 (half up), at least 1, deduplicated and ascending."""
    return tuple(sorted({max(1, (dense * k + 4) // 8) for k in range(2, 9)}))


def ofb_head_dim(dense: int) -> tuple[int, ...]:
    """Per-head widths of a block of dense per-head width ``dense``: d/4, d/4 + d/8, ..., d (rounded)."""
    return _eighths(dense)


def ofb_ffn(dense: int) -> tuple[int, ...]:
    """FFN widths of a block of dense hidden width ``dense``: h/4, h/4 + h/8, ..., h (rounded)."""
    return _eighths(dense)
