"""Latency budgets (issue 14): the language, the table (measured, cached), the prediction, the search meeting a
latency budget, and latency-aware rounding. No test checks a wall-clock figure: the measured tables only feed the
logic under test (predicted-against-measured accuracy is ``bench/latency.py``'s job)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spvit_dsl.compact.latency as measuring
from spvit_dsl.compact.build import build
from spvit_dsl.compact.latency import calibration_points, outlying_entries, solve_scales, table_for
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.lang.errors import SpecError, UsageError
from spvit_dsl.search import run_search
from spvit_dsl.space import cost
from spvit_dsl.space.cost import BlockCounts, Counts, counts_of
from spvit_dsl.space.latency import (
    OFFSET_ANCHORS,
    UNSTEADY,
    BlockTable,
    LatencySetting,
    LatencyTable,
    block_kind,
    interpolate,
    measured_points,
    residue_class,
    round_for_latency,
    rounding_space,
)
from spvit_dsl.space.plan import BlockArch, FrozenArch
from spvit_dsl.space.units import parse_budget_flag

BACKBONE = (
    "backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; channels = 1; classes = 10; "
    "embed_dim = 48; depth = 3; heads = 3 }\n"
)
SPACE = (
    BACKBONE
    + "blocks all { attention: one of {skip, conv1x1, msa}; ffn: per neuron; head_dim: 8..16 step 8 }\n"
)
SETTING = LatencySetting("cpu", 1, 4, "fp32")


FACTORS = {"msa": 1.1, "conv1x1": 1.7, "skip": 0.9, "ffn": 1.05}  # unlike each other, as calibrations can be


@pytest.fixture(scope="module")
def tiny() -> tuple[object, LatencyTable]:
    space = compile_text(SPACE, "tiny.vit").space
    table, _, _ = table_for(space, SETTING)
    return space, table


@pytest.fixture(scope="module")
def factored(tiny) -> tuple[object, LatencyTable]:
    """The tiny table with fixed per-part factors: the arithmetic under test does not hang on whether this machine's
    calibration solved (a busy one falls back to one factor)."""
    space, table = tiny
    return space, replace(table, part_scale={"48": dict(FACTORS)})


# ---------------------------------------------------------------------------------------------- the language
def test_a_latency_budget_compiles_with_where_it_is_measured() -> None:
    p = compile_text(
        SPACE + "budget { latency <= 2.5ms; threads = 2; batch = 16; precision = bf16 }", "a.vit"
    )
    assert p.latency == LatencySetting("cpu", 2, 16, "bf16")
    (b,) = p.budgets
    assert (b.metric, b.absolute) == ("latency", 2.5)
    assert compile_text(SPACE + "budget { latency <= 800us }", "a.vit").budgets[0].absolute == pytest.approx(
        0.8
    )
    assert compile_text(SPACE + "budget { flops <= 50% }", "a.vit").latency is None


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("latency <= 0%", "a latency budget must be positive"),
        ("latency <= 8", "a latency budget needs a unit"),
        ("latency <= 8GB", "unknown unit 'GB' for latency"),
        ("flops <= 50%; threads = 2", "says where a latency budget is measured"),
        ("latency <= 8ms; device = tpu", "device is one of cpu, cuda"),
        ("latency <= 8ms; batch = 0", "batch is a whole number"),
        ("latency <= 8ms; threads = 1.5", "threads is a whole number"),
        ("latency <= 8ms; precision = fp16", "precision is one of fp32, bf16"),
        ("latency <= 8ms; latency <= 9ms", "a second latency budget"),
    ],
)
def test_bad_latency_budgets_point_at_the_spec(budget: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        compile_text(SPACE + f"budget {{ {budget} }}", "bad.vit")
    assert message in str(info.value)
    assert "bad.vit:3:" in info.value.render()


def test_the_budget_flag_reads_milliseconds() -> None:
    limit = parse_budget_flag("7.5ms")
    assert (limit.metric, limit.value, limit.relative) == ("latency", 7.5, False)
    p = compile_text(SPACE, "a.vit", budgets=[limit])
    assert p.latency == LatencySetting()  # a flag brings no setting: this CPU, batch 8, fp32


# -------------------------------------------------------------------------------------------- the prediction
@given(
    st.lists(
        st.tuples(st.integers(0, 500), st.floats(0, 100)), min_size=2, max_size=8, unique_by=lambda p: p[0]
    )
)
@settings(max_examples=50, deadline=None)
def test_interpolation_is_exact_at_measured_points_and_between_its_neighbours(points) -> None:
    pts = sorted((float(x), y) for x, y in points)
    for x, y in pts:
        assert interpolate(pts, x) == pytest.approx(y, abs=1e-9)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        mid = interpolate(pts, (x0 + x1) / 2)
        assert min(y0, y1) - 1e-9 <= mid <= max(y0, y1) + 1e-9


def test_the_table_covers_every_candidate_and_predicts_the_sum_of_its_parts(tiny, factored) -> None:
    space, measured = tiny
    _, table = factored
    g = space.geometry
    entry = table.blocks[block_kind(g.blocks[0], 48)]
    assert set(entry.conv) == {"conv1x1"} and set(entry.conv["conv1x1"]) == {8, 16}
    assert set(entry.msa) == {(3, 8), (3, 16)}
    assert entry.skip is not None and entry.ffn[0] == (0, 0.0)
    assert [w for w, _ in entry.ffn] == list(range(0, 193, 8))  # per neuron: a grid of multiples of 8
    arch = FrozenArch(
        (BlockArch("msa", 100, 3, 8), BlockArch("conv1x1", 64, 3, 16), BlockArch("skip", 0, 3, 16)), (48,)
    )
    s = FACTORS
    # 100 is 4 mod 8: the grid's interpolation slowed by what that class measured; 64 is a grid point
    ffn = interpolate([(float(w), t) for w, t in entry.ffn], 100) * entry.alignment(100) + dict(entry.ffn)[64]
    parts = s["msa"] * entry.msa[(3, 8)] + s["conv1x1"] * entry.conv["conv1x1"][16] + s["skip"] * entry.skip
    assert table.arch_ms(g, arch) == pytest.approx(table.stem["48"] + parts + s["ffn"] * ffn)
    scales = table.scales_of((48,))
    blocks = sum(table.block_ms(b, a, 48, scales) for b, a in zip(g.blocks, arch.blocks, strict=True))
    assert table.arch_ms(g, arch) == pytest.approx(table.stem["48"] + blocks)
    # the dense network is a calibration point: per-part factors solved exactly, or one factor fitted to it
    assert measured.arch_ms(g, space.dense()) == pytest.approx(measured.dense_ms)


def test_declared_widths_are_measured_one_by_one() -> None:
    spec = BACKBONE + "blocks all { ffn: widths {10, 97, 150} }\nblock 1 { ffn: groups of 24 }"
    (pts,) = measured_points(compile_text(spec, "w.vit").space).values()
    assert sorted(pts.ffn) == sorted({0, 10, 97, 150, 192, *range(24, 192, 24)})
    assert not pts.ffn_offset  # every offered width is measured itself: nothing to learn about alignment


@pytest.mark.parametrize("ratio", [4, 32])
def test_a_per_neuron_space_also_times_every_alignment_class_off_the_grid(ratio: int) -> None:
    hidden = 48 * ratio
    spec = BACKBONE.replace("heads = 3", f"heads = 3; mlp_ratio = {ratio}") + "blocks all { ffn: per neuron }"
    (pts,) = measured_points(compile_text(spec, "w.vit").space).values()
    assert all(w % 8 == 0 for w in pts.ffn if 0 < w < hidden)
    offsets = sorted(pts.ffn_offset)
    assert offsets and all(0 < w < hidden and w % 8 for w in offsets)
    assert {residue_class(w) for w in offsets} == {1, 2, 4}
    assert {w % 8 for w in offsets if w % 2} == {1, 3, 5, 7}  # the odd residues take turns
    anchors = {w // 8 * 8 for w in offsets}  # spread over the grid, at most OFFSET_ANCHORS of them
    assert len(anchors) == OFFSET_ANCHORS
    assert min(anchors) <= hidden // 4 and max(anchors) >= hidden * 3 // 4


@given(st.floats(1.0, 1.6), st.floats(0.9, 1.3), st.integers(1, 191).filter(lambda w: w % 8 != 0))
@settings(max_examples=60, deadline=None)
def test_an_integer_width_off_the_grid_is_slowed_by_its_class(odd: float, four: float, width: int) -> None:
    grid = [(w, 0.01 * w) for w in range(0, 193, 8)]
    offsets = [
        (anchor + r, 0.01 * (anchor + r) * factor)
        for anchor in (16, 96, 176)
        for r, factor in ((3, odd), (2, 1.0), (4, four))
    ]
    entry = BlockTable(msa={(3, 16): 1.0}, skip=0.1, ffn=grid, ffn_offset=sorted(offsets))
    factor = {1: odd, 2: 1.0, 4: four}[residue_class(width)]  # one factor per class at every anchor: held
    assert entry.ffn_ms(width) == pytest.approx(0.01 * width * factor, rel=1e-9)
    assert entry.ffn_ms(width // 8 * 8) == pytest.approx(0.01 * (width // 8 * 8))  # multiples of 8: the grid
    assert entry.ffn_ms(width + 0.5) == pytest.approx(0.01 * (width + 0.5))  # fractional: the grid's curve
    for w, ms in offsets:  # a measured width is exact
        assert entry.ffn_ms(w) == pytest.approx(ms, rel=1e-9)
    again = BlockTable.from_json(json.loads(json.dumps(entry.to_json())))
    assert again.ffn_ms(width) == pytest.approx(entry.ffn_ms(width))
    old = entry.to_json()
    del old["ffn_offset"]  # a table cached before the classes were measured predicts on the grid
    assert BlockTable.from_json(old).ffn_ms(width) == pytest.approx(0.01 * width)


def test_a_measured_table_prices_alignment_from_its_own_timings(tiny) -> None:
    space, measured = tiny
    entry = measured.blocks[block_kind(space.geometry.blocks[0], 48)]
    assert entry.ffn_offset and {residue_class(w) for w, _ in entry.ffn_offset} == {1, 2, 4}
    for w, ms in entry.ffn_offset:  # the widths it timed off the grid are exact lookups
        assert entry.ffn_ms(w) == pytest.approx(ms, rel=1e-9, abs=1e-12)


def test_expected_counts_are_differentiable_and_agree_with_the_frozen_point(factored) -> None:
    space, table = factored
    g = space.geometry
    arch = FrozenArch(tuple(BlockArch("msa", 99, 3, 16) for _ in range(3)), (48,))
    assert table.counts_ms(g, counts_of(arch)) == pytest.approx(table.arch_ms(g, arch))
    width = torch.tensor(99.0, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    blocks = [BlockCounts({"msa": p, "skip": 1 - p}, 3, 16, width) for _ in range(3)]
    value = table.counts_ms(g, Counts((48,), blocks))
    value.backward()
    entry = table.blocks[block_kind(g.blocks[0], 48)]
    ffn = [(float(w), t) for w, t in entry.ffn]
    slope = (interpolate(ffn, 104.0) - interpolate(ffn, 96.0)) / 8  # 99 lies inside the segment 96..104
    s = FACTORS  # 99 is odd: its class's slowdown is a constant factor on the segment's slope
    assert width.grad.item() == pytest.approx(3 * s["ffn"] * slope * entry.alignment(99), rel=1e-6)
    assert p.grad.item() == pytest.approx(
        3 * (s["msa"] * entry.msa[(3, 16)] - s["skip"] * entry.skip), rel=1e-6
    )


def test_the_calibration_networks_determine_one_factor_per_part(tiny) -> None:
    space, table = tiny
    g = space.geometry
    archs = calibration_points(g, (48,), measured_points(space))
    assert archs[0] == space.dense()
    assert [a.blocks[0].op for a in archs] == ["msa", "conv1x1", "skip", "skip"]
    assert [a.blocks[0].ffn for a in archs[2:]] == [192, 0]
    parts = [table.part_ms(g, a) for a in archs]
    names = {k for p in parts for k in p}
    assert names == set(FACTORS) and len(archs) == len(names)  # as many networks as parts
    # networks that ran exactly as these factors say give the factors back
    times = [sum(FACTORS[k] * v for k, v in p.items()) for p in parts]
    got = solve_scales(parts, times)
    assert got is not None and got == pytest.approx(FACTORS, rel=1e-6)


@given(
    st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3),
    st.lists(st.floats(0.5, 50.0), min_size=6, max_size=6),
)
@settings(max_examples=50, deadline=None)
def test_solve_scales_recovers_the_factors_that_made_the_times(factors, sums) -> None:
    names = ["conv1x1", "ffn", "msa"]
    truth = dict(zip(names, factors, strict=True))
    parts = [  # dense, one op network, and an FFN-only network: as many equations as parts
        {"msa": sums[0], "ffn": sums[1]},
        {"conv1x1": sums[2], "ffn": sums[3]},
        {"ffn": sums[4] + sums[5]},
    ]
    times = [sum(truth[k] * v for k, v in p.items()) for p in parts]
    got = solve_scales(parts, times)
    assert got is not None
    for k in names:
        assert got[k] == pytest.approx(truth[k], rel=1e-4)


def test_solve_scales_refuses_undetermined_or_unphysical_factors() -> None:
    assert solve_scales([{"msa": 1.0, "ffn": 1.0}], [2.0]) is None  # two parts, one network
    assert (
        solve_scales([{"msa": 1.0, "ffn": 1.0}, {"msa": 2.0, "ffn": 2.0}], [2.0, 4.0]) is None
    )  # one direction
    assert solve_scales([{"msa": 1.0}, {"msa": 1.0, "ffn": 1.0}], [5.0, 1.0]) is None  # ffn would be −4
    assert solve_scales([], []) is None


def test_a_part_with_its_own_factor_is_priced_by_it_and_a_table_without_factors_by_the_one(factored) -> None:
    space, table = factored
    g = space.geometry
    conv = FrozenArch(tuple(BlockArch("conv1x1", 96, 3, 16) for _ in range(3)), (48,))
    msa = FrozenArch(tuple(BlockArch("msa", 96, 3, 16) for _ in range(3)), (48,))
    s = dict(table.part_scale["48"])
    slower = replace(table, part_scale={"48": s | {"conv1x1": 2 * s["conv1x1"]}})
    conv_part = table.part_ms(g, conv)["conv1x1"]
    assert slower.arch_ms(g, conv) - table.arch_ms(g, conv) == pytest.approx(s["conv1x1"] * conv_part)
    assert slower.arch_ms(g, msa) == pytest.approx(table.arch_ms(g, msa))  # no conv1x1 block: unchanged
    assert slower.counts_ms(g, counts_of(conv)) == pytest.approx(slower.arch_ms(g, conv))
    one = replace(table, part_scale={})  # a table from before per-part factors: one factor for every part
    total = sum(one.part_ms(g, conv).values())
    assert one.arch_ms(g, conv) == pytest.approx(one.stem["48"] + one.scale["48"] * total)
    again = LatencyTable.from_json(json.loads(slower.dumps()))
    assert again.part_scale == slower.part_scale and again.arch_ms(g, conv) == pytest.approx(
        slower.arch_ms(g, conv)
    )
    written = json.loads(slower.dumps())
    del written["part_scale"]  # a table written before per-part factors
    assert LatencyTable.from_json(written).arch_ms(g, conv) == pytest.approx(one.arch_ms(g, conv))
    fastest = slower.fastest_ms(space)  # the fastest point under these factors: no point is faster
    rng = random.Random(0)
    for _ in range(20):
        point = FrozenArch(
            tuple(
                BlockArch(rng.choice(["msa", "conv1x1", "skip"]), rng.randint(0, 192), 3, rng.choice([8, 16]))
                for _ in range(3)
            ),
            (48,),
        )
        assert fastest <= slower.arch_ms(g, point) + 1e-9


def test_factors_between_calibrated_widths_interpolate_and_missing_ones_use_the_one_factor() -> None:
    g = compile_text(BACKBONE + "embed: 24..36 step 12", "w.vit").space.geometry
    entry = BlockTable(msa={(3, 16): 0.25}, skip=0.05, ffn=[(0, 0.0), (48, 0.1)])
    kinds = {block_kind(g.blocks[0], w): entry for w in (24, 36)}
    table = LatencyTable(
        g.model,
        SETTING,
        kinds,
        {"24": 0.3, "36": 0.3},
        {"24": 1.0, "36": 2.0},
        0.0,
        part_scale={"24": {"ffn": 1.0, "msa": 3.0}, "36": {"ffn": 2.0}},
    )
    s = table.scales_of((30,))
    assert s["*"] == pytest.approx(1.5) and s["ffn"] == pytest.approx(1.5)  # halfway between 24 and 36
    assert "msa" not in s  # calibrated at 24 only: the one factor
    assert table.scales_of((24,))["msa"] == 3.0 and "msa" not in table.scales_of((36,))


def test_the_table_is_cached_per_setting_and_a_broken_file_is_measured_again(tmp_path: Path) -> None:
    space = compile_text(BACKBONE + "blocks all { ffn: widths {96, 192} }", "c.vit").space
    first, path, measured = table_for(space, SETTING, cache=tmp_path)
    assert measured and path.parent == tmp_path
    again, same, measured = table_for(space, SETTING, cache=tmp_path)
    assert not measured and same == path and again.to_json() == first.to_json()
    other, other_path, measured = table_for(space, replace(SETTING, batch=2), cache=tmp_path)
    assert measured and other_path != path and other.setting.batch == 2
    path.write_text("{not json", encoding="utf-8")
    _, _, measured = table_for(space, SETTING, cache=tmp_path)
    assert measured
    assert LatencyTable.from_json(json.loads(path.read_text(encoding="utf-8"))).key == first.key


@given(
    st.floats(0.001, 0.1),
    st.floats(0.0, 5.0),
    st.integers(7, 60),
    st.integers(1, 59),
    st.floats(1.2, 3.0),
    st.booleans(),
)
@settings(max_examples=100, deadline=None)
def test_an_ffn_entry_off_its_neighbours_line_is_flagged_and_nothing_else(
    slope, offset, n, at, bump, slower
) -> None:
    """On a grid of multiples of 8 whose FFN times lie on a line (any slope, any fixed cost), nothing is flagged;
    one entry bumped 20% or more off the line (up or down, the widest included) is flagged, and only it."""
    ffn = [(0, 0.0)] + [(8 * k, offset + slope * 8 * k) for k in range(1, n + 1)]
    assert outlying_entries(ffn) == []
    i = 1 + at % n
    w, t = ffn[i]
    if t < 0.05 * ffn[-1][1]:  # under 5% of the widest entry: timer noise, never flagged
        return
    ffn[i] = (w, t * bump if slower else t / bump)
    assert outlying_entries(ffn) == [i]


def test_outlying_entries_needs_a_grid_and_spares_fractions_of_the_widest() -> None:
    # six widths: too few neighbours to outvote an outlier, nothing is checked
    assert outlying_entries([(0, 0.0)] + [(8 * k, 5.0 if k == 3 else 0.1 * k) for k in range(1, 7)]) == []
    # at 8 neurons the entry is 50% off its line (0.01 ms), but its line is under 5% of the widest entry (0.99 ms),
    # and 0.005 ms is under 12% of that 5%: timer noise
    ffn = [(0, 0.0)] + [(8 * k, 0.01 * k) for k in range(1, 100)]
    ffn[1] = (8, 0.015)
    assert outlying_entries(ffn) == []
    ffn[1] = (8, 0.02)  # 0.01 ms off: over 12% of 5% of the widest
    assert outlying_entries(ffn) == [1]


def test_a_flagged_entry_is_timed_again_and_put_on_the_first_rounds_level(monkeypatch) -> None:
    """The widest entry reads 30% slow; fresh rounds (on a machine now running twice as fast) put it on the line:
    the table keeps the fresh timing, doubled to the first rounds' level; the other rows keep theirs."""
    widths = [8 * k for k in range(1, 13)]
    rows = [("skip", None, None)] + [("ffn", w, None) for w in widths] + [("msa", (3, 16), None)]
    line = {w: 2.0 + 0.1 * w for w in widths}
    times = [2.0] + [line[w] for w in widths] + [7.0]
    times[12] = 2.0 + (line[96] - 2.0) * 1.3  # the widest: its FFN 30% slow
    first = list(times)
    timed: list[list[int]] = []

    def fresh(calls, device, *, warmup, repeats, **_) -> list[float]:  # noqa: ARG001
        timed.append(list(calls))
        return [first[i] / 2 if i != 12 else line[96] / 2 for i in calls]

    monkeypatch.setattr(measuring, "_time_interleaved", fresh)
    n = measuring._retime_outliers(rows, times, list(range(len(rows))), torch.device("cpu"), 0, 3)  # type: ignore[arg-type]
    assert n == 1
    assert timed == [[0, 10, 11, 12]]  # FFN-0, the two grid neighbours below, the entry itself
    assert times[12] == pytest.approx(line[96])
    assert times[:12] == first[:12] and times[13] == first[13]
    assert measuring._retime_outliers(rows, times, list(range(len(rows))), torch.device("cpu"), 0, 3) == 0


