"""Latency tables: measure a backbone's blocks on this device at the space's candidate widths (build stage, torch).

Input: a :class:`~spvit_dsl.space.plan.Space` and a :class:`~spvit_dsl.space.latency.LatencySetting`. Output: a
:class:`~spvit_dsl.space.latency.LatencyTable` (pure data; the prediction lives in the space stage, so budgets and
searches price latency without torch), cached as JSON per backbone, measured widths, setting, device and library
versions. ``docs/latency.md`` describes what is measured and how well it predicts.

Every entry times the real compact modules (:func:`spvit_dsl.compact.skeleton.create_compact`'s blocks) on random
inputs under ``torch.inference_mode``: all configurations of a block kind are timed **interleaved**, one call each
per round, median of the rounds; fast configurations are called several times per sample, so that no sample is
shorter than about 2 ms of work.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .._io import write_text
from ..runtime.evaluate import autocast
from ..space.geometry import Geometry
from ..space.latency import (
    UNSTEADY,
    BlockTable,
    LatencySetting,
    LatencyTable,
    Points,
    block_kind,
    measured_embeds,
    measured_points,
)
from ..space.plan import BlockArch, FrozenArch, Space
from ..supernet._timm import swin_stages
from .skeleton import _rebuild_block, block_modules, create_compact, fuse_window_attention
from .speed import _cores, _rounds, _sync, machine, round_cap

__all__ = [
    "cache_dir",
    "calibration_points",
    "measure_table",
    "outlying_entries",
    "recalibrate",
    "solve_scales",
    "stem_network",
    "table_for",
]

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class _Rounds:
    """A table's progress in timed rounds, reported to ``progress`` as ``(done, total, what)``. Rounds past the
    plan (a time floor's, a calibration or an FFN entry timed again) are added to ``total`` when they start (a time
    floor adds its cap and gives back what it did not use), so the bar moves on to its end and never waits full."""

    progress: Progress | None
    total: int
    done: int = 0
    what: str = ""

    def plan(self, more: int) -> None:
        """``more`` rounds added to the plan (fewer when negative)."""
        self.total = max(self.done, self.total + more)
        self._show()

    def tick(self) -> None:
        self.done += 1
        self.total = max(self.done, self.total)
        self._show()

    def _show(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, self.what)


MIN_SAMPLE_MS = 2.0
# a calibration's rounds span at least this long: this VM's speed swings by ±10% within seconds, and the factors
# of a whole table rest on these few networks' timings (batch 1 took 4 s without it, batch 8 about 35 s)
CALIBRATION_SECONDS = 20.0
# a calibration whose networks time no slower than the stem, or fit no plausible factors, is timed again
CALIBRATION_TRIES = 3
# a part's factor more than this many times above or below the dense network's one factor is noise, not the part
# (factors of tables measured on an idle VM: 0.4-2.6x the dense one; a busy one gave 71x for skip blocks)
PART_FACTOR_RANGE = 4.0


def cache_dir() -> Path:
    """Where tables are cached: ``$SPVIT_DSL_CACHE/latency``, else ``~/.cache/spvit-dsl/latency``."""
    root = os.environ.get("SPVIT_DSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spvit-dsl")
    return Path(root) / "latency"


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(setting: LatencySetting) -> torch.device:
    if setting.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the latency setting names device cuda, and this machine has no CUDA device")
    return torch.device(setting.device)


def _embeds(space: Space) -> list[tuple[int, ...]]:
    return measured_embeds(space)


def _dense_blocks(geometry: Geometry) -> tuple[BlockArch, ...]:
    return tuple(BlockArch("msa", b.hidden, b.heads, b.head_dim) for b in geometry.blocks)


def table_key(space: Space, setting: LatencySetting, device: torch.device) -> str:
    """A hash of everything a table depends on: backbone, measured points, setting, device, torch and timm."""
    pts = measured_points(space)
    payload = {
        "model": space.geometry.model,
        "kwargs": {k: repr(v) for k, v in sorted(space.geometry.kwargs().items())},
        "embeds": _embeds(space),
        "points": {
            k: [sorted(p.ops), sorted(p.msa), sorted(p.conv_dims), sorted(p.ffn), sorted(p.ffn_offset)]
            for k, p in sorted(pts.items())
        },
        "setting": setting.as_dict(),
        "machine": {
            k: v for k, v in machine(device).items() if k in ("cpu", "cores", "gpu", "torch", "platform")
        },
        "timm": timm.__version__,
        "calibration": "per-part",  # tables with one factor for the whole network are measured again
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def table_for(
    space: Space,
    setting: LatencySetting,
    *,
    cache: Path | None = None,
    rebuild: bool = False,
    progress: Progress | None = None,
    cached_only: bool = False,
    recalibrate_cached: bool = False,
) -> tuple[LatencyTable, Path, bool]:
    """The table for ``space`` on this device: from the cache, or measured and cached (atomically).

    With ``recalibrate_cached``, a table read from the cache has its calibration timed again (:func:`recalibrate`,
    seconds) and is cached again with the new factors.

    Returns ``(table, path, measured)``. Raises ``RuntimeError`` when the setting names a device this machine lacks,
    or with ``cached_only`` when the table is not cached yet; ``ValueError`` for a space the table cannot cover (see
    :func:`measure_table`).
    """
    device = _device(setting)
    key = table_key(space, setting, device)
    path = (cache or cache_dir()) / f"{space.geometry.model}-{key[:16]}.json"
    cached: LatencyTable | None = None
    if path.is_file() and not rebuild:
        try:
            cached = LatencyTable.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            pass  # unreadable, damaged or another version: measure again
    if cached is not None and cached.key == key:
        if recalibrate_cached:  # (its errors are the caller's: never a silent rebuild)
            _writable(path.parent)
            cached = recalibrate(cached, space, progress=progress)
            write_text(str(path), cached.dumps())
        return cached, path, False
    if cached_only:
        raise RuntimeError(f"no latency table for {setting.describe()} is cached at {path}")
    _writable(path.parent)  # before minutes of measuring, not after
    table = measure_table(space, setting, progress=progress)
    table.key = key
    write_text(str(path), table.dumps())
    return table, path, True


def _writable(folder: Path) -> None:
    """Raises ``RuntimeError`` (one line, naming ``SPVIT_DSL_CACHE``) when tables cannot be written to ``folder``."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise RuntimeError(
            f"the latency cache {folder} cannot be written ({exc.strerror or exc}): set SPVIT_DSL_CACHE to a "
            "writable folder"
        ) from None


