"""Data contracts between the stages (pure Python, no torch).

Three separate things, as PyGlove keeps them apart:

* the **space** — :class:`Geometry` (what the backbone is) plus one :class:`BlockPlan` per block (which choices
  the spec declares there) and the global embedding-width choice;
* the **encoding** an algorithm sees — the decisions of :class:`spvit_dsl.compile.graph.SearchGraph`;
* one **point** — :class:`FrozenArch`, every choice fixed.

Decision names are stable strings used everywhere (graph nodes, supernet gates, checkpoints, diffs):
``blocks.{i}.attention``, ``blocks.{i}.ffn``, ``blocks.{i}.heads``, ``blocks.{i}.head_dim``,
``blocks.{i}.density`` and ``embed``; ``i`` is the global block index (Swin blocks are numbered across stages).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Family = Literal["vit", "swin"]
Convention = Literal["paper", "exact"]
CONVENTIONS: tuple[Convention, ...] = ("paper", "exact")


@dataclass(frozen=True)
class BlockGeom:
    """Shape facts of one transformer block of the dense backbone."""

    index: int  # global block index
    stage: int  # Swin stage (0 for ViT)
    index_in_stage: int
    dim: int  # C, the residual width
    heads: int
    head_dim: int
    hidden: int  # dense FFN width (mlp_ratio * C)
    grid: tuple[int, int]  # (H, W) of the patch-token map this block sees
    prefix_tokens: int  # cls (+ distillation) tokens; 0 for Swin
    window: int = 0  # Swin window size after timm's clamping to the grid; 0 for ViT
    shift: int = 0  # Swin shift size (0 on even blocks and when the window covers the grid)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] + self.prefix_tokens


@dataclass(frozen=True)
class Geometry:
    """The dense backbone, resolved from a timm model name and the spec's overrides."""

    family: Family
    model: str  # timm model name
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    depths: tuple[int, ...]  # ViT: (depth,); Swin: per stage
    num_heads: tuple[int, ...]  # ViT: (heads,); Swin: per stage
    mlp_ratio: float
    window_size: int  # Swin only (0 for ViT)
    prefix_tokens: int  # ViT: cls + distillation tokens
    blocks: tuple[BlockGeom, ...]
    # keyword arguments for timm.create_model(model, pretrained=False, **timm_kwargs)
    timm_kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_features(self) -> int:
        return self.blocks[-1].dim if self.blocks else self.embed_dim

    def kwargs(self) -> dict[str, object]:
        return dict(self.timm_kwargs)


@dataclass(frozen=True)
class FfnChoice:
    """The FFN widths a block may take.

    Either an explicit nested list of ``widths`` (from ``ratios`` / ``width`` declarations; ascending), or a
    granularity: ``group`` neurons share one gate and any multiple of ``group`` up to the dense width (and the
    dense width itself) may be kept, 0 included (SPViT's per-neuron gates are ``group=1``).
    """

    widths: tuple[int, ...] | None = None
    group: int = 1

    def candidates(self, hidden: int) -> tuple[int, ...]:
        if self.widths is not None:
            return self.widths
        return tuple(sorted({*range(0, hidden, self.group), hidden}))

    @property
    def granular(self) -> bool:
        return self.widths is None


@dataclass(frozen=True)
class BlockPlan:
    """The choices declared for one block (after override resolution); singletons are fixed."""

    geom: BlockGeom
    attention: tuple[str, ...]  # op names sorted by nesting level (see spvit_dsl.space.ops.by_level)
    ffn: FfnChoice
    heads: tuple[int, ...]  # candidate head counts (default: the dense count)
    head_dim: tuple[int, ...]  # candidate per-head widths (default: the dense width)
    density: tuple[float, ...] = (1.0,)  # candidate weight densities (1.0 = dense; unstructured pruning)


@dataclass(frozen=True)
class BlockArch:
    """One block with every choice fixed."""

    op: str
    ffn: int  # kept FFN neurons
    heads: int
    head_dim: int
    density: float = 1.0


@dataclass(frozen=True)
class FrozenArch:
    """One point of the space: every decision fixed. ``embed`` is the residual width (ViT) / stage-0 width."""

    blocks: tuple[BlockArch, ...]
    embed: int

    def with_block(self, i: int, **changes: object) -> FrozenArch:
        blocks = list(self.blocks)
        blocks[i] = replace(blocks[i], **changes)  # type: ignore[arg-type]
        return replace(self, blocks=tuple(blocks))


@dataclass(frozen=True)
class Cost:
    """Multiply-adds and parameters (plain counts, not G/M)."""

    macs: float = 0.0
    params: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.macs - other.macs, self.params - other.params)


@dataclass(frozen=True)
class Space:
    """The whole space: geometry, one plan per block, the embedding-width candidates."""

    geometry: Geometry
    plans: tuple[BlockPlan, ...]
    embed: tuple[int, ...]
    extras: dict[str, object] = field(default_factory=dict, compare=False)

    def dense(self) -> FrozenArch:
        return FrozenArch(
            tuple(BlockArch("msa", p.geom.hidden, p.geom.heads, p.geom.head_dim, 1.0) for p in self.plans),
            self.geometry.embed_dim,
        )
