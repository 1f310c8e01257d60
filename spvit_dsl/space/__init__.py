"""Stage 2 — the space (pure Python): backbones and their geometry, the op registry, the search space and its points,
unit groups (one abstraction for every prunable dimension) and the analytic cost model.

:mod:`.backbones` resolves a timm name into a :class:`Geometry`; :mod:`.plan` holds the space and its points;
:mod:`.groups` the unit groups; :mod:`.cost` prices any assignment of kept counts.
"""

from __future__ import annotations

from .geometry import CONVENTIONS, BlockGeom, Convention, Family, Geometry
from .plan import (
    LAYERS,
    BlockArch,
    BlockPlan,
    Cost,
    Density,
    DensityChoice,
    FfnChoice,
    FrozenArch,
    Space,
    dense_arch,
    reads_image,
)

__all__ = [
    "CONVENTIONS",
    "LAYERS",
    "BlockArch",
    "BlockGeom",
    "BlockPlan",
    "Convention",
    "Cost",
    "Density",
    "DensityChoice",
    "Family",
    "FfnChoice",
    "FrozenArch",
    "Geometry",
    "Space",
    "dense_arch",
    "reads_image",
]
