"""Search strategies, one module per method; importing this package registers them all."""

from __future__ import annotations

from . import dimap, magnitude, ofb, spvit, upvit

__all__ = ["dimap", "magnitude", "ofb", "spvit", "upvit"]
