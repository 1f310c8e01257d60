"""The analytic cost model (space stage, pure Python): kept counts → multiply-adds and parameters.

Input: the backbone's :class:`~.geometry.Geometry` and an assignment of kept counts to every dimension —
:class:`Counts`: the residual width of every stage, and per block the op weights, heads, per-head width, FFN width
and the density of each sparsifiable layer. Output: a :class:`Tally` (MACs per image by category, parameters).

The formulas are written once, with ``+``, ``*`` and ``-`` only, so the same code prices

* a frozen point (:func:`arch_cost`: integer counts, a one-hot op) — what ``compile``, ``freeze`` and budgets use;
* a search state (:func:`tally` on tensors: expected counts, op probabilities) — the supernet's differentiable cost.
  Products such as embedding width × FFN width or heads × head_dim × tokens are exact, not linearised, and at hard
  masks the two agree.

Two conventions (``docs/cost-model.md`` has every formula):

* ``paper`` — SPViT's own FLOPs formulas (He et al., TPAMI 2024, §3 of ``shared/reference/spvit.md``): weight and
  attention matmuls; the prefix (cls) tokens are left out of the FFN; LayerNorm counts one MAC per element;
  BatchNorm, activations, softmax and biases are free; Swin adds the official code's pooling term.
* ``exact`` — fvcore's convention on the timm module: every matmul/conv over every token (cls included),
  LayerNorm 5 MACs per element, eval-mode BatchNorm 2 per element, the global average pool one per input element.
  Its ``matmul`` part is exactly what ``torch.utils.flop_counter.FlopCounterMode`` reports ÷ 2 at batch 1.

SwinV2 (Liu et al., "Swin Transformer V2", CVPR 2022; timm's ``swin_transformer_v2.py``) is priced as Swin v1 but
for three things: its window attention learns q and v biases only and a logit scale per head; the continuous
position bias MLP (2 → 512 → heads) replaces v1's relative-position table and runs on the window's ``(2W−1)²``
relative coordinates once per forward, whatever the batch (``exact`` counts its multiply-adds at batch 1, as
FlopCounterMode sees them; ``paper`` leaves them out, as the official ``flops()`` does, and so reproduces every
published SwinV2 figure); patch merging normalises after its reduction, over ``C'`` instead of ``4C``. Its
res-post-norm blocks (``x + norm1(attn(x))``, paper §3.2) price like v1's pre-norm ones, and what the scaled cosine
attention adds around its matmuls (normalising q and k, the logit scale, the bias's ``16·sigmoid``) is free, like
softmax.

timm's SwinV2-CR (``swin_transformer_v2_cr.py``, its own re-implementation of SwinV2) has the same post-norm cosine
attention blocks with a fused qkv bias (k's included), a logit scale per head and a position-bias MLP
(2 → 384 → heads, both layers biased) evaluated on every *pair* of window positions (``area²`` inputs, ``area`` the
window's ``W²``), once per forward (``exact``: at batch 1; ``paper``: none, as for SwinV2 — no official FLOPs code
exists for it); some blocks end with a LayerNorm ``norm3`` over every token, which belongs to the block whatever
runs in it; patch merging is v1's; there is no final norm (the last block's ``norm3`` normalises the last map).

timm's packed SwiGLU FFN (``SwiGLUPacked``: DINOv2-g, TIPSv2-g) has fc1 = Linear(C, 2w) — each of the ``w`` neurons
owns a value row and a gate row — and fc2 = Linear(w, C); its gate ``SiLU(a) ⊙ b`` is free, like GELU.

Accounting choices (the same in both conventions; the compact network is built to match them):

* the attention branch of a block — ``norm1`` included (before the branch, or after it in SwinV2's post-norm blocks)
  — belongs to its op: a ``skip`` block runs neither;
* ``norm2`` and ``fc2.bias`` belong to every block: an FFN kept at width 0 still adds ``fc2.bias``; so does
  SwinV2-CR's ``norm3``;
* a conv op's bottleneck is the block's kept per-head width; its layers are never sparsified;
* ``density`` (unstructured sparsity, our extension for DIMAP-style pruning) counts the non-zero weights of qkv,
  proj, fc1 and fc2 and their multiply-adds (a packed SwiGLU's fc1: of its 2w·C weights); a cost with a density
  below 1 is reported as sparse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .geometry import CPB_HIDDEN, META_HIDDEN, BlockGeom, Convention, Geometry
from .ops import OPS
from .plan import LAYERS, BlockArch, Cost, FrozenArch, dense_arch

__all__ = [
    "CATEGORIES",
    "BlockCounts",
    "Counts",
    "Tally",
    "arch_cost",
    "block_cost",
    "breakdown",
    "counts_of",
    "dense_arch",
    "dense_cost",
    "stem_head_cost",
    "tally",
]

CATEGORIES: tuple[str, ...] = ("matmul", "norm", "pool")

# A count: an int or float for a frozen point, a torch tensor (any dtype with arithmetic) during a search.
Num = Any

# per-element MACs of the non-matmul layers
_LAYERNORM = {"paper": 1, "exact": 5}
_BATCHNORM = {"paper": 0, "exact": 2}


@dataclass
class Tally:
    """MACs by category plus parameters (numbers or tensors)."""

    matmul: Num = 0
    norm: Num = 0
    pool: Num = 0
    params: Num = 0
    sparse: bool = False

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.matmul + other.matmul,
            self.norm + other.norm,
            self.pool + other.pool,
            self.params + other.params,
            self.sparse or other.sparse,
        )

    def scaled(self, weight: Num) -> Tally:
        return Tally(
            self.matmul * weight, self.norm * weight, self.pool * weight, self.params * weight, self.sparse
        )

    @property
    def macs(self) -> Num:
        return self.matmul + self.norm + self.pool

    def of(self, metric: str) -> Num:
        """``flops``/``macs`` (multiply-adds) or ``params``; ValueError for anything else."""
        if metric == "params":
            return self.params
        if metric in ("flops", "macs"):
            return self.macs
        raise ValueError(f"unknown cost metric '{metric}' (flops, macs or params)")

    def cost(self) -> Cost:
        return Cost(self.macs, self.params, self.sparse)


@dataclass
class BlockCounts:
    """What one block keeps: op weights (one-hot when frozen), heads, per-head width, FFN width, densities."""

    ops: Mapping[str, Num]
    heads: Num
    head_dim: Num
    ffn: Num
    density: Mapping[str, Num] = field(default_factory=dict)  # layer → density; missing layers are dense


@dataclass
class Counts:
    """Kept counts for a whole network: the residual width of every stage and every block's counts."""

    embed: Sequence[Num]
    blocks: Sequence[BlockCounts]