def test_a_cuda_setting_without_a_gpu_is_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    space = compile_text(SPACE, "a.vit").space
    with pytest.raises(RuntimeError, match="no CUDA device"):
        table_for(space, LatencySetting("cuda"))


# ------------------------------------------------------------------------------------------ latency-aware rounding
def _synthetic(widths: list[int], slow: set[int]) -> tuple[object, LatencyTable]:
    """A one-block table where FFN time is linear in the width, except that ``slow`` widths cost 30% more."""
    space = compile_text(
        BACKBONE.replace("depth = 3", "depth = 1") + "blocks all { ffn: per neuron }", "s.vit"
    ).space
    g = space.geometry
    ffn = [(w, 0.01 * w * (1.3 if w in slow else 1.0)) for w in widths]
    entry = BlockTable(msa={(3, 16): 1.0}, skip=0.1, ffn=ffn)
    return space, LatencyTable(
        g.model, SETTING, {block_kind(g.blocks[0], 48): entry}, {"48": 0.5}, {"48": 1.0}, 3.4
    )


def test_rounding_picks_the_faster_width_and_keeps_the_flops_within_the_budget() -> None:
    widths = list(range(0, 193, 8))
    space, table = _synthetic(widths, slow={96, 104, 112})
    g = space.geometry
    arch = FrozenArch((BlockArch("msa", 100, 3, 16),), (48,))

    def price(a):
        c = cost.arch_cost(g, a, "exact")
        return {"flops": float(c.macs), "params": float(c.params)}

    roomy = round_for_latency(g, arch, table, price, {"flops": price(arch)["flops"] * 1.2})
    assert roomy.blocks[0].ffn == 120  # 104 and 112 run slower than 120: the first efficient width up
    tight = round_for_latency(g, arch, table, price, {"flops": price(arch)["flops"]})
    assert tight.blocks[0].ffn == 88  # nothing efficient fits between 88 and 100
    assert price(tight)["flops"] <= price(arch)["flops"]
    plain = round_for_latency(g, arch, _synthetic(widths, slow=set())[1], price, {"flops": 1e12})
    assert plain.blocks[0].ffn == 100  # no slow widths: a width that is already efficient stays


