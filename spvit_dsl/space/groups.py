"""Unit groups (space stage, pure Python): one abstraction for every prunable dimension.

A **unit group** is a named set of coupled units that are kept or removed together — an embedding channel, a head,
a per-head channel, an FFN neuron, an attention op level, a single weight — named by the path the language, the
search graph and the checkpoints share:

==========================  ===========  ==============================================================
path                        kind         units
==========================  ===========  ==============================================================
``embed``                   embed        residual channels of a ViT (every block, the stem and the head)
``stages.{s}.embed``        embed        residual channels of Swin stage ``s``
``blocks.{i}.attention``    attention    levels of the block's nested attention ops (SPViT)
``blocks.{i}.heads``        heads        the block's attention heads
``blocks.{i}.head_dim``     head_dim     per-head channels (the same index in every kept head)
``blocks.{i}.ffn``          ffn          hidden FFN neurons (packed SwiGLU: two fc1 rows each)
``blocks.{i}.attn.qkv``     weights      single weights of qkv (likewise ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``)
==========================  ===========  ==============================================================

The group (this module: its size, candidate kept counts and coupled tensor slices), its mask (a tensor during a
search, :mod:`spvit_dsl.supernet`) and its kept indices (an ordered list at freeze, in checkpoints) are three
separate things. A :class:`~.plan.FrozenArch` holds counts only; :func:`value_of` and :func:`with_value` read and set
one group's count in it, so the budget projection works on any group kind the same way.

Coupled slices follow the Torch-Pruning idea of a dependency group (the tensor slices that must shrink together),
declared here from the backbone family rather than traced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .geometry import BlockGeom, Geometry
from .plan import LAYERS, FrozenArch, Space

__all__ = [
    "FIELDS",
    "KINDS",
    "GroupKind",
    "Slice",
    "UnitGroup",
    "block_path",
    "decisions",
    "embed_path",
    "groups",
    "layer_module",
    "slices",
    "value_of",
    "with_value",
]

GroupKind = Literal["embed", "attention", "heads", "head_dim", "ffn", "weights"]
KINDS: tuple[GroupKind, ...] = ("embed", "attention", "heads", "head_dim", "ffn", "weights")

# the language's field for each group kind (``weights`` groups are declared with ``sparsity``)
FIELDS: dict[str, str] = {kind: kind for kind in KINDS} | {"weights": "sparsity"}

# layer → its module path inside a block (timm names)
_LAYER_MODULE = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def layer_module(layer: str) -> str:
    """``qkv`` → ``attn.qkv``, ``fc1`` → ``mlp.fc1`` (the layer's module inside a block)."""
    return _LAYER_MODULE[layer]


def embed_path(geometry: Geometry, stage: int) -> str:
    return f"stages.{stage}.embed" if geometry.family == "swin" else "embed"


def block_path(block: int, kind: str) -> str:
    """``blocks.{i}.{kind}``; a sparsifiable layer (qkv, proj, fc1, fc2) gives ``blocks.{i}.attn.qkv`` etc."""
    return f"blocks.{block}.{_LAYER_MODULE.get(kind, kind)}"


@dataclass(frozen=True)
class Slice:
    """The part of one tensor of the dense timm model that a group's units own.

    The tensor's ``axis`` is viewed as ``(outer, units, inner)``: unit ``u`` owns positions
    ``o·units·inner + u·inner + j`` for every ``o < outer`` and ``j < inner`` (``qkv`` rows of head ``h`` are
    ``(3, heads, head_dim)``; patch merging's input channels ``(4, C, 1)``).
    """

    tensor: str
    axis: int
    outer: int = 1
    inner: int = 1

    def positions(self, kept: Sequence[int], units: int) -> list[int]:
        """Tensor positions along ``axis`` of the ``kept`` units, outer-major, in the order of ``kept``."""
        return [
            o * units * self.inner + u * self.inner + j
            for o in range(self.outer)
            for u in kept
            for j in range(self.inner)
        ]


@dataclass(frozen=True)
class UnitGroup:
    """A named set of coupled units and the kept counts a point may give it.

    ``choices``: candidate kept counts, ascending (``attention``: op names along the single path; ``weights``:
    densities). ``granule``: FFN neurons that share one gate (``groups of N``). ``slices``: the coupled tensor slices
    of the dense model (:func:`slices`; ``attention`` and ``weights`` groups own whole tensors).
    """

    path: str
    kind: GroupKind
    size: int  # units of the dense backbone (weights: elements of the matrix; attention: op levels)
    choices: tuple[int | float | str, ...]
    block: int | None = None
    stage: int = 0
    granule: int = 1
    layer: str | None = None  # weights groups: qkv | proj | fc1 | fc2

    @property
    def decision(self) -> bool:
        """Whether a search chooses among several candidates here."""
        return len(self.choices) > 1

    @property
    def structured(self) -> bool:
        """Units are channels/heads/neurons (removing them shrinks tensors), not op levels or single weights."""
        return self.kind in ("embed", "heads", "head_dim", "ffn")


# --- the groups of a space ------------------------------------------------------------------------------------


def groups(space: Space) -> list[UnitGroup]:
    """Every dimension of the space with its candidates (fixed ones included), embed first, then block by block."""
    g = space.geometry
    out = [
        UnitGroup(embed_path(g, s), "embed", g.stage_dim(s), tuple(space.embed[s]), stage=s)
        for s in range(g.stages)
    ]
    for p in space.plans:
        b = p.geom
        i = b.index
        ffn = p.ffn.candidates(b.hidden)
        granule = p.ffn.group if p.ffn.granular else 1
        out += [
            UnitGroup(block_path(i, "attention"), "attention", len(p.attention), p.attention, i, b.stage),
            UnitGroup(block_path(i, "heads"), "heads", b.heads, p.heads, i, b.stage),
            UnitGroup(block_path(i, "head_dim"), "head_dim", b.head_dim, p.head_dim, i, b.stage),
            UnitGroup(block_path(i, "ffn"), "ffn", b.hidden, ffn, i, b.stage, granule),
        ]
        for layer in LAYERS:
            out.append(
                UnitGroup(
                    block_path(i, layer),
                    "weights",
                    _weights(b, layer),
                    p.density.of(layer),
                    i,
                    b.stage,
                    layer=layer,
                )
            )
    return out


def decisions(space: Space) -> list[UnitGroup]:
    """The groups a search chooses in (more than one candidate): the encoding an algorithm sees."""
    return [grp for grp in groups(space) if grp.decision]


def _weights(b: BlockGeom, layer: str) -> int:
    inner = b.heads * b.head_dim
    return {
        "qkv": 3 * inner * b.dim,
        "proj": b.dim * inner,
        "fc1": b.dim * b.fc1_per_neuron * b.hidden,
        "fc2": b.hidden * b.dim,
    }[layer]


# --- reading and setting one group's value in a point ----------------------------------------------------------


def value_of(arch: FrozenArch, group: UnitGroup) -> int | float | str:
    """The group's count in ``arch`` (op name for attention, density for weights)."""
    if group.kind == "embed":
        return arch.embed[group.stage]
    assert group.block is not None
    b = arch.blocks[group.block]
    if group.kind == "attention":
        return b.op
    if group.kind == "weights":
        assert group.layer is not None
        return b.density.of(group.layer)
    return {"heads": b.heads, "head_dim": b.head_dim, "ffn": b.ffn}[group.kind]


def with_value(arch: FrozenArch, group: UnitGroup, value: int | float | str) -> FrozenArch:
    """``arch`` with the group set to ``value``."""
    if group.kind == "embed":
        embed = list(arch.embed)
        embed[group.stage] = int(value)
        return replace(arch, embed=tuple(embed))
    assert group.block is not None
    b = arch.blocks[group.block]
    if group.kind == "attention":
        return arch.with_block(group.block, op=str(value))
    if group.kind == "weights":
        assert group.layer is not None
        return arch.with_block(group.block, density=replace(b.density, **{group.layer: float(value)}))
    return arch.with_block(group.block, **{group.kind: int(value)})


# --- coupled slices -----------------------------------------------------------------------------------------------


def slices(
    geometry: Geometry, group: UnitGroup, *, heads: int | None = None, head_dim: int | None = None
) -> tuple[Slice, ...]:
    """The tensor slices of the timm model that ``group``'s units own (see :class:`Slice`).

    Heads and per-head channels together select attention channel ``h·head_dim + c`` of q, k, v and of proj's
    input; ``heads``/``head_dim`` give the block's current counts when the other group was already cut (default:
    the dense ones). ``attention`` and ``weights`` groups return ``()``. SwinV2 blocks use timm's
    ``SwinTransformerV2`` names: ``q_bias``/``v_bias`` for the qkv bias, ``logit_scale`` and ``cpb_mlp.2.weight``
    per head, and patch merging's norm after its reduction; SwinV2-CR blocks timm's ``SwinTransformerV2Cr`` names
    (``stages.{s}``, a fused ``qkv.bias``, ``logit_scale`` and ``meta_mlp.fc2`` per head, ``norm3``, v1's merging, no
    final ``norm``) (checked against timm in ``tests/test_groups.py``). A packed SwiGLU FFN's neuron owns two rows of
    fc1, its value and gate rows ``(2, hidden, 1)``.
    """
    if group.kind == "embed":
        return _embed_slices(geometry, group.stage)
    if group.block is None or group.kind in ("attention", "weights"):
        return ()
    b = geometry.blocks[group.block]
    m = b.module
    h = b.heads if heads is None else heads
    d = b.head_dim if head_dim is None else head_dim
    if group.kind == "ffn":  # neuron j: fc1 row j (a packed GLU: rows j and hidden + j), fc2 column j
        return (
            Slice(f"{m}.mlp.fc1.weight", 0, b.fc1_per_neuron),
            Slice(f"{m}.mlp.fc1.bias", 0, b.fc1_per_neuron),
            Slice(f"{m}.mlp.fc2.weight", 1),
        )
    if group.kind == "heads":  # head u: rows u·d .. u·d+d of q, k and v, columns of proj, its position bias
        return (
            Slice(f"{m}.attn.qkv.weight", 0, 3, d),
            *_qkv_bias_slices(b, 1, d),
            Slice(f"{m}.attn.proj.weight", 1, 1, d),
            *_position_bias_slices(b),
        )
    return (  # head_dim: channel c of every head, in q, k and v
        Slice(f"{m}.attn.qkv.weight", 0, 3 * h, 1),
        *_qkv_bias_slices(b, h, 1),
        Slice(f"{m}.attn.proj.weight", 1, h, 1),
    )


def _qkv_bias_slices(b: BlockGeom, outer: int, inner: int) -> list[Slice]:
    """The q, k, v biases viewed like each of q, k, v's rows: ``(outer, units, inner)`` per projection. timm fuses
    them in ``qkv.bias`` (so ``3·outer``), as SwinV2-CR does; SwinV2 learns ``q_bias`` and ``v_bias`` apart (k's is a
    zero buffer)."""
    if not b.qkv_bias:
        return []
    if b.swin_v2 and not b.swin_v2_cr:
        return [Slice(f"{b.module}.attn.{name}", 0, outer, inner) for name in ("q_bias", "v_bias")]
    return [Slice(f"{b.module}.attn.qkv.bias", 0, 3 * outer, inner)]


def _position_bias_slices(b: BlockGeom) -> list[Slice]:
    """What a Swin block holds per head besides q, k, v: v1's relative-position table (one column per head);
    SwinV2's logit scale ``(heads, 1, 1)`` and its position-bias MLP's output rows ``cpb_mlp.2.weight``
    ``(heads, 512)`` (the MLP's first layer is shared by every head); SwinV2-CR's logit scale ``(heads,)`` and its
    MLP's output layer ``meta_mlp.fc2`` (weight ``(heads, 384)`` and bias)."""
    if not b.window:
        return []
    attn = f"{b.module}.attn"
    if b.swin_v2_cr:
        names = ("logit_scale", "meta_mlp.fc2.weight", "meta_mlp.fc2.bias")
        return [Slice(f"{attn}.{name}", 0) for name in names]
    if b.swin_v2:
        return [Slice(f"{attn}.logit_scale", 0), Slice(f"{attn}.cpb_mlp.2.weight", 0)]
    return [Slice(f"{attn}.relative_position_bias_table", 1)]


def _block_embed_slices(b: BlockGeom) -> list[Slice]:
    names = [
        ("norm1.weight", 0), ("norm1.bias", 0), ("attn.qkv.weight", 1), ("attn.proj.weight", 0),
        ("attn.proj.bias", 0), ("norm2.weight", 0), ("norm2.bias", 0), ("mlp.fc1.weight", 1),
        ("mlp.fc2.weight", 0), ("mlp.fc2.bias", 0),
    ]  # fmt: skip
    if b.layer_scale:
        names += [("ls1.gamma", 0), ("ls2.gamma", 0)]
    if b.extra_norm:
        names += [("norm3.weight", 0), ("norm3.bias", 0)]
    return [Slice(f"{b.module}.{name}", axis) for name, axis in names]


def _embed_slices(g: Geometry, stage: int) -> tuple[Slice, ...]:
    out: list[Slice] = []
    if stage == 0:
        out.append(Slice("patch_embed.proj.weight", 0))
        if g.patch_bias:
            out.append(Slice("patch_embed.proj.bias", 0))
    if g.family == "vit":
        tokens = [("cls_token", g.class_token), ("reg_token", g.reg_tokens > 0), ("dist_token", g.dist_token)]
        out += [Slice(name, 2) for name, present in tokens if present]
        out.append(Slice("pos_embed", 2))
        if g.pre_norm:
            out += [Slice("norm_pre.weight", 0), Slice("norm_pre.bias", 0)]
    elif stage == 0:
        out += [Slice("patch_embed.norm.weight", 0), Slice("patch_embed.norm.bias", 0)]
    else:
        out += _merging_out_slices(g, stage)
    for b in g.blocks:
        if b.stage == stage:
            out += _block_embed_slices(b)
    if stage + 1 < g.stages:
        out += _merging_in_slices(g, stage + 1)
    if stage == g.stages - 1:
        if g.final_norm:  # Swin v1 and SwinV2 have one; SwinV2-CR's last block's norm3 stands in
            out += [Slice("norm.weight", 0), Slice("norm.bias", 0)]
        if g.family == "vit" and g.fc_norm:
            out += [Slice("fc_norm.weight", 0), Slice("fc_norm.bias", 0)]
        if g.family == "vit" and g.global_pool == "map":
            # the attention pool reads the stream through kv only; its own width (and the head's input) is not the
            # stream's: the checker keeps the embedding width dense, so this slice only ever reorders channels
            out.append(Slice("attn_pool.kv.weight", 1))
        elif g.num_classes == 0:
            pass
        elif g.family == "swin":
            out.append(Slice("head.fc.weight", 1))
        else:
            out += [Slice("head.weight", 1)] + ([Slice("head_dist.weight", 1)] if g.dist_token else [])
    return tuple(out)


def _merging(g: Geometry, stage: int) -> str:
    """The patch merging into ``stage``: ``layers.{s}.downsample`` (SwinV2-CR: ``stages.{s}.downsample``)."""
    return f"{'stages' if g.swin_v2_cr else 'layers'}.{stage}.downsample"


def _merging_in_slices(g: Geometry, stage: int) -> list[Slice]:
    """What the previous stage's channels own in the patch merging into ``stage``: its input, the 2x2 neighbours
    concatenated ``(4, C, 1)`` — read by the reduction, and first normalised in Swin v1 and SwinV2-CR (SwinV2
    normalises after)."""
    merging = _merging(g, stage)
    norm = [] if g.swin_v2 else [Slice(f"{merging}.norm.weight", 0, 4), Slice(f"{merging}.norm.bias", 0, 4)]
    return [*norm, Slice(f"{merging}.reduction.weight", 1, 4)]


def _merging_out_slices(g: Geometry, stage: int) -> list[Slice]:
    """What ``stage``'s channels own in the patch merging into it: the reduction's output rows, and in SwinV2 the
    LayerNorm over them (timm's v2 ``PatchMerging``: reduction, then norm)."""
    merging = _merging(g, stage)
    norm = [Slice(f"{merging}.norm.weight", 0), Slice(f"{merging}.norm.bias", 0)] if g.swin_v2 else []
    return [Slice(f"{merging}.reduction.weight", 0), *norm]