def counts_of(arch: FrozenArch) -> Counts:
    """The counts of a frozen point."""
    blocks = [
        BlockCounts({b.op: 1}, b.heads, b.head_dim, b.ffn, {layer: b.density.of(layer) for layer in LAYERS})
        for b in arch.blocks
    ]
    return Counts(arch.embed, blocks)


def _check_convention(convention: str) -> None:
    if convention not in _LAYERNORM:
        raise ValueError(f"unknown cost convention '{convention}'; expected 'paper' or 'exact'")


def _is_one(x: Num) -> bool:
    return isinstance(x, int | float) and x == 1


def _nnz(count: Num, density: Num) -> Num:
    """Kept (non-zero) weights of a matrix of ``count`` weights at ``density``: rounded to a whole number for a
    frozen point, exact ``count · density`` for tensors."""
    if _is_one(density):
        return count
    product = count * density
    return round(product) if isinstance(product, int | float) else product


def _sparse(counts: BlockCounts) -> bool:
    return any(isinstance(d, int | float) and d != 1 for d in counts.density.values()) or any(
        not isinstance(d, int | float) for d in counts.density.values()
    )


# --- one block ------------------------------------------------------------------------------------------------


def _norm(b: BlockGeom, dim: Num, convention: str) -> Tally:
    """One LayerNorm over every token of the block at width ``dim``."""
    return Tally(norm=_LAYERNORM[convention] * b.tokens * dim, params=2 * dim)


