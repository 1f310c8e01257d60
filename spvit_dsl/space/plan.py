"""The search space and its points (space stage, pure Python).

Three separate things, as PyGlove keeps them apart:

* the **space** — :class:`Space`: the backbone's :class:`~.geometry.Geometry`, one :class:`BlockPlan` per block
  (the candidates the spec declares there) and the embedding-width candidates of every stage;
* the **encoding** an algorithm sees — the unit groups of :mod:`.groups` (one per prunable dimension);
* one **point** — :class:`FrozenArch`, every choice fixed: counts only. Which units are kept (ordered indices) is
  not part of a point; it lives in checkpoints, keyed by the same group paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .geometry import CONVENTIONS, BlockGeom, Convention, Family, Geometry

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

# The weight matrices of a block that unstructured sparsity applies to (timm names: attn.qkv, attn.proj,
# mlp.fc1, mlp.fc2). Patch embedding, patch merging, norms and the head are never sparsified.
LAYERS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")


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
class DensityChoice:
    """Candidate weight densities (1.0 = dense) of each sparsifiable layer of a block, ascending."""

    qkv: tuple[float, ...] = (1.0,)
    proj: tuple[float, ...] = (1.0,)
    fc1: tuple[float, ...] = (1.0,)
    fc2: tuple[float, ...] = (1.0,)

    def of(self, layer: str) -> tuple[float, ...]:
        return getattr(self, layer)


@dataclass(frozen=True)
class BlockPlan:
    """The choices declared for one block (after override resolution); singletons are fixed.

    ``joint``: heads × head_dim is searched as one choice over the product of the two candidate sets
    (``heads x head_dim: H x D``, or OFB's default grids). Strategies that search the two separately ignore it; OFB
    puts one softmax over the pairs. The unit groups stay two either way.
    """

    geom: BlockGeom
    attention: tuple[str, ...]  # op names sorted by nesting level (see spvit_dsl.space.ops.by_level)
    ffn: FfnChoice
    heads: tuple[int, ...]  # candidate head counts (default: the dense count)
    head_dim: tuple[int, ...]  # candidate per-head widths (default: the dense width)
    density: DensityChoice = DensityChoice()
    joint: bool = False  # heads × head_dim as one choice over the pairs (see the class docstring)


@dataclass(frozen=True)
class Density:
    """The weight density of each sparsifiable layer of one block (kept non-zero weights / weights)."""

    qkv: float = 1.0
    proj: float = 1.0
    fc1: float = 1.0
    fc2: float = 1.0

    def of(self, layer: str) -> float:
        return getattr(self, layer)

    @property
    def dense(self) -> bool:
        return all(self.of(layer) == 1.0 for layer in LAYERS)

    @classmethod
    def uniform(cls, density: float) -> Density:
        return cls(density, density, density, density)


@dataclass(frozen=True)
class BlockArch:
    """One block with every choice fixed: op, FFN width, heads × per-head width, per-layer densities."""

    op: str
    ffn: int  # kept FFN neurons
    heads: int
    head_dim: int
    density: Density = Density()


@dataclass(frozen=True)
class FrozenArch:
    """One point of the space: every block's choices and the residual width of every stage (ViT: one)."""

    blocks: tuple[BlockArch, ...]
    embed: tuple[int, ...]

    def with_block(self, i: int, **changes: object) -> FrozenArch:
        blocks = list(self.blocks)
        blocks[i] = replace(blocks[i], **changes)  # type: ignore[arg-type]
        return replace(self, blocks=tuple(blocks))

    @property
    def sparse(self) -> bool:
        """Whether some layer keeps less than all of its weights (costs then count non-zero weights)."""
        return any(not b.density.dense for b in self.blocks)

    def canonical(self) -> FrozenArch:
        """The same network with the densities of layers it does not run set to 1: qkv and proj of a block
        whose op is not msa, fc1 and fc2 of an FFN of width 0 (their sparsity changes nothing)."""
        blocks = []
        for b in self.blocks:
            d = b.density
            if b.op != "msa":
                d = replace(d, qkv=1.0, proj=1.0)
            if b.ffn == 0:
                d = replace(d, fc1=1.0, fc2=1.0)
            blocks.append(b if d == b.density else replace(b, density=d))
        return replace(self, blocks=tuple(blocks))


@dataclass(frozen=True)
class Cost:
    """Multiply-adds and parameters (plain counts, not G/M); ``sparse``: counted over non-zero weights."""

    macs: float = 0.0
    params: int = 0
    sparse: bool = False

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params, self.sparse or other.sparse)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.macs - other.macs, self.params - other.params, self.sparse or other.sparse)

    def of(self, metric: str) -> float:
        """``flops`` (multiply-adds) or ``params``."""
        return float(self.macs if metric == "flops" else self.params)


def dense_arch(geometry: Geometry) -> FrozenArch:
    """The dense backbone as a point: every block msa with its dense heads, head width and FFN; dense widths."""
    blocks = tuple(BlockArch("msa", b.hidden, b.heads, b.head_dim) for b in geometry.blocks)
    return FrozenArch(blocks, geometry.dims)


def reads_image(geometry: Geometry, arch: FrozenArch) -> bool:
    """Whether the classifier's input depends on the image at all.

    A ViT/DeiT pooling its class token (and distillation token) reads the patches only through attention (``msa``):
    SPViT's conv ops pass the prefix tokens through unchanged (SPViT §4; our compact modules do the same), ``skip``
    runs nothing and the FFN works token by token. Such a point with no ``msa`` block gives every image the same
    logits. Swin, and a ViT with average pooling, classify from the patch tokens: always True.
    """
    if geometry.reads_patches:
        return True
    return any(b.op == "msa" for b in arch.blocks)


@dataclass(frozen=True)
class Space:
    """The whole space: geometry, one plan per block, the embedding-width candidates of every stage."""

    geometry: Geometry
    plans: tuple[BlockPlan, ...]
    embed: tuple[tuple[int, ...], ...]  # per stage (ViT: one entry), ascending
    extras: dict[str, object] = field(default_factory=dict, compare=False)

    def dense(self) -> FrozenArch:
        """The dense backbone (which need not be a point of the space)."""
        return dense_arch(self.geometry)

    def largest(self) -> FrozenArch:
        """Every dimension at its largest candidate (the top op level); for a frozen space, its one point."""
        blocks = []
        for p in self.plans:
            d = p.density
            density = Density(d.qkv[-1], d.proj[-1], d.fc1[-1], d.fc2[-1])
            width = p.ffn.candidates(p.geom.hidden)[-1]
            blocks.append(BlockArch(p.attention[-1], width, p.heads[-1], p.head_dim[-1], density))
        return FrozenArch(tuple(blocks), tuple(w[-1] for w in self.embed))
