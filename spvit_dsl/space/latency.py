"""The latency model (space stage, pure Python): a measured lookup table → predicted milliseconds of a point.

Input: a :class:`LatencyTable` — what one device measured for the backbone's blocks at the space's candidate widths
(``spvit_dsl.compact.latency`` builds it with torch, and caches it per device and library version) — and a
:class:`~.plan.FrozenArch`. Output: the predicted latency of one forward of ``setting.batch`` images, in
milliseconds. This is our extension; SPViT, UP-ViT, OFB and DIMAP budget FLOPs only. The table's layout follows the
latency lookup tables of hardware-aware NAS (ProxylessNAS, FBNet: one measured entry per candidate layer, summed).

Prediction (``docs/latency.md``): ``stem + Σ_blocks (scale[op] · attention(op, heads, head_dim) + scale[ffn] ·
ffn(width))``.

* ``attention`` is a whole block measured with its FFN at width 0 (norm1 + the op + residual + what width 0 still
  runs); ``ffn(width)`` is the same block with a ``skip`` op at that FFN width minus its width-0 time, so the two
  add. Blocks with the same shape facts (stage, grid, window, shift, SwinV2-CR's norm3) share entries.
* Widths between measured ones are interpolated linearly (heads × head_dim bilinearly); measured widths are exact
  lookups. Sparsity does not change a prediction: dense kernels do not run faster for zeros.
* **Alignment.** Matrix kernels run best on widths that are multiples of their vector width: on the development
  VMs' CPUs (2 threads, batch 8) an FFN of 921 or 923 neurons ran 21–27% slower than one of 920. When a
  space offers FFN widths off the measured grid (per neuron, for instance), the table also times a few widths at
  every residue class mod 8 (odd, 2 mod 4, 4 mod 8; ``BlockTable.ffn_offset``), and an integer width off the grid is
  priced as the grid's interpolation times the slowdown its class showed at nearby widths. Fractional widths (the
  expected widths of a training strategy) stay on the grid's curve.
* ``stem`` (patch embedding, position embedding, patch merging, final norm, pooling and head) is measured with the
  blocks removed. ``scale`` calibrates blocks timed alone to blocks inside the network, one factor per part (each op
  and the FFN): whole networks are timed with every block at one op (FFN at full width), plus every block ``skip``
  at FFN width 0 and at full width, and the factors solve those equations. Blocks timed alone can run far apart
  from the same blocks inside a network (in one Swin-T table, 2 threads, batch 8: convolution blocks 1.8–2.4×
  slower inside), so one factor for the whole network (the dense network's, kept as ``scale`` for the record and for
  tables from before) under-predicts networks rich in such ops. Both are measured per embedding width.

The function is piecewise linear in every width, so a block's latency is also defined at expected (fractional)
widths: :meth:`LatencyTable.block_ms` takes floats.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .cost import Counts
from .geometry import BlockGeom, Geometry
from .plan import BlockArch, FfnChoice, FrozenArch, Space

__all__ = [
    "DEVICES",
    "FORMAT",
    "PRECISIONS",
    "UNSTEADY",
    "BlockTable",
    "LatencySetting",
    "LatencyTable",
    "block_kind",
    "interpolate",
    "measured_embeds",
    "measured_points",
    "residue_class",
    "round_for_latency",
    "rounding_space",
]

FORMAT = "spvit-dsl-latency/1"
UNSTEADY = 0.15  # a table whose rounds spread more than this (IQR / median) was measured on a busy machine
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class LatencySetting:
    """Where a latency is measured: ``device`` (``cpu`` or ``cuda``), CPU ``threads`` (``None``: torch's default),
    images per forward (``batch``) and ``precision`` (``fp32``, or ``bf16`` autocast)."""

    device: str = "cpu"
    threads: int | None = None
    batch: int = 8
    precision: str = "fp32"

    def describe(self) -> str:
        threads = (
            f", {self.threads} thread{'s' if self.threads != 1 else ''}"
            if self.threads and self.device == "cpu"
            else ""
        )
        return f"{self.device}{threads}, batch {self.batch}, {self.precision}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "threads": self.threads,
            "batch": self.batch,
            "precision": self.precision,
        }


def block_kind(b: BlockGeom, embed: int) -> str:
    """The key of a block's entries: blocks with the same shape facts at the same residual width run alike (a
    SwinV2-CR block with its extra ``norm3`` is a kind of its own)."""
    norm3 = ":norm3" if b.extra_norm else ""
    return f"stage{b.stage}:grid{b.grid[0]}x{b.grid[1]}:prefix{b.prefix_tokens}:window{b.window}:shift{b.shift}{norm3}:C{embed}"


def interpolate(points: Sequence[tuple[float, float]], x: Any) -> Any:
    """Piecewise-linear ``y(x)`` through ``points`` (ascending x); linear extrapolation past the ends. ``x`` may be
    a number or a 0-d tensor (then the result is one, differentiable in ``x`` with the segment's slope)."""
    if len(points) == 1:
        return points[0][1] + 0 * x
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, _number(x)), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _part(scales: Mapping[str, float], part: str) -> float:
    """The calibration factor of ``part`` in :meth:`LatencyTable.scales_of`'s mapping (``"*"`` when uncalibrated)."""
    return scales.get(part, scales["*"])


