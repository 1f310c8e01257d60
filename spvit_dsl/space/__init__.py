"""Stage 2 — the space: backbones, geometry, ops, unit groups and the cost model (pure Python)."""