def test_rounding_moves_a_width_its_alignment_class_slows_to_a_multiple_of_8() -> None:
    space, table = _synthetic(list(range(0, 193, 8)), slow=set())
    g = space.geometry

    def price(a):
        c = cost.arch_cost(g, a, "exact")
        return {"flops": float(c.macs), "params": float(c.params)}

    arch = FrozenArch((BlockArch("msa", 101, 3, 16),), (48,))
    limits = {"flops": price(arch)["flops"] * 1.2}
    assert round_for_latency(g, arch, table, price, limits).blocks[0].ffn == 101  # on the grid's line: stays
    (entry,) = table.blocks.values()
    entry.ffn_offset = [(w, 0.01 * w * 1.25) for w in (17, 99, 163)]  # odd widths measured 25% slower
    assert table.block_ms(g.blocks[0], arch.blocks[0], 48, {"*": 1.0}) > 1.0 + 0.01 * 101 * 1.2
    rounded = round_for_latency(g, arch, table, price, limits)
    assert rounded.blocks[0].ffn == 104  # the next multiple of 8 up: at least its FLOPs, and faster
    assert table.arch_ms(g, rounded) < table.arch_ms(g, arch)


def test_rounding_space_offers_multiples_of_8_around_each_width() -> None:
    space = compile_text(SPACE, "a.vit").space
    arch = FrozenArch(tuple(BlockArch("msa", w, 3, 16) for w in (100, 5, 190)), (48,))
    plans = rounding_space(space, arch).plans
    assert plans[0].ffn.widths == tuple(sorted({*range(56, 145, 8), 100}))  # 100 ± (12 + 32)
    assert plans[1].ffn.widths == (0, 5, 8, 16, 24, 32)
    assert plans[2].ffn.widths[-1] == 192 and all(p.attention == ("msa",) for p in plans)


# --------------------------------------------------------------------------------------- search and build
def _frozen_by_search(tmp_path: Path, tiny, share: float) -> tuple[object, float, Path]:
    space, table = tiny
    limit = share * table.arch_ms(space.geometry, space.largest())
    spec = tmp_path / "lat.vit"
    spec.write_text(
        SPACE + f"budget {{ latency <= {limit:.6f}ms; threads = 1; batch = 4 }}\nsearch magnitude {{ }}\n",
        encoding="utf-8",
    )
    program = compile_file(str(spec))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, latency=table)
    return result, limit, Path(result.frozen_path)


def test_a_search_meets_a_latency_budget_within_one_percent(tmp_path: Path, tiny) -> None:
    space, _ = tiny
    table = _steady_table(space)  # 1% needs steps finer than 1%: a busy machine's table may not have them
    result, limit, frozen = _frozen_by_search(tmp_path, (space, table), 0.6)
    (b,) = result.budgets
    assert b["metric"] == "latency" and 0.99 * limit <= b["achieved"] <= limit
    assert result.costs["latency_ms"] == pytest.approx(b["achieved"])
    again = compile_file(str(frozen))  # the frozen spec keeps the budget and where it is measured
    assert again.frozen and again.latency == SETTING
    assert table.arch_ms(space.geometry, result.arch) == pytest.approx(b["achieved"])


