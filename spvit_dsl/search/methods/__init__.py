"""Search strategies, one module per method; importing this package registers them all."""

from __future__ import annotations

from . import magnitude, spvit

__all__ = ["magnitude", "spvit"]