def recalibrate(
    table: LatencyTable,
    space: Space,
    *,
    warmup: int = 2,
    repeats: int = 15,
    progress: Progress | None = None,
) -> LatencyTable:
    """``table`` with its calibration timed again now: the calibration networks and the stem of every residual width
    it measured (:func:`calibration_points`), the factors solved anew against the blocks' entries, which are kept.

    A fraction of :func:`measure_table`'s time, once per combination of residual widths the table measured: its
    rounds span :data:`CALIBRATION_SECONDS` unless the round cap comes first (small networks); on 2 CPU cores
    about 23 s for DeiT-S or Swin-T at batch 1 and 33–43 s at batch 8. What a block costs relative to another
    changes little from one hour to the next on a VM; how fast the whole machine runs does (±10–30% here), and the
    factors carry it. Records ``environment.calibrated_at`` and
    ``dense_ms_before_recalibration``; the table is unsteady afterwards only for this calibration's own reasons (it
    failed, other processes held the cores: ``calibration_others_running``) or its blocks' (their rounds' spread, a
    busy measurement). Raises like :func:`measure_table`; ``KeyError`` when ``space`` is not the space
    ``table`` measured (another backbone or other widths)."""
    setting = table.setting
    device = _device(setting)
    busy = busy_load(setting) if device.type == "cpu" else None
    geometry = space.geometry
    points = measured_points(space)
    embeds = _embeds(space)
    missing = sorted({block_kind(b, e[b.stage]) for e in embeds for b in geometry.blocks} - set(table.blocks))
    if geometry.model != table.model or missing:
        raise KeyError(
            f"the table for {table.model} does not cover this space ({', '.join(missing) or geometry.model})"
        )
    rounds = _Rounds(progress, len(embeds) * (warmup + repeats))
    stem, scale, part_scale = dict(table.stem), dict(table.scale), dict(table.part_scale)
    dense_ms, failed = table.dense_ms, False
    with _threads(setting.threads), torch.inference_mode(), autocast(device, setting.precision):
        for embed in embeds:
            model = create_compact(geometry, FrozenArch(_dense_blocks(geometry), embed)).eval().to(device)
            cal = _calibrate(
                geometry, setting, device, table.blocks, points, model, embed, warmup, repeats, rounds
            )
            key = ",".join(map(str, embed))
            stem[key], scale[key] = cal.stem_ms, cal.scale
            if cal.parts is not None:
                part_scale[key] = cal.parts
            else:
                part_scale.pop(key, None)  # the old factors belong to the old speed: the one factor prices it
            failed |= cal.failed
            if embed == geometry.dims:
                dense_ms = cal.dense_ms
            del model
    env = dict(table.environment)
    env["calibrated_at"] = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    env["dense_ms_before_recalibration"] = table.dense_ms
    # unsteady again only for this calibration's own reasons (or the blocks' own rounds; a table from before
    # blocks_spread was recorded keeps its spread); a busy mark of the blocks' measurement stays: they were not timed
    env["spread"] = float(env.get("blocks_spread", env.get("spread", 0.0)))
    if busy is not None:
        env["calibration_others_running"] = busy
    else:
        env.pop("calibration_others_running", None)
    if failed or busy is not None or "others_running" in env:
        env["spread"] = max(env["spread"], 2 * UNSTEADY)
    return LatencyTable(
        table.model, setting, table.blocks, stem, scale, dense_ms, env, key=table.key, part_scale=part_scale
    )