def test_a_latency_budget_needs_its_table_and_a_structured_choice(tmp_path: Path) -> None:
    program = compile_text(SPACE + "budget { latency <= 1ms }\nsearch magnitude { }", "a.vit")
    with pytest.raises(UsageError, match="needs this device's latency table"):
        run_search(program, out=str(tmp_path / "a"), quiet=True)
    sparse = compile_text(
        BACKBONE + "blocks all { sparsity: 0..0.5 step 0.1 }\nbudget { latency <= 1ms }\nsearch dimap { }",
        "s.vit",
    )
    table, _, _ = table_for(sparse.space, sparse.latency)
    with pytest.raises(UsageError, match="sparsity alone cannot lower a latency"):
        run_search(sparse, out=str(tmp_path / "s"), quiet=True, latency=table)


def test_build_round_auto_moves_widths_to_measured_ones_and_keeps_the_budget(tmp_path: Path, tiny) -> None:
    result, limit, frozen = _frozen_by_search(tmp_path, tiny, 0.6)
    program = compile_file(str(frozen))
    model = build(str(frozen), weights="none", round_to="auto")
    arch = model.spvit_arch
    # blocks of one kind share table entries, so a block may take another block's own (measured) width
    offered = {b.ffn for b in result.arch.blocks} | {192}
    for before, after in zip(result.arch.blocks, arch.blocks, strict=True):
        assert after.op == before.op and abs(after.ffn - before.ffn) <= int(0.125 * before.ffn) + 32
        assert after.ffn % 8 == 0 or after.ffn in offered
    if (
        arch != result.arch
    ):  # which widths run faster is the machine's business; the header says it moved them
        assert 'ffn_round = "auto"' in model.spvit_spec and "ffn_round_on" in model.spvit_spec
    # the latency budget still holds, priced by the table of the widths the rounding chose among
    from spvit_dsl.space.latency import rounding_space

    table, _, measured = table_for(rounding_space(program.space, result.arch), program.latency)
    assert not measured  # build measured (and cached) exactly this table
    g = program.space.geometry
    assert table.arch_ms(g, arch) <= max(limit, table.arch_ms(g, result.arch)) * (1 + 1e-9)
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------- the CLI
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spvit_dsl", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_the_latency_command_prints_predictions_and_refuses_bad_flags(tmp_path: Path) -> None:
    spec = tmp_path / "a.vit"
    spec.write_text(SPACE + "budget { latency <= 1ms; threads = 1; batch = 2 }\n", encoding="utf-8")
    done = _cli("latency", str(spec), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["setting"] == {"device": "cpu", "threads": 1, "batch": 2, "precision": "fp32"}
    assert info["dense_measured_ms"] > 0 and "measured_at" in info["environment"]
    assert info["budget_ms"] == 1.0
    assert info["fastest_predicted_ms"] <= info["largest_predicted_ms"]
    assert info["budget_feasible"] == (info["budget_ms"] >= info["fastest_predicted_ms"])
    tight = tmp_path / "tight.vit"
    tight.write_text(SPACE + "budget { latency <= 1us; threads = 1; batch = 2 }\n", encoding="utf-8")
    said = _cli("latency", str(tight), cwd=tmp_path)
    assert said.returncode == 0 and "cannot be met: below the fastest network's" in said.stdout
    assert said.stderr.splitlines()[0].startswith("latency table for cpu")  # no blank line left by the bar
    assert json.loads(_cli("latency", str(tight), "--json", cwd=tmp_path).stdout)["budget_feasible"] is False
    # --budget checks a budget the way search would take it: it replaces the spec's latency budget
    flagged = json.loads(_cli("latency", str(tight), "--budget", "1 s", "--json", cwd=tmp_path).stdout)
    assert flagged["budget_ms"] == 1000.0 and flagged["budget_feasible"] is True
    share = _cli("latency", str(spec), "--budget", "50%latency", cwd=tmp_path)
    assert share.returncode == 0 and "50% of the dense network's predicted" in share.stdout
    bad = _cli("latency", str(spec), "--budget", "5xs", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --budget: unknown unit")
    for other, metric in (
        ("50%", "flops"),
        ("3.3GFLOPs", "flops"),
        ("5Mparams", "params"),
    ):  # nothing to check
        bad = _cli("latency", str(spec), "--budget", "8ms", "--budget", other, cwd=tmp_path)
        assert bad.returncode == 1 and bad.stderr == (
            f"error: --budget {other}: a {metric} budget; `latency` checks latency budgets only: write milliseconds "
            "(--budget 8ms) or a share of the dense network's latency (--budget 60%latency)\n"
        )
    for flag, value in (("--precision", "fp16"), ("--batch-size", "0"), ("--device", "tpu")):
        bad = _cli("latency", str(spec), flag, value, cwd=tmp_path)
        assert bad.returncode == 1 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    bad = _cli(
        "build", str(spec), "--round", "sometimes", "--out", str(tmp_path / "m.safetensors"), cwd=tmp_path
    )
    assert bad.returncode == 1 and "--round: expected a positive integer or auto" in bad.stderr


def test_a_latency_budget_below_the_fastest_network_is_refused_before_training(tmp_path: Path, tiny) -> None:
    space, table = tiny
    fastest = table.fastest_ms(space)
    g = space.geometry
    cheapest = FrozenArch(tuple(BlockArch("skip", 0, 3, 8) for _ in range(3)), (48,))
    assert fastest <= table.arch_ms(g, cheapest) + 1e-9  # no point is predicted faster than the fastest
    program = compile_text(
        SPACE + f"budget {{ latency <= {fastest * 0.9:.6f}ms }}\nsearch spvit {{ }}", "f.vit"
    )
    with pytest.raises(UsageError, match=r"cannot be met on cpu, batch 8, fp32: the fastest network"):
        run_search(program, out=str(tmp_path / "f"), quiet=True, latency=table)
    assert not (tmp_path / "f").exists()


SPVIT_SPACE = (
    BACKBONE.replace("depth = 3", "depth = 6")
    + "blocks all { attention: one of {skip, conv1x1, msa}; ffn: per neuron }\n"
    + "block 0 { attention: msa }\n"  # the class token reads the image through it (the price does not keep one)
)


def test_spvit_prices_latency_exactly_at_any_price() -> None:
    """The price controller's prediction equals the table's for the network it derives, at any logits and target:
    a block's per-neuron gates go in ascending kill price, so the n-th one removed is charged the n-th step down the
    block's measured FFN curve (not linear in the width, with a step at width 0), and the fill adds them back the
    same way."""
    from spvit_dsl.search.budget import Target
    from spvit_dsl.search.methods.spvit_gates import SpvitGates
    from spvit_dsl.search.methods.spvit_price import apply_price, gate_costs, solve_price
    from spvit_dsl.supernet.lower import lower

    program = compile_text(SPVIT_SPACE, "p.vit")
    table, _, _ = table_for(program.space, SETTING)
    net = lower(program.space)
    gates = SpvitGates(net)
    g = program.space.geometry
    target = Target("latency", 0.6 * table.arch_ms(g, program.space.dense()), "", table)

    def price(arch):
        return {"latency": table.arch_ms(g, arch)}

    costs = gate_costs(gates, net, [target], price)
    assert costs.curves  # per-neuron FFN gates under a latency: priced along their block's curve
    fastest = table.fastest_ms(program.space) / target.limit
    for seed in range(4):
        torch.manual_seed(seed)
        for gate in gates.ordered():
            gate.logits.data.normal_()
        logits = torch.cat([gt.logits.detach() for gt in gates.ordered()])
        for goal in (1.0, 1.3):
            solution = solve_price(logits, costs, goal)
            apply_price(gates.ordered(), solution, costs)
            true = table.arch_ms(g, gates.derive(net)) / target.limit
            assert true == pytest.approx(solution.ratios[0], rel=1e-9)
            if fastest <= goal:
                assert true <= goal + 1e-9


def _steady_table(space) -> LatencyTable:
    """A table as an idle machine would measure the tiny ViT's spaces: FFN time linear in the width plus a step at
    width 0, msa dearer than conv1x1, dearer than skip. A table measured by a test on a busy machine can have FFN steps
    so coarse (noise) that no search lands within 1–2%; what is under test is the search, not the machine."""
    g = space.geometry
    ffn = [(w, 0.0 if w == 0 else 0.02 + 0.002 * w) for w in range(0, 193, 8)]
    msa, conv = {(3, 8): 0.25, (3, 16): 0.3}, {"conv1x1": {8: 0.15, 16: 0.2}}
    entry = BlockTable(msa=msa, conv=conv, skip=0.05, ffn=ffn)
    return LatencyTable(g.model, SETTING, {block_kind(g.blocks[0], 48): entry}, {"48": 0.3}, {"48": 1.0}, 0.0)


def test_an_spvit_search_meets_a_latency_budget_by_itself(tmp_path: Path) -> None:
    program = compile_text(SPVIT_SPACE, "p.vit")
    table = _steady_table(program.space)
    limit = 0.6 * table.arch_ms(program.space.geometry, program.space.dense())
    spec = tmp_path / "p.vit"
    spec.write_text(
        SPVIT_SPACE + f"budget {{ latency <= {limit:.6f}ms; threads = 1; batch = 4 }}\n"
        "search spvit { data = digits; epochs = 2; batch_size = 64 }\n",
        encoding="utf-8",
    )
    result = run_search(compile_file(str(spec)), out=str(tmp_path / "run"), quiet=True, latency=table)
    assert result.info.get("notice") is None  # no projection note: the controller reached the budget
    (b,) = result.budgets
    assert 0.99 <= b["ratio"] <= 1.0


def test_diff_and_compare_treat_latency_budgets_plainly(tmp_path: Path, tiny) -> None:
    """``diff`` checks membership without a device (a latency budget is not priced there); ``compare`` refuses a
    latency budget in one line (its cells are timed side by side instead)."""
    from spvit_dsl.compile.diff import diff

    result, _, frozen = _frozen_by_search(tmp_path, tiny, 0.6)
    space = tmp_path / "lat.vit"
    d = diff(compile_file(str(space)), compile_file(str(frozen)))
    assert d.member is True and not d.breaks
    done = _cli(
        "compare", str(space), "--strategies", "magnitude", "--out", str(tmp_path / "cmp"), cwd=tmp_path
    )
    assert done.returncode == 1 and "a latency budget is not supported by compare yet" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_predict_reports_the_searched_spaces_prediction_beside_the_measurement(
    tmp_path: Path, tiny
) -> None:
    space, table = tiny
    result, _, frozen = _frozen_by_search(tmp_path, tiny, 0.6)
    args = ["bench", str(frozen), "--predict", "--json", "--threads", "1", "--batch-size", "4"]
    done = _cli(*args, "--repeats", "2", "--warmup", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    p = report["predicted"]
    assert p["table_of"].endswith("lat.vit") and p["setting"]["batch"] == 4
    assert p["ms"] == pytest.approx(table.arch_ms(space.geometry, result.arch), rel=1e-3)
    measured = report["timings"]["compact"]["median_ms"]
    assert p["error"] == pytest.approx(p["ms"] / measured - 1, abs=1e-3)
    assert p["table_spread"] == pytest.approx(table.spread, abs=1e-4)
    assert p["unsteady"] is (table.spread > UNSTEADY)  # --json prints no warning line: the field tells
    assert "--predict: " not in done.stderr
    # `latency FROZEN` prices it with the same table, so the two commands give one figure
    priced = _cli("latency", str(frozen), "--json", "--threads", "1", "--batch-size", "4", cwd=tmp_path)
    info = json.loads(priced.stdout)
    assert info["table_of"].endswith("lat.vit") and info["largest_predicted_ms"] == pytest.approx(
        p["ms"], rel=1e-3
    )
    # the searched space gone: the frozen network's own table, and one line saying so
    (tmp_path / "lat.vit").rename(tmp_path / "moved.vit")
    done = _cli(*args, "--repeats", "2", "--warmup", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    p = json.loads(done.stdout)["predicted"]
    assert p["table_of"] == "the frozen network" and "was not found" in p["note"]
    assert done.stderr.count("--predict: ") == 1
    alone = _cli("latency", str(frozen), "--threads", "1", "--batch-size", "4", cwd=tmp_path)
    assert alone.returncode == 0 and "was not found or does not compile" in alone.stderr
    assert "priced with the table of" not in alone.stdout


def test_a_frozen_spec_finds_its_searched_space_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search run on a relative spec path records the searched spec's absolute path as ``source``, so ``latency``,
    ``bench --predict`` and ``build`` price the frozen network with that space's table from any working folder."""
    from spvit_dsl.cli._common import source_of
    from spvit_dsl.compile.freeze import provenance

    (tmp_path / "s.vit").write_text(
        SPACE + "budget { flops <= 60% }\nsearch magnitude { }\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    result = run_search(compile_file("s.vit"), out="run", quiet=True)
    frozen = compile_file(result.frozen_path)
    assert provenance(frozen.spec)["source"] == str(tmp_path / "s.vit")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    found = source_of(frozen, str(tmp_path / "run" / "s.frozen.vit"))[1]
    assert found == str(tmp_path / "s.vit")
    # an older frozen spec (source relative to the folder the search ran in) is still found beside itself
    old = (
        (tmp_path / "run" / "s.frozen.vit")
        .read_text(encoding="utf-8")
        .replace(str(tmp_path / "s.vit"), "s.vit")
    )
    (tmp_path / "old.frozen.vit").write_text(old, encoding="utf-8")
    older = compile_file(str(tmp_path / "old.frozen.vit"))
    assert source_of(older, str(tmp_path / "old.frozen.vit"))[1] == str(tmp_path / "s.vit")


def test_the_projection_ends_on_a_busy_machines_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table measured beside other work (CI on 2 cores: spread 64%, FFN factor 0.44) has FFN entries that rise and
    fall with the width, so a step up can lower the cost and the step back down raise it. The projection once
    cycled there for ever (up, then the same step down: CI stalled until its limit); a group a step up moved now
    goes no lower, and the search ends under its budget."""
    from spvit_dsl.search import budget

    data = Path(__file__).parent / "data" / "latency" / "busy_vit_tiny.json"
    table = LatencyTable.from_json(json.loads(data.read_text(encoding="utf-8")))
    space = compile_text(SPACE, "tiny.vit").space
    assert table.spread > 0.5 and table.setting == SETTING
    moves = 0
    real = budget.Projection.apply

    def counted(self: budget.Projection, path: str, level: int) -> None:
        nonlocal moves
        moves += 1
        assert moves < 20_000, "the projection does not end"  # it ends within a few hundred moves
        real(self, path, level)

    monkeypatch.setattr(budget.Projection, "apply", counted)
    result, limit, _ = _frozen_by_search(tmp_path, (space, table), 0.6)
    (b,) = result.budgets
    assert b["achieved"] <= limit
    assert table.arch_ms(space.geometry, result.arch) == pytest.approx(b["achieved"])
    # the class, not the one table: FFN entries scattered by ±40% around a steady machine's line
    steady = _steady_table(space)
    for seed in range(3):
        rng = random.Random(seed)
        blocks = {
            k: replace(e, ffn=[(w, ms * rng.uniform(0.6, 1.4) if w else ms) for w, ms in e.ffn])
            for k, e in steady.blocks.items()
        }
        moves = 0
        (tmp_path / str(seed)).mkdir()
        result, limit, _ = _frozen_by_search(
            tmp_path / str(seed), (space, replace(steady, blocks=blocks)), 0.6
        )
        assert result.budgets[0]["achieved"] <= limit


def test_the_projection_handles_latencies_that_do_not_fall_with_the_width() -> None:
    """Measured latencies need not fall with the width (here per-head width 16 runs faster than 8, and an FFN's
    first neurons cost a step): the projection takes a step *up* that lowers the exceeded cost instead of giving up
    at the lowest levels, and fills again once such a step opened room."""
    from spvit_dsl.search.budget import GroupSteps, Target, project
    from spvit_dsl.space.groups import groups

    spec = BACKBONE.replace("depth = 3", "depth = 1") + "blocks all { ffn: groups of 16; head_dim: {8, 16} }"
    space = compile_text(spec, "s.vit").space
    g = space.geometry
    ffn = [(w, 0.0 if w == 0 else 0.3 + 0.01 * w) for w in range(0, 193, 16)]
    entry = BlockTable(msa={(3, 8): 2.0, (3, 16): 1.0}, skip=0.1, ffn=ffn)
    table = LatencyTable(
        g.model, SETTING, {block_kind(g.blocks[0], 48): entry}, {"48": 0.5}, {"48": 1.0}, 0.0
    )
    by_kind = {grp.kind: grp for grp in groups(space)}
    head_dim, width = by_kind["head_dim"], by_kind["ffn"]
    start = FrozenArch((BlockArch("msa", 0, 3, 8),), (48,))
    steps = [
        GroupSteps(head_dim, head_dim.choices, 0, [1.0]),
        GroupSteps(width, width.choices, 0, [1.0] * (len(width.choices) - 1)),
    ]
    limit = 2.0  # head_dim 8 with no FFN costs 0.5 + 2.0 = 2.5: over, and already every group's lowest level
    result = project(g, start, steps, [Target("latency", limit, "2ms", table)], "paper")
    assert result.arch.blocks[0].head_dim == 16  # up, and cheaper
    assert table.arch_ms(g, result.arch) <= limit
    # the room that step opened was filled, up to the last FFN step that fits
    assert result.arch.blocks[0].ffn > 0
    wider = replace(result.arch.blocks[0], ffn=result.arch.blocks[0].ffn + 16)
    assert table.arch_ms(g, replace(result.arch, blocks=(wider,))) > limit


def test_an_unsteady_table_is_reported_in_one_line(capsys, tiny) -> None:
    from spvit_dsl.cli._common import warn_unsteady

    _, table = tiny
    idle = {k: v for k, v in table.environment.items() if k != "others_running"}
    warn_unsteady(replace(table, environment={**idle, "spread": 0.05}))
    assert capsys.readouterr().err == ""
    warn_unsteady(replace(table, environment={**idle, "spread": 0.4}))
    err = capsys.readouterr().err
    assert "unsteady (rounds spread 40%" in err and "--rebuild" in err and len(err.strip().splitlines()) == 1
    warn_unsteady(replace(table, environment={**idle, "spread": 0.3, "others_running": 2.0, "cores": 2}))
    err = capsys.readouterr().err
    assert "busy machine (2 other processes running on 2 cores)" in err and len(err.strip().splitlines()) == 1
    warn_unsteady(replace(table, environment={**idle, "spread": 0.3, "others_running": 1.0, "cores": 2}))
    assert "busy machine (1 other process running on 2 cores)" in capsys.readouterr().err
    assert all(
        ms >= 0 for entry in table.blocks.values() for _, ms in entry.ffn
    )  # never a negative increment


def test_cli_refusals_come_before_any_measurement(tmp_path: Path) -> None:
    import os

    cache = tmp_path / "cache"
    env_spec = tmp_path / "sparse.vit"
    env_spec.write_text(
        BACKBONE + "blocks all { sparsity: 0..0.5 step 0.1 }\nsearch dimap { }\n", encoding="utf-8"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spvit_dsl",
            "search",
            str(env_spec),
            "--budget",
            "8ms",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SPVIT_DSL_CACHE": str(cache)},
    )
    assert done.returncode == 1 and "sparsity alone cannot lower a latency" in done.stderr
    assert not cache.exists()  # refused before measuring a table it would not use
    bad = _cli("search", str(env_spec), "--budget", "8msec", cwd=tmp_path)
    assert bad.returncode == 1 and "expected e.g. 3.3GFLOPs, 16Mparams, 70%, 8ms or 60%latency" in bad.stderr


def test_bench_predict_reads_a_built_model_and_defaults_to_the_specs_setting(tmp_path: Path, tiny) -> None:
    _frozen_by_search(tmp_path, tiny, 0.6)
    frozen = next((tmp_path / "run").glob("*.frozen.vit"))
    built = tmp_path / "m.safetensors"
    made = _cli(
        "build", str(frozen), "--weights", "none", "--round", "auto", "--out", str(built), cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    assert "latency (predicted)" in made.stdout  # the figure the widths were chosen by
    done = _cli("bench", str(built), "--predict", "--json", "--repeats", "2", "--warmup", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["batch_size"] == 4 and report["machine"]["torch_threads"] == 1  # the spec's latency setting
    assert report["predicted"]["ms"] > 0 and report["predicted"]["setting"]["batch"] == 4


def test_latency_of_a_narrower_frozen_spec_says_the_dense_network_was_not_measured(tmp_path: Path) -> None:
    """A frozen spec's table times its own embedding widths only: the dense network is not measured, and the
    command says so instead of printing 0 ms."""
    from _frozen import VIT_BACKBONE, search_program, write_frozen

    program = search_program(VIT_BACKBONE + "\nembed: 16..32 step 8", tmp_path / "space.vit")
    g = program.space.geometry
    arch = FrozenArch(tuple(BlockArch("msa", b.hidden, b.heads, b.head_dim) for b in g.blocks), (16,))
    frozen = write_frozen(program, arch, tmp_path / "narrow.frozen.vit")
    args = ("latency", str(frozen), "--threads", "1", "--batch-size", "2")
    searched = json.loads(
        _cli(*args, "--json", cwd=tmp_path).stdout
    )  # priced by its space's table: dense in it
    assert searched["table_of"].endswith("space.vit") and searched["dense_measured_ms"] > 0
    (tmp_path / "space.vit").unlink()  # without its space: its own table, which times its own widths only
    done = _cli(*args, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["dense_measured_ms"] is None and info["largest_predicted_ms"] > 0
    text = _cli(*args, cwd=tmp_path)
    assert "dense network: not measured" in text.stdout and "0 ms" not in text.stdout
    # a frozen spec's budget is judged by its one network's prediction, never by a "fastest network"
    ms = info["largest_predicted_ms"]
    for limit, verdict in ((ms * 1.5, "met ("), (ms * 0.5, "not met: this network is predicted at")):
        assert "budget {" not in frozen.read_text()
        budget = f"budget {{ latency <= {limit:.6f}ms; threads = 1; batch = 2 }}\n"
        (tmp_path / "b.frozen.vit").write_text(frozen.read_text() + budget)
        done = _cli("latency", str(tmp_path / "b.frozen.vit"), cwd=tmp_path)
        assert done.returncode == 0 and verdict in done.stdout and "fastest" not in done.stdout, done.stdout


def test_bench_predict_falls_back_to_the_frozen_networks_table_when_its_space_cannot_be_tabled(
    tmp_path: Path,
) -> None:
    """A Swin space with more than 16 stage-width combinations has no latency table: ``bench --predict`` predicts
    from the frozen network's own table and says so in one line (and in the JSON)."""
    from _frozen import SWIN_BACKBONE, search_program, write_frozen

    stages = "stage 0 { embed: 8..16 step 2 }\nstage 1 { embed: 16..32 step 4 }"  # 5 × 5 = 25 combinations
    program = search_program(f"{SWIN_BACKBONE}\n{stages}", tmp_path / "space.vit")
    g = program.space.geometry
    arch = FrozenArch(tuple(BlockArch("msa", b.hidden, b.heads, b.head_dim) for b in g.blocks), g.dims)
    frozen = write_frozen(program, arch, tmp_path / "swin.frozen.vit")
    made = _cli(
        "build", str(frozen), "--weights", "none", "--out", str(tmp_path / "m.safetensors"), cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    args = [
        "bench",
        str(tmp_path / "m.safetensors"),
        "--predict",
        "--json",
        "--threads",
        "1",
        "--batch-size",
        "2",
    ]
    done = _cli(*args, "--repeats", "2", "--warmup", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    predicted = json.loads(done.stdout)["predicted"]
    assert predicted["table_of"] == "the frozen network" and predicted["ms"] > 0
    assert "at most 16" in predicted["note"]
    assert done.stderr.count("--predict: ") == 1


@pytest.mark.parametrize(
    ("others", "threads", "busy"), [(1.0, 2, True), (0.0, 2, False), (1.0, 1, False), (2.0, 1, True)]
)
def test_a_table_measured_on_oversubscribed_cores_is_marked_busy(monkeypatch, others, threads, busy) -> None:
    """Oversubscribed cores slow every round alike (a low spread): the processes running beside this one tell. On 2
    cores, a 2-thread table needs both free, a 1-thread table one."""
    from spvit_dsl.compact import latency as measuring

    monkeypatch.setattr(measuring, "others_running", lambda: others)
    monkeypatch.setattr(measuring, "_cores", lambda: 2)
    setting = LatencySetting("cpu", threads, 1, "fp32")
    assert (measuring.busy_load(setting) == others) is busy
    text = BACKBONE.replace("depth = 3", "depth = 1") + "blocks all { ffn: groups of 96 }"
    table = measuring.measure_table(compile_text(text, "b.vit").space, setting, warmup=0, repeats=1)
    assert (table.environment.get("others_running") == others) is busy
    if busy:
        assert table.spread > measuring.UNSTEADY  # every command reading it says so


def test_factors_that_never_solve_leave_one_factor_and_an_unsteady_table(monkeypatch) -> None:
    """A busy machine can time the calibration networks so that no positive factors fit: after every try the table
    keeps the dense network's one factor for every part, and says it is unsteady."""
    from spvit_dsl.compact import latency as measuring

    tries: list[int] = []

    def never(parts: list[dict[str, float]], block_ms: list[float]) -> None:
        tries.append(len(parts))  # and no factors: as if every try had timed unphysical ones

    monkeypatch.setattr(measuring, "solve_scales", never)
    monkeypatch.setattr(measuring, "others_running", lambda: 0.0)
    text = BACKBONE.replace("depth = 3", "depth = 1") + "blocks all { attention: one of {msa, conv1x1} }"
    table = measuring.measure_table(compile_text(text, "u.vit").space, SETTING, warmup=0, repeats=1)
    assert tries == [4] * measuring.CALIBRATION_TRIES  # dense, all conv1x1, all skip, skip at FFN width 0
    assert table.part_scale == {} and table.scale["48"] > 0
    assert table.spread > measuring.UNSTEADY


@pytest.mark.parametrize("skip_factor", [1.0, 3.9, 4.1, 1 / 4.1])
def test_a_part_factor_far_from_the_dense_ones_is_timed_again_then_dropped(monkeypatch, skip_factor) -> None:
    """Factors rest on as many networks as parts, so one network timed at a busy moment moves a factor anywhere
    (a busy VM gave 71x for skip blocks): a try with a factor more than 4x above or below the dense network's one
    factor is timed again; after every try, that factor alone falls back to the one factor (the others are kept)
    and the table says it is unsteady."""
    from spvit_dsl.compact import latency as measuring

    tries: list[float] = []

    def solve(parts: list[dict[str, float]], block_ms: list[float]) -> dict[str, float]:
        dense = sum(parts[0].values())  # the dense network's one factor, as the calibration has it:
        ratio = block_ms[0] / dense if dense > 0 else 1.0
        tries.append(ratio)
        names = {k for p in parts for k in p}
        return {k: ratio * {"skip": skip_factor, "conv1x1": 2.0}.get(k, 1.0) for k in names}

    monkeypatch.setattr(measuring, "solve_scales", solve)
    monkeypatch.setattr(measuring, "others_running", lambda: 0.0)
    text = BACKBONE.replace("depth = 3", "depth = 1") + "blocks all { attention: one of {msa, conv1x1} }"
    table = measuring.measure_table(compile_text(text, "u.vit").space, SETTING, warmup=0, repeats=1)
    # (a busy machine can time the dense network no slower than its stem: ratio <= 0, a try again for that reason)
    factors = table.part_scale.get("48", {})
    if 1 / measuring.PART_FACTOR_RANGE <= skip_factor <= measuring.PART_FACTOR_RANGE:
        assert tries[-1] > 0 and all(r <= 0 for r in tries[:-1])  # the first try that solved is kept
        assert factors["skip"] == pytest.approx(skip_factor * factors["msa"])
    else:
        assert len(tries) == measuring.CALIBRATION_TRIES and table.spread > measuring.UNSTEADY
        if tries[-1] > 0:
            assert factors["skip"] == pytest.approx(factors["msa"])  # the dense network's one factor
            assert factors["conv1x1"] == pytest.approx(2 * factors["msa"])  # a plausible factor is kept


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="needs Linux's /proc/loadavg")
def test_a_process_spinning_beside_this_one_is_counted_at_once() -> None:
    """The runnable count has no lag: a busy loop started a moment ago is seen (the load average would take a
    minute to move)."""
    from spvit_dsl.compact.latency import others_running

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert (others_running() or 0) >= 1
    finally:
        spin.kill()
        spin.wait()


def test_a_share_of_the_dense_latency_becomes_milliseconds_from_the_table(tmp_path: Path) -> None:
    """`latency <= 60%`: pending at compile time (no table yet), then 60% of the dense network's predicted latency;
    the search meets those milliseconds and the frozen spec records them."""
    program = compile_text(
        SPACE + "budget { latency <= 60%; threads = 1; batch = 4 }\nsearch magnitude { }\n", "s.vit"
    )
    (b,) = program.budgets
    assert b.pending and b.limit.relative and b.limit.value == pytest.approx(0.6)
    assert "of the dense network's predicted latency" in b.describe()
    assert program.summary()["budgets"] == [
        {"metric": "latency", "limit": 60.0, "unit": "%", "absolute": None}
    ]
    json.dumps(program.summary(), allow_nan=False)  # no NaN leaks into --json
    table = _steady_table(program.space)
    dense = table.arch_ms(program.space.geometry, program.space.dense())
    resolved = program.with_latency(table)
    (r,) = resolved.budgets
    assert not r.pending and r.absolute == pytest.approx(0.6 * dense) and r.limit.text.endswith("ms")
    assert "60% of the dense network's predicted" in r.describe()
    assert resolved.with_latency(table) is resolved and program.with_latency(None) is program
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, latency=table)
    (met,) = result.budgets
    assert met["achieved"] <= r.absolute
    frozen = compile_file(result.frozen_path)
    (kept,) = frozen.budgets
    assert not kept.pending and kept.absolute == pytest.approx(
        r.absolute, rel=1e-5
    )  # milliseconds, not a share


def test_a_share_of_the_dense_latency_needs_the_dense_network_in_the_table() -> None:
    program = compile_text(
        BACKBONE
        + "embed: 24..36 step 12\nblocks all { ffn: groups of 48 }\nbudget { latency <= 60%; threads = 1 }",
        "s.vit",
    )
    g = program.space.geometry
    entry = BlockTable(msa={(3, 8): 0.25, (3, 16): 0.3}, skip=0.05, ffn=[(0, 0.0), (48, 0.1)])
    kinds = {block_kind(g.blocks[0], w): entry for w in (24, 36)}  # the space's widths, not the dense 48
    table = LatencyTable(g.model, SETTING, kinds, {"24": 0.3, "36": 0.3}, {"24": 1.0, "36": 1.0}, 0.0)
    assert table.arch_ms(g, program.space.largest()) > 0
    with pytest.raises(UsageError, match="needs the dense network in the latency table"):
        program.with_latency(table)


def test_the_budget_flag_reads_a_share_of_the_dense_latency() -> None:
    limit = parse_budget_flag("60%latency")
    assert (limit.metric, limit.relative, limit.text) == ("latency", True, "60%")
    assert parse_budget_flag("60%").metric == "flops"


def test_round_auto_says_when_its_own_table_puts_the_network_over_the_latency_budget(tmp_path: Path) -> None:
    """--round auto keeps a latency budget on the table it measures, unless the network starts over it there (a table
    measured at another time than the search's): then one line says so instead of a silent over-budget build."""
    from _frozen import VIT_BACKBONE, pattern_arch, search_program, write_frozen

    program = search_program(VIT_BACKBONE, tmp_path / "space.vit")
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "net.frozen.vit")
    frozen.write_text(frozen.read_text() + "budget { latency <= 0.0001ms; threads = 1; batch = 2 }\n")
    args = (
        "build",
        str(frozen),
        "--weights",
        "none",
        "--round",
        "auto",
        "--out",
        str(tmp_path / "m.safetensors"),
    )
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("warning: --round auto:")]
    assert len(said) == 1 and "over the budget latency <= 0.0001ms" in said[0]


# ------------------------------------------------------------------------------------------- recalibration
def test_recalibrating_on_a_machine_twice_as_slow_doubles_every_prediction_and_keeps_the_blocks(
    monkeypatch, factored
) -> None:
    """The calibration networks timed again (here by a stand-in timer that runs them exactly twice as slow as the
    table predicts): the factors and the stem double, so does every prediction, and no block entry changes."""
    from spvit_dsl.compact import latency as measuring

    space, table = factored
    g = space.geometry
    archs = calibration_points(g, g.dims, measured_points(space))
    slow = [2 * table.arch_ms(g, a) for a in archs] + [2 * table.stem_ms(g.dims)]  # the stem is timed last

    def timer(calls, device, *, warmup, repeats, rounds=None, spread=None, min_seconds=0.0):  # noqa: ANN001, ANN202
        assert len(calls) == len(slow)
        return list(slow)

    monkeypatch.setattr(measuring, "_time_interleaved", timer)
    monkeypatch.setattr(measuring, "others_running", lambda: 0.0)
    again = measuring.recalibrate(table, space, warmup=0, repeats=1)
    assert again.blocks is table.blocks and again.key == table.key
    assert again.stem_ms(g.dims) == pytest.approx(2 * table.stem_ms(g.dims))
    assert again.part_scale["48"] == pytest.approx({k: 2 * v for k, v in FACTORS.items()})
    assert again.dense_ms == pytest.approx(slow[0])
    rng = random.Random(3)
    for _ in range(20):
        a = FrozenArch(
            tuple(
                BlockArch(rng.choice(["skip", "conv1x1", "msa"]), rng.randint(0, b.hidden), b.heads, 16)
                for b in g.blocks
            ),
            g.dims,
        )
        assert again.arch_ms(g, a) == pytest.approx(2 * table.arch_ms(g, a))
    assert "calibrated_at" in again.environment and "calibrated_at" not in table.environment


def test_a_cached_table_recalibrates_in_place_and_a_foreign_space_is_refused(tmp_path: Path) -> None:
    from spvit_dsl.compact.latency import recalibrate

    space = compile_text(BACKBONE + "blocks all { ffn: widths {96, 192} }", "c.vit").space
    first, path, _ = table_for(space, SETTING, cache=tmp_path)
    again, same, measured = table_for(space, SETTING, cache=tmp_path, recalibrate_cached=True)
    assert not measured and same == path
    assert again.blocks == first.blocks and again.key == first.key  # the entries as they were read back
    cached = LatencyTable.from_json(json.loads(path.read_text(encoding="utf-8")))
    assert cached.environment["calibrated_at"] == again.environment["calibrated_at"]
    assert cached.dense_ms == again.dense_ms > 0
    wider = compile_text(BACKBONE.replace("embed_dim = 48", "embed_dim = 96"), "w.vit").space
    with pytest.raises(KeyError, match="does not cover this space"):
        recalibrate(first, wider)


def test_a_recalibration_that_solves_clears_the_unsteady_mark_of_one_that_did_not(monkeypatch) -> None:
    """A table whose first calibration never solved is unsteady; recalibrated with factors that solve (a stand-in
    timer: every network exactly twice its one-factor prediction), it is as steady as its blocks' own rounds."""
    from spvit_dsl.compact import latency as measuring

    monkeypatch.setattr(measuring, "others_running", lambda: 0.0)
    space = compile_text(
        BACKBONE.replace("depth = 3", "depth = 1") + "blocks all { attention: one of {msa, conv1x1} }",
        "u.vit",
    ).space
    with monkeypatch.context() as m:
        m.setattr(measuring, "solve_scales", lambda parts, block_ms: None)
        table = measuring.measure_table(space, SETTING, warmup=0, repeats=1)
    assert table.part_scale == {} and table.spread > measuring.UNSTEADY
    g = space.geometry
    archs = calibration_points(g, g.dims, measured_points(space))
    slow = [2 * table.arch_ms(g, a) for a in archs] + [2 * table.stem_ms(g.dims)]
    monkeypatch.setattr(measuring, "_time_interleaved", lambda calls, device, **kw: list(slow))
    again = measuring.recalibrate(table, space, warmup=0, repeats=1)
    assert again.spread == again.environment["blocks_spread"] == table.environment["blocks_spread"]
    assert set(again.part_scale["48"]) == {"msa", "conv1x1", "skip", "ffn"}
    assert again.part_scale["48"] == pytest.approx({k: 2 * table.scale["48"] for k in again.part_scale["48"]})
    assert again.environment["dense_ms_before_recalibration"] == table.dense_ms


def test_a_failing_recalibration_is_the_callers_error_never_a_silent_rebuild(
    monkeypatch, tmp_path: Path
) -> None:
    from spvit_dsl.compact import latency as measuring

    space = compile_text(BACKBONE + "blocks all { ffn: widths {96, 192} }", "c.vit").space
    table_for(space, SETTING, cache=tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("the disk is full")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured the whole table again")

    monkeypatch.setattr(measuring, "recalibrate", broken)
    monkeypatch.setattr(measuring, "measure_table", never)
    with pytest.raises(OSError, match="the disk is full"):
        table_for(space, SETTING, cache=tmp_path, recalibrate_cached=True)


def test_the_latency_command_recalibrates_and_says_how_far_the_machine_moved(tmp_path: Path) -> None:
    spec = tmp_path / "a.vit"
    spec.write_text(BACKBONE + "budget { latency <= 1s; threads = 1; batch = 2 }\n", encoding="utf-8")
    first = _cli("latency", str(spec), "--recalibrate", cwd=tmp_path)  # nothing cached yet for this setting
    assert (
        first.returncode == 0
        and "no readable table was cached to recalibrate: measured whole" in first.stderr
    )
    done = _cli("latency", str(spec), "--recalibrate", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "calibrated again now" in done.stderr and "the dense network now takes" in done.stderr
    assert ", calibrated 20" in done.stdout
    info = json.loads(_cli("latency", str(spec), "--recalibrate", "--json", cwd=tmp_path).stdout)
    assert info["environment"]["dense_ms_before_recalibration"] > 0 and "calibrated_at" in info["environment"]
    both = _cli("latency", str(spec), "--rebuild", "--recalibrate", cwd=tmp_path)
    assert both.returncode == 1 and both.stderr.startswith("error: ") and len(both.stderr.splitlines()) == 1


def test_a_damaged_cache_is_measured_again_and_an_unwritable_one_is_refused_before_measuring(
    monkeypatch, tmp_path: Path
) -> None:
    from spvit_dsl.compact import latency as measuring

    space = compile_text(BACKBONE + "blocks all { ffn: widths {96, 192} }", "c.vit").space
    _, path, _ = table_for(space, SETTING, cache=tmp_path)
    damaged = json.loads(path.read_text(encoding="utf-8")) | {"blocks": []}  # valid JSON, wrong shape
    path.write_text(json.dumps(damaged), encoding="utf-8")
    _, _, measured = table_for(space, SETTING, cache=tmp_path)
    assert measured
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("", encoding="utf-8")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured before finding out the table cannot be kept")

    monkeypatch.setattr(measuring, "measure_table", never)
    with pytest.raises(RuntimeError, match="cannot be written.*SPVIT_DSL_CACHE"):
        table_for(space, SETTING, cache=a_file)


def test_a_time_floor_adds_rounds_up_to_its_cap_and_none_without_it() -> None:
    """``min_seconds`` keeps timing past the repeats asked for (the calibration's :data:`CALIBRATION_SECONDS`, the
    benchmark's passes) up to ``MAX_ROUNDS_FACTOR`` × repeats rounds; without it, exactly the repeats run. Counted
    in calls, not seconds: a floor no machine reaches (1e9 s) must stop at the cap."""
    from spvit_dsl.compact import latency as measuring
    from spvit_dsl.compact.speed import MAX_ROUNDS_FACTOR, time_models

    calls = 0

    def slow() -> None:  # over MIN_SAMPLE_MS, so every sample is one call
        nonlocal calls
        calls += 1
        time.sleep(1.25 * measuring.MIN_SAMPLE_MS / 1000)

    measuring._time_interleaved([slow], torch.device("cpu"), warmup=1, repeats=2)
    assert calls == 1 + 1 + 2  # the first call, the warm-up round, the repeats
    calls = 0
    measuring._time_interleaved([slow], torch.device("cpu"), warmup=1, repeats=2, min_seconds=1e9)
    assert calls == 1 + 1 + MAX_ROUNDS_FACTOR * 2

    net = torch.nn.Linear(4, 4)
    assert time_models({"a": net}, (1, 4), device=torch.device("cpu"), warmup=1, repeats=3)["a"].repeats == 3
    capped = time_models({"a": net}, (1, 4), device=torch.device("cpu"), warmup=1, repeats=3, min_seconds=1e9)
    assert capped["a"].repeats == MAX_ROUNDS_FACTOR * 3


def test_the_progress_bar_counts_every_round_it_runs_and_ends_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds past the plan (the calibration's time floor, FFN entries timed again) join the bar's total when they
    start: a time floor adds its cap at once (the bar moves on instead of waiting full) and gives back the rounds it
    did not use; the count never exceeds the total, and the bar ends full."""
    from spvit_dsl.compact import latency as measuring
    from spvit_dsl.compact.speed import MAX_ROUNDS_FACTOR

    def timed(min_seconds: float) -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []
        rounds = measuring._Rounds(lambda done, total, what: seen.append((done, total)), 3)
        measuring._time_interleaved(
            [lambda: None], torch.device("cpu"), warmup=1, repeats=2, rounds=rounds, min_seconds=min_seconds
        )
        return seen

    cap = 1 + MAX_ROUNDS_FACTOR * 2
    planned = [(1, 3), (2, 3), (3, 3)]
    assert timed(0.0) == planned
    assert timed(1e9) == [*planned, (3, cap)] + [(d, cap) for d in range(4, cap + 1)]  # a floor never met
    stops_early = lambda warmup, repeats, min_seconds: iter(range(warmup + repeats + 2))  # noqa: E731
    monkeypatch.setattr(measuring, "_rounds", stops_early)  # the floor met after two rounds past the repeats
    assert timed(1.0) == [*planned, (3, cap), (4, cap), (5, cap), (5, 5)]
    monkeypatch.undo()

    seen: list[tuple[int, int, str]] = []
    monkeypatch.setattr(measuring, "CALIBRATION_SECONDS", 1e9)  # every calibration runs to the round cap
    measuring.measure_table(
        compile_text(SPACE, "s.vit").space,
        SETTING,
        warmup=0,
        repeats=2,
        progress=lambda done, total, what: seen.append((done, total, what)),
    )
    done = [d for d, _, _ in seen]
    assert sorted(set(done)) == list(range(1, done[-1] + 1)) and done == sorted(
        done
    )  # each round once, in order
    assert all(d <= t for d, t, _ in seen) and seen[-1][0] == seen[-1][1]  # ends full
    calibration = [t for _, t, what in seen if what == "calibration"]
    assert calibration[-1] >= calibration[0] + (MAX_ROUNDS_FACTOR - 1) * 2  # the floor's rounds were counted


def test_how_far_the_machine_moved_reads_one_way() -> None:
    """ "66% faster" could mean 1.66x the speed or a third of the time: the recalibration line says time, and the
    speed ratio when the time fell."""
    from spvit_dsl.cli._common import _moved

    assert _moved(0.002) == "as long as"
    assert _moved(0.08) == "8% longer than"
    assert _moved(141 / 408 - 1) == "65% less time (2.9x the speed) than"