def residue_class(width: int) -> int:
    """The alignment class of an FFN width: 8 for a multiple of 8, 4 for 4 mod 8, 2 for 2 mod 4, 1 for odd widths
    (the largest power of two, up to 8, that divides it). Widths of one class run alike next to a multiple of 8."""
    for c in (8, 4, 2):
        if width % c == 0:
            return c
    return 1


def _number(x: Any) -> float:
    """A number or a 0-d tensor's value (detached: it only locates a segment)."""
    return float(x.detach()) if hasattr(x, "detach") else float(x)


@dataclass
class BlockTable:
    """One block kind at one residual width: milliseconds per forward of ``batch`` images.

    ``msa[(heads, head_dim)]`` and ``conv[op][bottleneck]``: the block with that op and its FFN at width 0; ``skip``:
    the same with no attention branch; ``ffn``: ``(width, extra ms over width 0)``, ascending from ``(0, 0)``;
    ``ffn_offset``: the same at a few widths off the multiples of 8 (ascending; empty when the space offers no such
    width between grid points, and in tables from before they were measured).
    """

    msa: dict[tuple[int, int], float] = field(default_factory=dict)
    conv: dict[str, dict[int, float]] = field(default_factory=dict)
    skip: float | None = None
    ffn: list[tuple[int, float]] = field(default_factory=list)
    ffn_offset: list[tuple[int, float]] = field(default_factory=list)

    def attention_ms(self, op: str, heads: Any, head_dim: Any) -> Any:
        if op == "skip":
            if self.skip is None:
                raise KeyError("skip")
            return self.skip
        if op == "msa":
            if not self.msa:
                raise KeyError("msa")
            rows: dict[int, list[tuple[float, float]]] = {}
            for (h, d), ms in sorted(self.msa.items()):
                rows.setdefault(h, []).append((d, ms))
            per_heads = [(float(h), interpolate(pts, head_dim)) for h, pts in sorted(rows.items())]
            return interpolate(per_heads, heads)
        if op not in self.conv:
            raise KeyError(op)
        return interpolate(sorted((float(d), ms) for d, ms in self.conv[op].items()), head_dim)

    def ffn_ms(self, width: Any) -> Any:
        """Milliseconds the FFN adds at ``width`` neurons (a number, or a 0-d tensor: differentiable in it). Measured
        widths are exact; others interpolate, and an integer width off the multiples of 8 is slowed by its residue
        class's measured factor (:meth:`alignment`)."""
        n = _number(width)
        if n <= 0:
            return 0.0 * width
        return interpolate([(float(w), ms) for w, ms in self.ffn], width) * self.alignment(n)

    def alignment(self, width: float) -> float:
        """How much slower an FFN of ``width`` neurons runs than the multiples-of-8 curve predicts: 1.0 at a measured
        width, a fractional one or a multiple of 8; else the ratio measured at this residue class's widths in
        ``ffn_offset`` (odd, 2 mod 4, 4 mod 8), interpolated in the width and held past the ends."""
        w = int(width)
        if not self.ffn_offset or width != w or residue_class(w) == 8 or any(m == w for m, _ in self.ffn):
            return 1.0
        grid = [(float(m), ms) for m, ms in self.ffn]
        ratios = []
        for m, ms in self.ffn_offset:
            base = interpolate(grid, float(m))
            if residue_class(m) == residue_class(w) and base > 0:
                ratios.append((float(m), ms / base))
        if not ratios:
            return 1.0
        x = min(max(float(w), ratios[0][0]), ratios[-1][0])  # held constant past the measured ends
        return float(interpolate(ratios, x))

    def to_json(self) -> dict[str, Any]:
        return {
            "msa": [[h, d, ms] for (h, d), ms in sorted(self.msa.items())],
            "conv": {op: [[d, ms] for d, ms in sorted(v.items())] for op, v in sorted(self.conv.items())},
            "skip": self.skip,
            "ffn": [[w, ms] for w, ms in self.ffn],
            "ffn_offset": [[w, ms] for w, ms in self.ffn_offset],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BlockTable:
        return cls(
            msa={(int(h), int(hd)): float(ms) for h, hd, ms in d["msa"]},
            conv={op: {int(k): float(ms) for k, ms in v} for op, v in d["conv"].items()},
            skip=None if d["skip"] is None else float(d["skip"]),
            ffn=[(int(w), float(ms)) for w, ms in d["ffn"]],
            ffn_offset=[(int(w), float(ms)) for w, ms in d.get("ffn_offset", [])],
        )


def _embed_key(embed: Iterable[int]) -> str:
    return ",".join(str(int(e)) for e in embed)


@dataclass
class LatencyTable:
    """A device's measurements for one backbone (see the module docstring); JSON via :meth:`to_json`.

    ``stem[embed]`` and ``scale[embed]`` are keyed by the residual widths of the stages (``"384"``;
    ``"96,192,384,768"``); ``part_scale[embed]`` maps a part (an op name or ``"ffn"``) to its own calibration factor.
    A ViT width between measured ones interpolates each part's factor between the nearest widths that calibrated
    it; a part without such a factor (none at all: a table whose calibration never solved, or one written before
    per-part factors) uses ``scale``, the dense network's one factor. ``dense_ms`` is the
    dense network as measured whole, for the record (0.0: not measured, a frozen spec whose embedding widths are
    narrower than the dense ones times those widths only).
    """

    model: str
    setting: LatencySetting
    blocks: dict[str, BlockTable]
    stem: dict[str, float]
    scale: dict[str, float]
    dense_ms: float
    environment: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    part_scale: dict[str, dict[str, float]] = field(default_factory=dict)
    _scales: dict[str, dict[str, float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- prediction
    def _entry(self, b: BlockGeom, embed: int) -> BlockTable:
        kind = block_kind(b, embed)
        if kind not in self.blocks:
            raise KeyError(f"block {b.index} at width {embed}")
        return self.blocks[kind]

    @property
    def spread(self) -> float:
        """The median interquartile range of the measured rounds over their median (0 for a table from before this
        was recorded): above :data:`UNSTEADY`, something else was using the cores while the table was measured."""
        return float(self.environment.get("spread", 0.0))

    def _brackets(self, b: BlockGeom, embed: int) -> list[tuple[float, BlockTable]]:
        """``(weight, entry)`` pairs whose weighted sum prices block ``b`` at residual width ``embed``: its own
        entry when measured, else the two measured widths around it (linear in the width; a space with many
        embedding widths is measured on a grid of them)."""
        kind = block_kind(b, embed)
        if kind in self.blocks:
            return [(1.0, self.blocks[kind])]
        family = kind.rsplit(":C", 1)[0]
        widths = sorted(int(k.rsplit(":C", 1)[1]) for k in self.blocks if k.rsplit(":C", 1)[0] == family)
        if len(widths) < 2 or not widths[0] < embed < widths[-1]:
            raise KeyError(f"block {b.index} at width {embed}")
        i = bisect.bisect_left(widths, embed)
        lo, hi = widths[i - 1], widths[i]
        t = (embed - lo) / (hi - lo)
        return [(1 - t, self.blocks[f"{family}:C{lo}"]), (t, self.blocks[f"{family}:C{hi}"])]

    def block_ms(self, b: BlockGeom, arch: BlockArch, embed: int, scales: Mapping[str, float]) -> float:
        """Predicted milliseconds of one block inside the network (fractional widths interpolate); ``scales``:
        :meth:`scales_of` of the point's residual widths (``{"*": 1.0}``: the block as timed alone)."""
        s_op, s_ffn = _part(scales, arch.op), _part(scales, "ffn")
        return sum(
            w * (s_op * e.attention_ms(arch.op, arch.heads, arch.head_dim) + s_ffn * e.ffn_ms(arch.ffn))
            for w, e in self._brackets(b, embed)
        )

    def _per_embed(self, values: dict[str, float], embed: Sequence[int]) -> float:
        key = _embed_key(embed)
        if key in values:
            return values[key]
        if len(embed) != 1:  # several stages: measured per combination, never interpolated
            raise KeyError(f"embedding widths {key}")
        points = sorted((float(k), v) for k, v in values.items())
        if len(points) < 2 or not points[0][0] < embed[0] < points[-1][0]:
            raise KeyError(f"embedding width {key}")
        return float(interpolate(points, float(embed[0])))

    def stem_ms(self, embed: Sequence[int]) -> float:
        return self._per_embed(self.stem, embed)

    def scale_of(self, embed: Sequence[int]) -> float:
        """The one factor of the dense network at these residual widths (see :meth:`scales_of`)."""
        return self._per_embed(self.scale, embed)

    def scales_of(self, embed: Sequence[int]) -> dict[str, float]:
        """Part (an op name or ``"ffn"``) → calibration factor at these residual widths; ``"*"``: the factor of a
        part the table did not calibrate on its own (:meth:`scale_of`). Raises :class:`KeyError` like
        :meth:`stem_ms`. Memoised per widths (the budget projection asks once per block and move)."""
        key = _embed_key(embed)
        if key not in self._scales:
            self._scales[key] = self._solve_scales_of(embed)
        return self._scales[key]

    def _solve_scales_of(self, embed: Sequence[int]) -> dict[str, float]:
        out = {"*": self.scale_of(embed)}
        parts = sorted({p for v in self.part_scale.values() for p in v})
        for part in parts:
            values = {k: v[part] for k, v in self.part_scale.items() if part in v}
            try:
                out[part] = self._per_embed(values, embed)
            except KeyError:
                pass  # not calibrated at these widths: the network's one factor
        return out

    def part_ms(self, geometry: Geometry, arch: FrozenArch) -> dict[str, float]:
        """Milliseconds of the point's blocks as timed alone, summed per part: each op's attention entries under its
        name, every FFN under ``"ffn"`` (the terms the calibration factors multiply). Raises like :meth:`arch_ms`."""
        sums: dict[str, float] = {}
        for b, a in zip(geometry.blocks, arch.blocks, strict=True):
            for w, e in self._brackets(b, arch.embed[b.stage]):
                sums[a.op] = sums.get(a.op, 0.0) + w * e.attention_ms(a.op, a.heads, a.head_dim)
                sums["ffn"] = sums.get("ffn", 0.0) + w * e.ffn_ms(a.ffn)
        return sums

    def arch_ms(self, geometry: Geometry, arch: FrozenArch) -> float:
        """Predicted milliseconds of one forward of ``setting.batch`` images of the point ``arch``.

        Raises :class:`KeyError` when the point leaves what the table measured (another residual width, an op it
        never timed): build the table for the space the point comes from.
        """
        scales = self.scales_of(arch.embed)
        parts = self.part_ms(geometry, arch)
        return self.stem_ms(arch.embed) + sum(_part(scales, k) * ms for k, ms in parts.items())

    def counts_ms(self, geometry: Geometry, counts: Counts) -> Any:
        """The predicted milliseconds of expected counts (op probabilities, expected heads, per-head and FFN widths;
        numbers or 0-d tensors): the expectation over ops of a piecewise-linear function of the widths, so
        differentiable in the op weights and the widths. The residual widths are read as integers (rounded; not
        differentiable); at a frozen point's counts this is :meth:`arch_ms`."""
        embed = tuple(int(round(_number(e))) for e in counts.embed)
        scales = self.scales_of(embed)
        s_ffn = _part(scales, "ffn")
        total: Any = 0.0
        for b, c in zip(geometry.blocks, counts.blocks, strict=True):
            for weight, entry in self._brackets(b, embed[b.stage]):
                part: Any = s_ffn * entry.ffn_ms(c.ffn)
                for op, w in c.ops.items():
                    part = part + w * _part(scales, op) * entry.attention_ms(op, c.heads, c.head_dim)
                total = total + weight * part
        return self.stem_ms(embed) + total

    def fastest_ms(self, space: Space) -> float:
        """The predicted milliseconds of the fastest point of ``space`` (blocks choose independently, so each takes
        its fastest op × heads × per-head width × FFN width; the residual widths are tried in every combination).
        Raises :class:`KeyError` when the space leaves what the table measured."""
        best = math.inf
        for embed in itertools.product(*space.embed):
            scales = self.scales_of(embed)
            total = 0.0
            for p in space.plans:
                b, dim = p.geom, embed[p.geom.stage]
                pairs = self._brackets(b, dim)
                attn = min(
                    _part(scales, op) * sum(w * e.attention_ms(op, h, d) for w, e in pairs)
                    for op in p.attention
                    for h in p.heads
                    for d in p.head_dim
                )
                ffn = min(sum(w * e.ffn_ms(f) for w, e in pairs) for f in p.ffn.candidates(b.hidden))
                total += attn + _part(scales, "ffn") * ffn
            best = min(best, self.stem_ms(embed) + total)
        return best

    def ffn_widths(self, b: BlockGeom, embed: int) -> list[int]:
        """The FFN widths the table measured for block ``b`` (ascending, 0 first): exact lookups."""
        return [w for w, _ in self._entry(b, embed).ffn]

    # -- persistence
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": self.key,
            "model": self.model,
            "setting": self.setting.as_dict(),
            "environment": self.environment,
            "dense_ms": self.dense_ms,
            "stem": self.stem,
            "scale": self.scale,
            "part_scale": self.part_scale,
            "blocks": {k: v.to_json() for k, v in sorted(self.blocks.items())},
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LatencyTable:
        """Raises ``ValueError`` on another format (a file from another tool or version)."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"not a latency table (expected format {FORMAT})")
        s = d["setting"]
        setting = LatencySetting(s["device"], s["threads"], int(s["batch"]), s["precision"])
        return cls(
            model=str(d["model"]),
            setting=setting,
            blocks={k: BlockTable.from_json(v) for k, v in d["blocks"].items()},
            stem={k: float(v) for k, v in d["stem"].items()},
            scale={k: float(v) for k, v in d["scale"].items()},
            dense_ms=float(d["dense_ms"]),
            environment=dict(d.get("environment", {})),
            key=str(d.get("key", "")),
            part_scale={
                k: {part: float(x) for part, x in v.items()} for k, v in d.get("part_scale", {}).items()
            },
        )


# ------------------------------------------------------------------------------------------- what to measure
MAX_EXACT = 64  # up to this many candidate widths are measured one by one; more are measured on a grid
MAX_GRID = 200  # the most grid points per block kind


def _grid(values: Iterable[int], multiple: int) -> list[int]:
    """``values`` when there are at most :data:`MAX_EXACT`; else the smallest and the largest value and every
    multiple of a step between them (the step a multiple of ``multiple``, at most :data:`MAX_GRID` points).
    Single-neuron steps would be timing noise (one neuron is far below what a timer resolves)."""
    vals = sorted(set(values))
    if len(vals) <= MAX_EXACT:
        return vals
    lo, hi = vals[0], vals[-1]
    step = multiple
    while (hi - lo) / step > MAX_GRID:
        step += multiple
    first = -(-lo // step) * step
    return sorted({lo, hi, *range(first, hi, step)})


@dataclass
class Points:
    """What to measure for one block kind at one residual width."""

    geom: BlockGeom
    embed: int
    ops: set[str] = field(default_factory=set)
    msa: set[tuple[int, int]] = field(default_factory=set)
    conv_dims: set[int] = field(default_factory=set)
    ffn: set[int] = field(default_factory=set)
    # off the multiples of 8, to learn the alignment classes' slowdown
    ffn_offset: set[int] = field(default_factory=set)


MAX_EMBEDS = 16  # combinations of embedding widths measured one by one; a ViT with more is measured on a grid
EMBED_GRID = 8


def measured_embeds(space: Space) -> list[tuple[int, ...]]:
    """The residual widths (one per stage) a table for ``space`` is measured at: every combination when there are
    at most :data:`MAX_EMBEDS`; a ViT with more (one stage) at most :data:`EMBED_GRID` of them, multiples of 8 and
    both ends, interpolated in between. Raises ``ValueError`` for a multi-stage space with more combinations."""
    combos = [tuple(int(e) for e in c) for c in itertools.product(*space.embed)]
    if len(combos) <= MAX_EMBEDS:
        return combos
    if len(space.embed) > 1:
        raise ValueError(
            f"a latency table measures every combination of the stages' embedding widths; this space has "
            f"{len(combos)} (at most {MAX_EMBEDS}): offer fewer embed candidates"
        )
    vals = sorted(space.embed[0])
    lo, hi = vals[0], vals[-1]
    step = 8
    while (hi - lo) / step > EMBED_GRID - 1:
        step += 8
    grid = sorted({lo, hi, *range(-(-lo // step) * step, hi, step)})
    return [(w,) for w in grid]


def measured_points(space: Space) -> dict[str, Points]:
    """Block kind → the ops, heads × head_dim pairs, bottlenecks and FFN widths a table for ``space`` measures: every
    candidate (and the dense block, which the calibration needs); widths on a grid of multiples of 8 when a block
    kind offers more than :data:`MAX_EXACT` of them (per neuron, for instance)."""
    out: dict[str, Points] = {}
    for plan in space.plans:
        b = plan.geom
        for embed in sorted({e[b.stage] for e in measured_embeds(space)}):
            pts = out.setdefault(block_kind(b, embed), Points(b, embed))
            pts.ops |= {*plan.attention, "msa"}
            dims = _grid({*plan.head_dim, b.head_dim}, 8)
            pts.msa |= {(h, d) for h in {*plan.heads, b.heads} for d in dims}
            pts.conv_dims |= set(dims)
            pts.ffn |= {0, b.hidden, *plan.ffn.candidates(b.hidden)}
    for pts in out.values():
        offered = set(pts.ffn)
        pts.ffn = set(_grid(pts.ffn, 8))
        if any(w % 8 for w in offered - pts.ffn):  # widths off the grid and off the multiples of 8: alignment
            pts.ffn_offset = _offset_widths(sorted(pts.ffn), pts.geom.hidden)
    return out


OFFSET_ANCHORS = 8  # grid widths next to which each alignment class is measured


def _offset_widths(grid: list[int], hidden: int) -> set[int]:
    """Widths off the multiples of 8 that a table times to learn each alignment class's slowdown: next to at most
    :data:`OFFSET_ANCHORS` multiples of 8 spread over the grid, one width of each class (odd, 2 mod 4, 4 mod 8), the
    residues taking turns from anchor to anchor (odd: +1, +3, +5, +7; 2 mod 4: +2, +6)."""
    anchors = [w for w in grid if w % 8 == 0 and 0 < w and w + 8 <= hidden]
    if len(anchors) > OFFSET_ANCHORS:
        step = (len(anchors) - 1) / (OFFSET_ANCHORS - 1)
        anchors = sorted({anchors[round(i * step)] for i in range(OFFSET_ANCHORS)})
    out: set[int] = set()
    for i, w in enumerate(anchors):
        out |= {w + (1, 3, 5, 7)[i % 4], w + (2, 6)[i % 2], w + 4}
    return out


# ------------------------------------------------------------------------------------ latency-aware rounding
ROUND_REACH = 0.125  # a width may move this fraction of itself (plus 32 neurons) either way


def _reach(width: int, hidden: int) -> tuple[int, int]:
    """The widths a rounding may move ``width`` to: ±(12.5% + 32), within 0..hidden."""
    reach = int(ROUND_REACH * width) + 32
    return max(0, width - reach), min(hidden, width + reach)


def rounding_space(space: Space, arch: FrozenArch) -> Space:
    """The space a latency-aware rounding of ``arch`` measures: ``arch`` with every FFN width free to take any
    multiple of 8 within ±(12.5% + 32) of it (and its own width and the dense width when within reach)."""
    plans = []
    for p, a in zip(space.plans, arch.blocks, strict=True):
        hidden = p.geom.hidden
        lo, hi = _reach(a.ffn, hidden)
        widths = (
            {w for w in range(-(-lo // 8) * 8, hi + 1, 8)} | {a.ffn} | ({hidden} if hi == hidden else set())
        )
        plans.append(
            replace(
                p,
                attention=(a.op,),
                ffn=FfnChoice(widths=tuple(sorted(widths))),
                heads=(a.heads,),
                head_dim=(a.head_dim,),
            )
        )
    return Space(space.geometry, tuple(plans), tuple((e,) for e in arch.embed))


def round_for_latency(
    geometry: Geometry,
    arch: FrozenArch,
    table: LatencyTable,
    price: Callable[[FrozenArch], Mapping[str, float]],
    limits: Mapping[str, float],
) -> FrozenArch:
    """Latency-aware FFN widths: the point of :func:`rounding_space` that the table predicts fastest among those
    that keep at least ``arch``'s FLOPs, or as close to them as ``limits`` allow.

    Per block only the *efficient* measured widths are offered (no wider measured width runs as fast: matrix kernels
    prefer multiples of their vector width and tiles, so 1280 can beat 1272). Every block starts at its widest
    efficient width at or below its own; then, while the network has fewer FLOPs than ``arch`` and a step fits
    every limit, the block whose next efficient width adds the least latency per FLOP steps up. ``price`` maps a
    point to its costs (metric → absolute, e.g. ``{"flops": ..., "params": ...}``); ``limits``: metric → the
    budget's absolute limit. The result never breaks a limit ``arch`` met."""
    fronts: list[list[int]] = []
    scales = table.scales_of(arch.embed)
    for b, a in zip(geometry.blocks, arch.blocks, strict=True):
        embed = arch.embed[b.stage]
        lo, hi = _reach(a.ffn, b.hidden)  # blocks of one kind share entries: keep each to its own reach
        measured = sorted({w for w in table.ffn_widths(b, embed) if lo <= w <= hi} | {a.ffn})
        ms = {w: table.block_ms(b, replace(a, ffn=w), embed, scales) for w in measured}
        front = [w for w in measured if all(ms[w] < ms[v] for v in measured if v > w)]
        fronts.append(front)
    level = [
        max((i for i, w in enumerate(f) if w <= a.ffn), default=0)
        for f, a in zip(fronts, arch.blocks, strict=True)
    ]

    def point(levels: Sequence[int]) -> FrozenArch:
        blocks = tuple(replace(a, ffn=f[i]) for a, f, i in zip(arch.blocks, fronts, levels, strict=True))
        return replace(arch, blocks=blocks)

    goal = price(arch)["flops"]
    current = point(level)
    cost = price(current)
    while cost["flops"] < goal:
        best: tuple[float, int, FrozenArch, Mapping[str, float]] | None = None
        for i, f in enumerate(fronts):
            if level[i] + 1 >= len(f):
                continue
            trial = level.copy()
            trial[i] += 1
            cand = point(trial)
            c = price(cand)
            if any(c[m] > limit * (1 + 1e-12) for m, limit in limits.items()):
                continue
            gain = c["flops"] - cost["flops"]
            if gain <= 0:
                continue
            b = geometry.blocks[i]
            extra = table.block_ms(b, cand.blocks[i], arch.embed[b.stage], scales) - table.block_ms(
                b, current.blocks[i], arch.embed[b.stage], scales
            )
            if best is None or extra / gain < best[0]:
                best = (extra / gain, i, cand, c)
        if best is None:
            break
        _, i, current, cost = best
        level[i] += 1
    if any(cost[m] > limit * (1 + 1e-12) >= price(arch)[m] for m, limit in limits.items()):
        return arch  # only when noise left no efficient width at or below a block's own: keep the widths
    return current