def _sample_input(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device)


def _time_interleaved(
    calls: list[Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    rounds: _Rounds | None = None,
    spread: list[float] | None = None,
    min_seconds: float = 0.0,
) -> list[float]:
    """Median milliseconds of each call, timed interleaved (one sample of each per round); with ``min_seconds``,
    rounds past ``repeats`` until the timed ones span that long (at most ``MAX_ROUNDS_FACTOR`` × ``repeats``)."""

    def once(f: Callable[[], Any], n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        _sync(device)
        return (time.perf_counter() - t0) * 1000.0 / n

    inner = []
    for f in calls:  # the first call also warms the caches
        first = once(f, 1)
        inner.append(max(1, min(64, int(MIN_SAMPLE_MS / max(first, 1e-3)))))
    samples: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    rng = random.Random(0)
    cap = round_cap(warmup, repeats)
    ran = 0
    for r in _rounds(warmup, repeats, min_seconds):
        if rounds is not None and r == warmup + repeats:  # past the repeats: the time floor's, up to its cap
            rounds.plan(cap - r)
        rng.shuffle(order)  # no configuration always follows the same one (cache state, turbo drift)
        for i in order:
            f = calls[i]
            t = once(f, inner[i])
            if r >= warmup:
                samples[i].append(t)
        ran = r + 1
        if rounds is not None:
            rounds.tick()
    if rounds is not None and warmup + repeats < ran < cap:
        rounds.plan(ran - cap)  # the floor was met before the cap: its unused rounds leave the plan
    medians = [statistics.median(s) for s in samples]
    if spread is not None:  # how unsteady the rounds were: each configuration's interquartile range / median
        for s, m in zip(samples, medians, strict=True):
            if len(s) >= 4 and m > 0:
                q = statistics.quantiles(s, n=4)
                spread.append((q[2] - q[0]) / m)
    return medians


OUTLIER_WINDOW = 3  # grid neighbours on each side that an FFN entry is checked against
OUTLIER_TOLERANCE = 0.12  # |entry / their line - 1| above which it is timed again


def outlying_entries(
    ffn: list[tuple[int, float]], *, window: int = OUTLIER_WINDOW, tolerance: float = OUTLIER_TOLERANCE
) -> list[int]:
    """Indices of the FFN grid entries out of line with their neighbours: entry ``i`` of ``ffn`` (``(width, ms)``,
    ascending, ``(0, 0)`` first, which is exact and neither checked nor used: an FFN's fixed cost makes a step
    there) is flagged when it lies more than ``tolerance`` off the line through the ``2 · window`` nearest other
    entries (one-sided at the grid's ends), relative to that line's value or, at small widths, to 5% of the widest
    entry (a fraction of a millisecond is timer noise, not an outlier). The line is Theil–Sen's (median of the
    pairwise slopes), so one outlier does not drag its neighbours' lines off them. Grids of fewer than
    ``2 · window + 1`` non-zero widths (too few neighbours to outvote one outlier) flag nothing.

    An FFN's time grows smoothly with its width on a grid of multiples of 8 (the alignment classes lie off it), so
    one entry far off its neighbours' line is a noisy timing more often than a kernel's step: measurement times it
    again (:func:`_retime_outliers`) and keeps what the second timing says, step or not."""
    if len(ffn) < 2 * window + 2:
        return []
    floor = 0.05 * max(t for _, t in ffn)
    out = []
    for i in range(1, len(ffn)):
        others = sorted((j for j in range(1, len(ffn)) if j != i), key=lambda j: (abs(j - i), j))[
            : 2 * window
        ]
        pts = [(float(ffn[j][0]), ffn[j][1]) for j in others]
        slope = statistics.median(
            (y2 - y1) / (x2 - x1) for a, (x1, y1) in enumerate(pts) for x2, y2 in pts[a + 1 :] if x2 != x1
        )
        line = statistics.median(y - slope * (x - ffn[i][0]) for x, y in pts)
        if abs(ffn[i][1] - line) > tolerance * max(line, floor):
            out.append(i)
    return out


def _retime_outliers(
    rows: list[tuple[str, Any, BlockArch]],
    times: list[float],
    calls: list[Callable[[], Any]],
    device: torch.device,
    warmup: int,
    repeats: int,
    rounds: _Rounds | None = None,
) -> int:
    """Time again, in fresh interleaved rounds, the FFN grid entries of one block kind that
    :func:`outlying_entries` flags, with their grid neighbours and the FFN-0 block; ``times`` (one per row) takes the
    new timings of the flagged rows, put on the first rounds' level by the median ratio of the neighbours' two
    timings (the machine's speed drifts between rounds). Returns how many entries were timed again."""
    grid = [i for i, (what, _, _) in enumerate(rows) if what == "ffn"]  # row of each grid entry, ascending
    width0 = next(i for i, (what, _, _) in enumerate(rows) if what == "skip")
    extra = [(0, 0.0)] + [(rows[i][1], times[i] - times[width0]) for i in grid]
    bad = [k - 1 for k in outlying_entries(extra)]  # positions in ``grid``
    if not bad:
        return 0
    flagged = [grid[k] for k in bad]
    near = {grid[j] for k in bad for j in range(max(0, k - 2), min(len(grid), k + 3))}
    anchors = sorted(({width0} | near) - set(flagged))
    if rounds is not None:
        rounds.plan(warmup + repeats)
    again = _time_interleaved(
        [calls[i] for i in anchors + flagged], device, warmup=warmup, repeats=repeats, rounds=rounds
    )
    level = statistics.median(
        times[i] / t for i, t in zip(anchors, again[: len(anchors)], strict=True) if t > 0
    )
    for i, t in zip(flagged, again[len(anchors) :], strict=True):
        times[i] = t * level
    return len(flagged)


def _kind_label(pts: Points, staged: bool) -> str:
    """What the progress bar says a block kind is (its cache key, :func:`block_kind`, is for files)."""
    b = pts.geom
    where = f"stage {b.stage} blocks" if staged else "blocks"
    return f"{where}{', shifted windows' if b.shift else ''}, width {pts.embed}"


def _block_input(pts: Points, batch: int, family: str) -> tuple[int, ...]:
    b = pts.geom
    if family == "swin":
        return (batch, b.grid[0], b.grid[1], pts.embed)
    return (batch, b.tokens, pts.embed)


def measure_table(
    space: Space,
    setting: LatencySetting,
    *,
    warmup: int = 2,
    repeats: int = 15,
    progress: Progress | None = None,
) -> LatencyTable:
    """Measure the table for ``space`` (see the module docstring); minutes on a CPU for DeiT-S or Swin-T.

    Raises ``RuntimeError`` when ``setting.device`` is ``cuda`` and there is none, ``ValueError`` when a Swin space
    offers more than 16 combinations of its stages' embedding widths (a ViT's are measured on a grid).
    """
    device = _device(setting)
    busy = busy_load(setting) if device.type == "cpu" else None
    geometry = space.geometry
    embeds = _embeds(space)
    points = measured_points(space)
    configs: dict[str, list[tuple[str, Any, BlockArch]]] = {}
    for kind, p in points.items():
        b = p.geom
        rows: list[tuple[str, Any, BlockArch]] = []
        for op in sorted(p.ops):
            if op == "msa":
                rows += [("msa", (h, d), BlockArch("msa", 0, h, d)) for h, d in sorted(p.msa)]
            elif op == "skip":
                rows.append(("skip", None, BlockArch("skip", 0, b.heads, b.head_dim)))
            else:
                rows += [(op, d, BlockArch(op, 0, b.heads, d)) for d in sorted(p.conv_dims)]
        if "skip" not in p.ops:
            rows.append(("skip", None, BlockArch("skip", 0, b.heads, b.head_dim)))
        rows += [("ffn", w, BlockArch("skip", w, b.heads, b.head_dim)) for w in sorted(p.ffn) if w > 0]
        rows += [("ffn_offset", w, BlockArch("skip", w, b.heads, b.head_dim)) for w in sorted(p.ffn_offset)]
        configs[kind] = rows
    rounds = _Rounds(progress, (warmup + repeats) * (len(configs) + len(embeds)))

    blocks: dict[str, BlockTable] = {}
    spreads: list[float] = []
    miscalibrated = False
    retimed = 0
    stem: dict[str, float] = {}
    scale: dict[str, float] = {}
    part_scale: dict[str, dict[str, float]] = {}
    dense_ms = 0.0
    with _threads(setting.threads), torch.inference_mode(), autocast(device, setting.precision):
        for embed in embeds:
            arch = FrozenArch(_dense_blocks(geometry), embed)
            model = create_compact(geometry, arch).eval()
            base = block_modules(model, geometry.family)
            for kind, rows in configs.items():
                p = points[kind]
                if p.embed != embed[p.geom.stage] or kind in blocks:
                    continue
                calls = []
                for _, _, choice in rows:
                    blk = copy.deepcopy(base[p.geom.index])
                    _rebuild_block(blk, p.geom, choice, p.embed, geometry.family)
                    blk = fuse_window_attention(blk.eval().to(device))
                    x = _sample_input(_block_input(p, setting.batch, geometry.family), device)
                    calls.append(_bind(blk, x))
                rounds.what = _kind_label(p, geometry.stages > 1)
                times = _time_interleaved(
                    calls, device, warmup=warmup, repeats=repeats, rounds=rounds, spread=spreads
                )
                retimed += _retime_outliers(rows, times, calls, device, warmup, repeats, rounds)
                del calls
                table = BlockTable()
                width0 = next(t for (what, _, _), t in zip(rows, times, strict=True) if what == "skip")
                table.skip = width0
                table.ffn = [(0, 0.0)]
                for (what, arg, _), t in zip(rows, times, strict=True):
                    if what == "msa":
                        table.msa[arg] = t
                    elif what == "ffn":
                        table.ffn.append((arg, max(0.0, t - width0)))  # below timer noise: free
                    elif what == "ffn_offset":  # timed in the same rounds as the grid: their ratio is steady
                        table.ffn_offset.append((arg, max(0.0, t - width0)))
                    elif what != "skip":
                        table.conv.setdefault(what, {})[arg] = t
                blocks[kind] = table
            key = ",".join(map(str, embed))
            cal = _calibrate(geometry, setting, device, blocks, points, model, embed, warmup, repeats, rounds)
            stem[key], scale[key], t_full = cal.stem_ms, cal.scale, cal.dense_ms
            if cal.parts is not None:
                part_scale[key] = cal.parts
            miscalibrated |= cal.failed
            if embed == geometry.dims:
                dense_ms = t_full
            del model, base
    env = {k: v for k, v in machine(device).items() if k != "host"} | {"timm": timm.__version__}
    env["measured_at"] = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    spread = round(statistics.median(spreads), 4) if spreads else 0.0
    env["blocks_spread"] = spread  # the blocks' own rounds: a recalibration starts again from it
    env["ffn_retimed"] = retimed
    if miscalibrated or busy is not None:
        spread = max(spread, 2 * UNSTEADY)  # so every command that reads the table says it is unsteady
    if busy is not None:
        env["others_running"] = busy
    env["spread"] = spread
    return LatencyTable(geometry.model, setting, blocks, stem, scale, dense_ms, env, part_scale=part_scale)


@dataclass
class _Calibration:
    stem_ms: float  # the network without its blocks
    dense_ms: float  # the dense network, whole
    scale: float  # the dense network's one factor
    parts: dict[str, float] | None  # per-part factors (None: they never solved)
    failed: bool  # the table falls back: report it unsteady


def _calibrate(
    geometry: Geometry,
    setting: LatencySetting,
    device: torch.device,
    blocks: dict[str, BlockTable],
    points: dict[str, Points],
    model: nn.Module,
    embed: tuple[int, ...],
    warmup: int,
    repeats: int,
    rounds: _Rounds,
) -> _Calibration:
    """Time the calibration networks at ``embed`` (:func:`calibration_points`; ``model`` is the dense one) with the
    network without its blocks (the stem), and solve the factors from the blocks measured so far. A try whose
    networks ran no slower than the stem, or whose factors came out unphysical or implausible (:func:`_plausible`;
    timings of a busy machine), is timed again, up to :data:`CALIBRATION_TRIES`; the last try's timings are kept.
    After every try fails: the dense network's one factor (1.0 when even that is not positive) for every part, or,
    when only some factors were implausible, for those; and ``failed``."""
    archs = calibration_points(geometry, embed, points)
    bare = stem_network(model, geometry.family)
    x = _sample_input((setting.batch, geometry.in_chans, geometry.img_size, geometry.img_size), device)
    nets = [model] + [create_compact(geometry, a).eval() for a in archs[1:]] + [bare]
    # each network's blocks as timed alone, per part (the blocks do not change between tries)
    measured = LatencyTable(
        geometry.model, setting, blocks, {}, {}, 0.0
    )  # the blocks so far, nothing calibrated
    alone = [measured.part_ms(geometry, a) for a in archs]
    predicted = sum(alone[0].values())  # the dense network's blocks
    ratio, t_full, t_stem = 0.0, 0.0, 0.0
    rounds.what = "calibration"
    for attempt in range(CALIBRATION_TRIES):
        if attempt:  # a try again: rounds past the plan
            rounds.plan(warmup + repeats)
        times = _time_interleaved(
            [_bind(m.to(device), x) for m in nets],
            device,
            warmup=warmup,
            repeats=repeats,
            rounds=rounds,
            min_seconds=CALIBRATION_SECONDS,
        )
        t_full, t_stem = times[0], times[-1]
        # (a small positive ratio is real: tiny blocks timed alone carry per-call overhead they do not have inside
        # the network)
        ratio = (t_full - t_stem) / predicted if predicted > 0 else 1.0
        parts = solve_scales(alone, [t - t_stem for t in times[:-1]])
        if ratio > 0 and parts is not None and all(_plausible(f, ratio) for f in parts.values()):
            return _Calibration(t_stem, t_full, ratio, parts, failed=False)
    if ratio > 0 and parts is not None:  # the implausible factors alone fall back to the dense network's one
        kept = {k: f if _plausible(f, ratio) else ratio for k, f in parts.items()}
        return _Calibration(t_stem, t_full, ratio, kept, failed=True)
    return _Calibration(t_stem, t_full, ratio if ratio > 0 else 1.0, None, failed=True)


def _plausible(factor: float, ratio: float) -> bool:
    """Whether a per-part factor lies within :data:`PART_FACTOR_RANGE` times the dense network's one factor
    ``ratio`` (above or below): the factors rest on as many networks as parts, so one network timed at a busy moment
    moves a factor as far as it likes, and a part whose blocks weigh little in every network (skip) moves most."""
    return ratio / PART_FACTOR_RANGE <= factor <= ratio * PART_FACTOR_RANGE


def calibration_points(
    geometry: Geometry, embed: tuple[int, ...], points: dict[str, Points]
) -> list[FrozenArch]:
    """The whole networks that calibrate a table at residual widths ``embed``: the dense network first; then, per op
    the table measured besides ``msa`` and ``skip``, every block whose kind was measured with it takes it at the
    widest measured bottleneck (the others stay ``msa``), FFN at full width; then every block ``skip`` at full FFN
    width, and at FFN width 0. As many networks as parts (the ops and the FFN): :func:`solve_scales` has one
    answer."""
    dense = _dense_blocks(geometry)
    kinds = [points[block_kind(b, embed[b.stage])] for b in geometry.blocks]
    ops = sorted({op for p in kinds for op in p.ops} - {"msa", "skip"})
    archs = [FrozenArch(dense, embed)]
    for op in ops:
        blocks = tuple(
            BlockArch(op, b.hidden, b.heads, max(p.conv_dims)) if op in p.ops else d
            for b, d, p in zip(geometry.blocks, dense, kinds, strict=True)
        )
        archs.append(FrozenArch(blocks, embed))
    for full in (True, False):
        blocks = tuple(
            BlockArch("skip", b.hidden if full else 0, b.heads, b.head_dim) for b in geometry.blocks
        )
        archs.append(FrozenArch(blocks, embed))
    return archs


def solve_scales(parts: list[dict[str, float]], block_ms: list[float]) -> dict[str, float] | None:
    """Per-part calibration factors: the least-squares solution of ``Σ_part scale[part] · parts[i][part] =
    block_ms[i]`` over the calibration networks (``parts``: :meth:`LatencyTable.part_ms` of each; ``block_ms``: each
    network's time minus its stem's). None when the networks do not determine every factor or a factor is not
    positive and finite (noise: the caller times again)."""
    names = sorted({k for p in parts for k, v in p.items() if v > 0})
    if not names:
        return None
    a = torch.tensor([[p.get(k, 0.0) for k in names] for p in parts], dtype=torch.float64)
    y = torch.tensor(block_ms, dtype=torch.float64).unsqueeze(1)
    if int(torch.linalg.matrix_rank(a)) < len(names):
        return None
    s = torch.linalg.lstsq(a, y, driver="gelsd").solution.squeeze(1)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        return None
    return {k: float(v) for k, v in zip(names, s, strict=True)}


def others_running(samples: int = 20, interval: float = 0.02) -> float | None:
    """How many other processes run right now, beside this one: the median over ``samples`` reads of the runnable
    count in ``/proc/loadavg`` (instantaneous, unlike the load averages, which lag a minute behind), minus this
    process's own thread. None where there is no ``/proc/loadavg`` (not Linux)."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
        time.sleep(interval)
    return float(statistics.median(counts))


def busy_load(setting: LatencySetting) -> float | None:
    """How many other processes were running (:func:`others_running`) when they already hold cores this table's
    threads need (more than ``cores - threads``), else None.

    Oversubscribed cores slow every forward alike, so the rounds can agree with each other (a low spread) and still
    be many times the idle figures: the spread alone misses it."""
    others = others_running()
    if others is None:
        return None
    threads = setting.threads or torch.get_num_threads()
    cores = _cores()
    return others if others > cores - min(threads, cores) else None


def _bind(m: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    return lambda: m(x)


def stem_network(model: nn.Module, family: str) -> nn.Module:
    """A copy of ``model`` (a compact or timm ViT / Swin, ``family`` ``"vit"`` or ``"swin"``) with its blocks removed:
    patch embedding, position embedding, patch merging, final norm and head. Its time is the table's ``stem``."""
    bare = copy.deepcopy(model)
    if family == "swin":
        for stage in swin_stages(bare):
            stage.blocks = nn.Sequential()
    else:
        bare.blocks = nn.Sequential()
    return bare.eval()
