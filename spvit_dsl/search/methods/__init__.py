"""Search strategies, one module per method; importing this package registers them all."""

from __future__ import annotations

from . import spvit

__all__ = ["spvit"]
