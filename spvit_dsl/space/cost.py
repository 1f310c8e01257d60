"""The analytic cost model (used by *build_graph*, the search and *freeze*): Geometry + FrozenArch → Cost.

Input: a resolved :class:`~spvit_dsl.space.plan.Geometry` (see :mod:`spvit_dsl.space.backbones`) and one point of the space
(:class:`~spvit_dsl.space.plan.FrozenArch`), or a single block and one of its choices. Output: :class:`Cost`, plain
multiply-adds (MACs, per image) and exact parameter counts. Pure Python, no torch.

Two conventions (``docs/cost-model.md`` has every formula):

* ``paper`` — SPViT's own FLOPs formulas (He et al., TPAMI 2024, §3 of ``shared/reference/spvit.md``): weight and
  attention matmuls; the prefix (cls) tokens are left out of the FFN; LayerNorm counts one MAC per element;
  BatchNorm, activations, softmax and biases are free; Swin adds the official code's pooling term.
* ``exact`` — fvcore's convention on the timm module: every matmul/conv over every token (cls included),
  LayerNorm 5 MACs per element, eval-mode BatchNorm 2 per element, the global average pool one per input element.
  Its ``matmul`` part is exactly what ``torch.utils.flop_counter.FlopCounterMode`` reports ÷ 2.

Accounting choices (the same in both conventions): the attention branch of a ``skip`` block costs nothing; the two
block LayerNorms are *fixed* (held and run by every block whatever its choices); an FFN kept at width 0 still holds
``fc2.bias`` (what slicing leaves), which costs no MACs; ``density`` scales weight matmuls and weight counts only.
Every function is linear in the FFN width and in ``heads × head_dim`` apart from attention (quadratic in tokens),
so fractional (expected) counts work too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .ops import OPS
from .plan import BlockArch, BlockGeom, Convention, Cost, FrozenArch, Geometry

__all__ = [
    "CATEGORIES",
    "arch_cost",
    "at_width",
    "block_cost",
    "block_ffn_cost",
    "block_fixed_cost",
    "block_op_cost",
    "breakdown",
    "dense_arch",
    "dense_cost",
    "stem_head_cost",
]

CATEGORIES: tuple[str, ...] = ("matmul", "norm", "pool")

# per-element MACs of the non-matmul layers
_LAYERNORM = {"paper": 1, "exact": 5}
_BATCHNORM = {"paper": 0, "exact": 2}


@dataclass(frozen=True)
class _Tally:
    """MACs by category plus parameters; what every function here adds up."""

    matmul: float = 0
    norm: float = 0
    pool: float = 0
    params: float = 0

    def __add__(self, other: _Tally) -> _Tally:
        return _Tally(
            self.matmul + other.matmul,
            self.norm + other.norm,
            self.pool + other.pool,
            self.params + other.params,
        )

    def cost(self) -> Cost:
        return Cost(self.matmul + self.norm + self.pool, self.params)  # type: ignore[arg-type]


def _check_convention(convention: str) -> None:
    if convention not in _LAYERNORM:
        raise ValueError(f"unknown cost convention '{convention}'; expected 'paper' or 'exact'")


def _weights(count: float, density: float) -> float:
    """Kept weights of a matrix at ``density`` (rounded to a whole count)."""
    return count if density == 1 else round(count * density)


def _sparse(macs: float, density: float) -> float:
    """Weight-matmul MACs at ``density`` (left an exact integer when dense)."""
    return macs if density == 1 else macs * density


def _patch_tokens(b: BlockGeom) -> int:
    return b.grid[0] * b.grid[1]


# --- the attention branch ------------------------------------------------------------------------------------


def _msa(b: BlockGeom, heads: int, head_dim: int, density: float) -> _Tally:
    """qkv (C → 3D, bias), attention matmuls (2·N·M·D, M = keys per query), proj (D → C, bias); D = heads·head_dim."""
    inner = heads * head_dim
    tokens = b.tokens
    keys = b.window**2 if b.window else tokens  # Swin attends within windows, ViT over all tokens
    weight_macs = _sparse(tokens * b.dim * inner * 4, density)
    attention = 2 * tokens * keys * inner
    params = _weights(4 * b.dim * inner, density) + 3 * inner + b.dim
    if b.window:
        params += (2 * b.window - 1) ** 2 * heads  # relative-position-bias table
    return _Tally(matmul=weight_macs + attention, params=params)


def _conv(b: BlockGeom, convention: str, kernel: int, density: float) -> _Tally:
    """Conv2d(C, d, k, bias) → BN(d) → ReLU → Conv2d(d, C, 1, bias) on the patch-token map, d = dense head_dim.

    Prefix tokens pass the branch unchanged (they are not on the map), so only H·W positions are computed.
    """
    d, hw = b.head_dim, _patch_tokens(b)
    weights = kernel * kernel * b.dim * d + d * b.dim
    return _Tally(
        matmul=_sparse(hw * weights, density),
        norm=_BATCHNORM[convention] * hw * d,
        params=_weights(weights, density) + d + 2 * d + b.dim,
    )


def _op_tally(
    b: BlockGeom, op: str, convention: str, heads: int | None, head_dim: int | None, density: float
) -> _Tally:
    _check_convention(convention)
    info = OPS.get(op)
    if op == "skip":
        return _Tally()
    if op == "msa":
        return _msa(
            b, b.heads if heads is None else heads, b.head_dim if head_dim is None else head_dim, density
        )
    if info.kernel is not None:
        return _conv(b, convention, info.kernel, density)
    raise ValueError(f"the cost model has no formula for op '{op}'")


def block_op_cost(
    b: BlockGeom,
    op: str,
    convention: Convention,
    *,
    heads: int | None = None,
    head_dim: int | None = None,
    density: float = 1.0,
) -> Cost:
    """Cost of one block's attention branch running ``op`` (``skip`` costs nothing).

    ``heads``/``head_dim`` set the inner width of ``msa`` (default: the dense block's); conv ops always use the
    dense per-head width ``d = C / h`` as their bottleneck. ``density`` scales the weight matmuls and weights.
    """
    return _op_tally(b, op, convention, heads, head_dim, density).cost()


# --- FFN, norms ----------------------------------------------------------------------------------------------


def _ffn(b: BlockGeom, width: float, convention: str, density: float) -> _Tally:
    """fc1 (C → w, bias), GELU, fc2 (w → C, bias); the paper leaves the prefix tokens out."""
    _check_convention(convention)
    tokens = _patch_tokens(b) if convention == "paper" else b.tokens
    return _Tally(
        matmul=_sparse(tokens * 2 * b.dim * width, density),
        params=_weights(2 * b.dim * width, density) + width + b.dim,  # fc2.bias stays at width 0
    )


def block_ffn_cost(b: BlockGeom, width: float, convention: Convention, *, density: float = 1.0) -> Cost:
    """Cost of one block's FFN keeping ``width`` hidden neurons (linear in ``width``; 0 keeps only fc2's bias)."""
    return _ffn(b, width, convention, density).cost()


def _fixed(b: BlockGeom, convention: str) -> _Tally:
    _check_convention(convention)
    return _Tally(norm=2 * _LAYERNORM[convention] * b.tokens * b.dim, params=4 * b.dim)  # norm1, norm2


def block_fixed_cost(b: BlockGeom, convention: Convention) -> Cost:
    """Cost every block pays whatever its choices: its two LayerNorms (norm1, norm2)."""
    return _fixed(b, convention).cost()


def _block(b: BlockGeom, arch: BlockArch, convention: str) -> _Tally:
    return (
        _op_tally(b, arch.op, convention, arch.heads, arch.head_dim, arch.density)
        + _ffn(b, arch.ffn, convention, arch.density)
        + _fixed(b, convention)
    )


def block_cost(b: BlockGeom, arch: BlockArch, convention: Convention) -> Cost:
    """One whole block at the choices ``arch``: attention branch + FFN + norms."""
    return _block(b, arch, convention).cost()


# --- stem and head -------------------------------------------------------------------------------------------


def _linear_head(g: Geometry, width: int, copies: int) -> _Tally:
    """Classifier(s) on one pooled/cls feature vector; distilled DeiT runs two (head, head_dist)."""
    if g.num_classes == 0:
        return _Tally()
    return _Tally(
        matmul=copies * width * g.num_classes, params=copies * (width * g.num_classes + g.num_classes)
    )


def _patch_embed(g: Geometry, embed: int) -> _Tally:
    grid = g.blocks[0].grid
    weights = g.in_chans * g.patch_size**2 * embed
    return _Tally(matmul=grid[0] * grid[1] * weights, params=weights + embed)


def _vit_stem_head(g: Geometry, convention: str, embed: int) -> _Tally:
    """Patch embed, cls/dist tokens + position embedding, final LayerNorm over every token, head(s)."""
    tokens = g.blocks[0].tokens
    final_norm = _Tally(
        norm=_LAYERNORM[convention] * tokens * embed if convention == "exact" else 0, params=2 * embed
    )
    tokens_params = _Tally(params=g.prefix_tokens * embed + tokens * embed)
    return _patch_embed(g, embed) + tokens_params + final_norm + _linear_head(g, embed, g.prefix_tokens)


def _swin_stem_head(g: Geometry, convention: str, embed: int) -> _Tally:
    """Patch embed + its LayerNorm, patch merging before stages 1.., final LayerNorm, global average pool, head."""
    ln = _LAYERNORM[convention]
    grid0 = g.blocks[0].grid
    out = _patch_embed(g, embed) + _Tally(norm=ln * grid0[0] * grid0[1] * embed, params=2 * embed)
    stages = len(g.depths)
    for s in range(1, stages):
        h, w = _stage_grid(g, s)
        merged = 4 * embed * 2 ** (s - 1)  # 2x2 neighbours of the previous stage, concatenated
        out += _Tally(
            matmul=h * w * merged * embed * 2**s,
            norm=ln * h * w * merged,
            params=2 * merged + merged * embed * 2**s,
        )
    features = embed * 2 ** (stages - 1)
    h, w = _stage_grid(g, stages - 1)
    if convention == "exact":
        out += _Tally(norm=ln * h * w * features, pool=h * w * features)
    else:  # the official flops(): num_features · H0·W0 / 2^stages, standing in for the final norm/pool
        out += _Tally(pool=features * grid0[0] * grid0[1] // 2**stages)
    return out + _Tally(params=2 * features) + _linear_head(g, features, 1)


def _stage_grid(g: Geometry, stage: int) -> tuple[int, int]:
    return next(b.grid for b in g.blocks if b.stage == stage)


def _stem_head(g: Geometry, convention: str, embed: int | None) -> _Tally:
    _check_convention(convention)
    embed = g.embed_dim if embed is None else embed
    return (
        _swin_stem_head(g, convention, embed) if g.family == "swin" else _vit_stem_head(g, convention, embed)
    )


def stem_head_cost(geometry: Geometry, convention: Convention, embed: int | None = None) -> Cost:
    """Everything outside the blocks, at residual width ``embed`` (default: the dense one)."""
    return _stem_head(geometry, convention, embed).cost()


# --- whole networks ------------------------------------------------------------------------------------------


def at_width(b: BlockGeom, embed: int, dense_embed: int) -> BlockGeom:
    """The block at residual width ``embed`` (dense: ``dense_embed``): ViT C', Swin stage s C'·2^s.

    Only ``dim`` changes: ``heads``/``head_dim`` (the conv bottleneck) and the dense ``hidden`` stay.
    """
    return b if embed == dense_embed else replace(b, dim=embed * 2**b.stage)


def _arch(g: Geometry, arch: FrozenArch, convention: str) -> _Tally:
    if len(arch.blocks) != g.depth:
        raise ValueError(f"the architecture has {len(arch.blocks)} blocks but the backbone has {g.depth}")
    total = _stem_head(g, convention, arch.embed)
    for b, a in zip(g.blocks, arch.blocks, strict=True):
        total += _block(at_width(b, arch.embed, g.embed_dim), a, convention)
    return total


def arch_cost(geometry: Geometry, arch: FrozenArch, convention: Convention) -> Cost:
    """Total cost of one point of the space (every block's choices plus stem and head)."""
    return _arch(geometry, arch, convention).cost()


def dense_arch(geometry: Geometry) -> FrozenArch:
    """The dense backbone as a :class:`FrozenArch` (every block msa, full FFN, dense heads)."""
    blocks = tuple(BlockArch("msa", b.hidden, b.heads, b.head_dim, 1.0) for b in geometry.blocks)
    return FrozenArch(blocks, geometry.embed_dim)


def dense_cost(geometry: Geometry, convention: Convention) -> Cost:
    """Total cost of the dense backbone; its params equal timm's parameter count."""
    return arch_cost(geometry, dense_arch(geometry), convention)


def breakdown(geometry: Geometry, arch: FrozenArch, convention: Convention = "exact") -> dict[str, float]:
    """MACs by category: ``matmul`` (linear, matmul, bmm, conv: what FlopCounterMode counts, ÷ 2), ``norm``
    (LayerNorm, BatchNorm), ``pool`` (Swin's global average pool) and their ``total``."""
    t = _arch(geometry, arch, convention)
    return {"matmul": t.matmul, "norm": t.norm, "pool": t.pool, "total": t.matmul + t.norm + t.pool}