def _msa(b: BlockGeom, dim: Num, c: BlockCounts, convention: str) -> Tally:
    """qkv (C → 3D, bias unless the backbone has none), attention matmuls (over a Swin map padded to whole
    windows, as timm runs them) (2·N·M·D, M keys per query), proj (D → C, bias); D = heads·head_dim; Swin adds
    its position bias (:func:`_position_bias`)."""
    inner = c.heads * c.head_dim
    tokens = b.attention_tokens  # Swin: the map padded to whole windows
    keys = b.window**2 if b.window else tokens  # Swin attends within windows, ViT over all tokens
    d_qkv, d_proj = c.density.get("qkv", 1), c.density.get("proj", 1)
    qkv = _nnz(3 * dim * inner, d_qkv)
    proj = _nnz(dim * inner, d_proj)
    out = Tally(
        matmul=tokens * (qkv + proj) + 2 * tokens * keys * inner,
        params=qkv + _qkv_bias(b, inner) + proj + dim,
    )
    return out + _position_bias(b, c.heads, convention) if b.window else out


def _qkv_bias(b: BlockGeom, inner: Num) -> Num:
    """The learned q, k, v biases: ``3D``; SwinV2 learns q's and v's only (``q_bias``, ``v_bias``; k's is a
    non-persistent zero buffer in timm): ``2D``; SwinV2-CR fuses all three in ``qkv.bias``: ``3D``."""
    if not b.qkv_bias:
        return 0
    return (2 if b.swin_v2 and not b.swin_v2_cr else 3) * inner


def _position_bias(b: BlockGeom, heads: Num, convention: str) -> Tally:
    """A Swin block's relative position bias over its ``(2W−1)²`` relative offsets in a window.

    Swin v1: a learned table of ``(2W−1)² × heads`` entries, gathered (no multiply-adds). SwinV2 (Liu et al.,
    2022, §3.3; timm's ``WindowAttention``): the log-spaced continuous position bias, an MLP ``Linear(2, 512)`` →
    ReLU → ``Linear(512, heads, bias=False)`` evaluated on every relative offset once per forward, whatever the
    batch (``exact``: its multiply-adds at batch 1; ``paper``: none, as in the official ``flops()``), plus the
    per-head ``logit_scale`` of the scaled cosine attention (the scaling and ``16·sigmoid`` are elementwise: free).
    SwinV2-CR: :func:`_pairwise_position_bias`.
    """
    if b.swin_v2_cr:
        return _pairwise_position_bias(b, heads, convention)
    offsets = (2 * b.window - 1) ** 2
    if not b.swin_v2:
        return Tally(params=offsets * heads)
    weights = 2 * CPB_HIDDEN + CPB_HIDDEN * heads
    macs = offsets * weights if convention == "exact" else 0
    return Tally(matmul=macs, params=weights + CPB_HIDDEN + heads)


def _pairwise_position_bias(b: BlockGeom, heads: Num, convention: str) -> Tally:
    """SwinV2-CR's position bias (timm's ``WindowMultiHeadAttention``): the MLP ``meta_mlp``, ``Linear(2, 384)`` →
    ReLU → ``Linear(384, heads)`` (both biased), on the log-spaced coordinates of every pair of window positions
    (``area²`` rows, ``area = W²``: ``relative_coordinates_log``), once per forward whatever the batch (``exact``:
    its multiply-adds at batch 1; ``paper``: none, as SwinV2's), and the per-head ``logit_scale`` (``heads`` values;
    the scaling is elementwise: free)."""
    pairs = (b.window * b.window) ** 2
    weights = 2 * META_HIDDEN + META_HIDDEN * heads
    macs = pairs * weights if convention == "exact" else 0
    return Tally(matmul=macs, params=weights + META_HIDDEN + heads + heads)


def _conv(b: BlockGeom, dim: Num, bottleneck: Num, kernel: int, convention: str) -> Tally:
    """Conv2d(C, d, k, bias) → BN(d) → ReLU → Conv2d(d, C, 1, bias) on the patch map, d = the kept head width.

    Prefix tokens pass the branch unchanged (they are not on the map), so only H·W positions are computed.
    """
    weights = kernel * kernel * dim * bottleneck + bottleneck * dim
    return Tally(
        matmul=b.patches * weights,
        norm=_BATCHNORM[convention] * b.patches * bottleneck,
        params=weights + bottleneck + 2 * bottleneck + dim,
    )


def _op(b: BlockGeom, op: str, dim: Num, c: BlockCounts, convention: str) -> Tally:
    """The attention branch running ``op``: norm1, the branch and its layer scale ``ls1`` (``skip``: nothing)."""
    if op == "skip":
        return Tally()
    if op == "msa":
        branch = _msa(b, dim, c, convention)
    else:
        kernel = OPS.get(op).kernel
        if kernel is None:
            raise ValueError(f"the cost model has no formula for op '{op}'")
        branch = _conv(b, dim, c.head_dim, kernel, convention)
    return _norm(b, dim, convention) + branch + _layer_scale(b, dim)


def _layer_scale(b: BlockGeom, dim: Num) -> Tally:
    """A layer scale's per-channel gamma (an elementwise product: no multiply-adds in either convention)."""
    return Tally(params=dim) if b.layer_scale else Tally()


def _ffn(b: BlockGeom, dim: Num, c: BlockCounts, convention: str) -> Tally:
    """norm2, fc1 (C → w, bias), GELU, fc2 (w → C, bias), layer scale ``ls2``; the paper leaves the prefix tokens
    out of the matmuls. A packed SwiGLU's fc1 is C → 2w (bias 2w: each neuron's value and gate rows); its gate
    ``SiLU(a) ⊙ b`` is elementwise, free like GELU."""
    tokens = b.patches if convention == "paper" else b.tokens
    rows = b.fc1_per_neuron * c.ffn
    fc1 = _nnz(dim * rows, c.density.get("fc1", 1))
    fc2 = _nnz(c.ffn * dim, c.density.get("fc2", 1))
    return (
        _norm(b, dim, convention)
        + Tally(matmul=tokens * (fc1 + fc2), params=fc1 + rows + fc2 + dim)
        + _layer_scale(b, dim)
    )


def _block(b: BlockGeom, dim: Num, c: BlockCounts, convention: str) -> Tally:
    total = _ffn(b, dim, c, convention)
    if b.extra_norm:  # SwinV2-CR's norm3 on the main branch: the block's whatever its op and FFN width
        total = total + _norm(b, dim, convention)
    for op, weight in c.ops.items():
        if isinstance(weight, int | float) and weight == 0:
            continue
        part = _op(b, op, dim, c, convention)
        total = total + (part if _is_one(weight) else part.scaled(weight))
    total.sparse = _sparse(c)
    return total


def block_cost(b: BlockGeom, arch: BlockArch, convention: Convention, dim: int | None = None) -> Cost:
    """One whole block at the choices ``arch`` and residual width ``dim`` (default: the dense width)."""
    _check_convention(convention)
    (counts,) = counts_of(FrozenArch((arch,), (b.dim,))).blocks
    return _block(b, b.dim if dim is None else dim, counts, convention).cost()


# --- stem and head --------------------------------------------------------------------------------------------


def _linear_head(g: Geometry, width: Num, copies: int) -> Tally:
    """Classifier(s) on one pooled/class-token feature vector; a distilled DeiT runs two (head, head_dist)."""
    if g.num_classes == 0:
        return Tally()
    return Tally(
        matmul=copies * width * g.num_classes, params=copies * (width * g.num_classes + g.num_classes)
    )


def _patch_embed(g: Geometry, embed: Num) -> Tally:
    grid = g.blocks[0].grid
    weights = g.in_chans * g.patch_size**2 * embed
    return Tally(matmul=grid[0] * grid[1] * weights, params=weights + (embed if g.patch_bias else 0))


def _vit_stem_head(g: Geometry, convention: str, embed: Num) -> Tally:
    """Patch embed, class/register/distillation tokens and the position embedding, the pre-norm (CLIP), the final
    LayerNorm over every token or the pooled feature's norm, the average pool, head(s).

    The paper's DeiT formulas leave the final norm out; the norms DeiT does not have (pre-norm, the pooled feature's
    norm) and the average pool count in both conventions (our extension)."""
    ln = _LAYERNORM[convention]
    tokens = g.blocks[0].tokens
    patches = g.blocks[0].patches
    out = _patch_embed(g, embed)
    embedded = patches if g.no_embed_class else tokens  # timm's embed_len
    out += Tally(params=g.prefix_tokens * embed + embedded * embed)
    if g.pre_norm:
        out += Tally(norm=ln * tokens * embed, params=2 * embed)
    if g.final_norm:
        out += Tally(norm=ln * tokens * embed if convention == "exact" else 0, params=2 * embed)
    if g.global_pool == "avg":
        out += Tally(pool=patches * embed)  # the mean over the patch tokens (timm leaves the prefix out)
    elif g.global_pool == "map":
        out += _attention_pool(g, convention, embed)
    if g.fc_norm:
        out += Tally(norm=ln * embed, params=2 * embed)
    return out + _linear_head(g, embed, g.heads_out)


def _attention_pool(g: Geometry, convention: str, embed: Num) -> Tally:
    """SigLIP's attention pool (timm's ``AttentionPoolLatent``) over the ``HW`` patch tokens: a learned query
    (``latent``, 1 × C), ``q`` (C → C) on it, ``kv`` (C → 2C) on every patch token, the attention matmuls
    (2·HW·C), ``proj`` (C → C), a LayerNorm and an MLP (C → h → C, ``h`` the blocks' dense FFN width) on the one
    pooled token; every linear layer has a bias. Not pruned: the embedding width stays dense (the checker says so)."""
    patches, hidden = g.blocks[0].patches, g.blocks[0].hidden
    one_token = embed * embed + embed * embed + 2 * embed * hidden  # q, proj, fc1 + fc2 on the pooled token
    weights = one_token + 2 * embed * embed  # + kv
    biases = embed + 2 * embed + embed + hidden + embed  # q, kv, proj, fc1, fc2
    return Tally(
        matmul=one_token + patches * 2 * embed * embed + 2 * patches * embed,
        norm=_LAYERNORM[convention] * embed,
        params=embed + weights + biases + 2 * embed,  # latent, linear layers, LayerNorm
    )


def _div(x: Num, k: int) -> Num:
    """``x // k`` for numbers (the official code's integer arithmetic), ``x / k`` for tensors."""
    return x // k if isinstance(x, int) else x / k


def _swin_stem_head(g: Geometry, convention: str, embed: Sequence[Num]) -> Tally:
    """Patch embed + its LayerNorm, patch merging before stages 1.., final LayerNorm, global average pool, head
    (Swin v1 and SwinV2 alike but for the merging's norm; SwinV2-CR merges as v1 and has no final norm)."""
    ln = _LAYERNORM[convention]
    grid0 = g.blocks[0].grid
    out = _patch_embed(g, embed[0]) + Tally(norm=ln * grid0[0] * grid0[1] * embed[0], params=2 * embed[0])
    stages = len(g.depths)
    for s in range(1, stages):
        out += _patch_merging(g, s, embed[s - 1], embed[s], ln)
    features = embed[stages - 1]
    h, w = _stage_grid(g, stages - 1)
    final = g.final_norm  # SwinV2-CR has none
    if convention == "exact":
        out += Tally(norm=ln * h * w * features if final else 0, pool=h * w * features)
    else:  # the official flops(): num_features · H0·W0 / 2^stages, standing in for the final norm/pool
        out += Tally(pool=_div(features * grid0[0] * grid0[1], 2**stages))
    return out + Tally(params=2 * features if final else 0) + _linear_head(g, features, 1)


def _patch_merging(g: Geometry, stage: int, before: Num, after: Num, ln: int) -> Tally:
    """Patch merging into ``stage`` at its (padded) grid: the 2×2 neighbours of the previous stage concatenated
    (``4C``) and ``Linear(4C, C', bias=False)``; Swin v1 normalises before it (LayerNorm over ``4C``), SwinV2 after it
    (LayerNorm over ``C'``: timm's v2 ``PatchMerging``; the official v2 ``flops()`` counts that norm too)."""
    h, w = _stage_grid(g, stage)
    merged = 4 * before
    normed = after if g.swin_v2 else merged
    return Tally(matmul=h * w * merged * after, norm=ln * h * w * normed, params=2 * normed + merged * after)


def _stage_grid(g: Geometry, stage: int) -> tuple[int, int]:
    return next(b.grid for b in g.blocks if b.stage == stage)


def _stem_head(g: Geometry, convention: str, embed: Sequence[Num]) -> Tally:
    _check_convention(convention)
    if len(embed) != g.stages:
        raise ValueError(f"{g.model} has {g.stages} stage width(s), the assignment gives {len(embed)}")
    return (
        _swin_stem_head(g, convention, embed)
        if g.family == "swin"
        else _vit_stem_head(g, convention, embed[0])
    )


def stem_head_cost(geometry: Geometry, convention: Convention, embed: Sequence[int] | None = None) -> Cost:
    """Everything outside the blocks, at the residual widths ``embed`` (per stage; default: the dense ones)."""
    return _stem_head(geometry, convention, geometry.dims if embed is None else embed).cost()


# --- whole networks -------------------------------------------------------------------------------------------


def tally(geometry: Geometry, counts: Counts, convention: Convention) -> Tally:
    """The cost of an assignment of counts (numbers or tensors) by category.

    Raises ``ValueError`` for a convention other than ``paper``/``exact``, an assignment with the wrong number of
    blocks or stages, or an op without a formula.
    """
    if len(counts.blocks) != geometry.depth:
        raise ValueError(
            f"the assignment has {len(counts.blocks)} blocks but the backbone has {geometry.depth}"
        )
    total = _stem_head(geometry, convention, counts.embed)
    for b, c in zip(geometry.blocks, counts.blocks, strict=True):
        total += _block(b, counts.embed[b.stage], c, convention)
    return total


def arch_cost(geometry: Geometry, arch: FrozenArch, convention: Convention) -> Cost:
    """Total cost of one point of the space: multiply-adds per image and parameters (non-zero ones when sparse)."""
    return tally(geometry, counts_of(arch), convention).cost()


def dense_cost(geometry: Geometry, convention: Convention) -> Cost:
    """Total cost of the dense backbone; its params equal timm's parameter count."""
    return arch_cost(geometry, dense_arch(geometry), convention)


def breakdown(geometry: Geometry, arch: FrozenArch, convention: Convention = "exact") -> dict[str, float]:
    """MACs by category: ``matmul`` (linear, matmul, bmm, conv: what FlopCounterMode counts, ÷ 2), ``norm``
    (LayerNorm, BatchNorm), ``pool`` (Swin's global average pool) and their ``total``."""
    t = tally(geometry, counts_of(arch), convention)
    return {"matmul": t.matmul, "norm": t.norm, "pool": t.pool, "total": t.macs}
