"""``spvit-dsl bench``: measured latency beside the dense backbone, FLOPs ratio from the cost model (no timing
assertions: only that the report is complete and consistent), for an SPViT point and one that cuts every
dimension."""

from __future__ import annotations

import json

import pytest
import torch
from _frozen import VIT_BACKBONE, every_dimension_text, pattern_arch, search_program, write_frozen
from typer.testing import CliRunner

from spvit_dsl.cli import app, main
from spvit_dsl.compile.program import compile_text
from spvit_dsl.space.cost import arch_cost, dense_arch
from spvit_dsl.space.plan import BlockArch, Density, FrozenArch

runner = CliRunner()
FAST = ["--device", "cpu", "--batch-size", "2", "--repeats", "2", "--warmup", "0", "--min-seconds", "0"]


def _frozen(kind, tmp_path):
    if kind == "spvit":
        program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
        arch = pattern_arch(program)
    else:  # embedding width, heads, per-head width and densities cut too
        path = tmp_path / "every.vit"
        path.write_text(every_dimension_text(VIT_BACKBONE))
        program = compile_text(path.read_text(), str(path))
        base = pattern_arch(program)
        blocks = [BlockArch(b.op, b.ffn, 1, 9, Density.uniform(0.5)) for b in base.blocks]
        arch = FrozenArch(tuple(blocks), (20,))
    return program, arch, write_frozen(program, arch, tmp_path / "f.vit")


@pytest.fixture(params=["spvit", "every"])
def frozen(request, tmp_path):
    return _frozen(request.param, tmp_path)


def test_bench_json_report(frozen):
    program, arch, path = frozen
    result = runner.invoke(app, ["bench", str(path), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    g = program.space.geometry
    ideal = arch_cost(g, dense_arch(g), "exact").macs / arch_cost(g, arch, "exact").macs
    assert r["flops_speedup"] == pytest.approx(ideal, rel=1e-3)
    assert set(r["timings"]) == {"compact", "dense"}
    for t in r["timings"].values():
        assert t["batch_size"] == 2 and t["repeats"] == 2 and 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"]
    # the report rounds ratios to 4 decimals: compare within that rounding (absolute, as ratios may be small)
    assert r["speedup"] == pytest.approx(
        r["timings"]["dense"]["median_ms"] / r["timings"]["compact"]["median_ms"], rel=1e-3, abs=1e-4
    )
    assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_speedup"], rel=1e-3, abs=1e-4)
    t = r["timings"]
    assert r["latency_cut"] == pytest.approx(
        1 - t["compact"]["median_ms"] / t["dense"]["median_ms"], abs=1e-3
    )
    assert r["flops_cut"] == pytest.approx(1 - 1 / ideal, abs=1e-3)
    assert r["machine"]["device"] == "cpu" and r["machine"]["torch"] == torch.__version__
    assert r["costs"]["params"] == arch_cost(g, arch, "exact").params
    assert r["costs"]["paper"]["flops"] == arch_cost(g, arch, "paper").macs


def test_bench_table_states_both_ratios_and_says_when_the_network_is_slower(frozen):
    import re

    _, _, path = frozen
    result = runner.invoke(app, ["bench", str(path), *FAST])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    m = re.search(r"speed-up (\d+\.\d+)x measured vs (\d+\.\d+)x by FLOPs: efficiency (-?\d+)%", text)
    assert m is not None, text
    assert "(measured ÷ promised speed-up); latency cut" in text
    assert ("runs slower than the dense one" in text) == (float(m.group(1)) < 1)


def test_bench_times_past_the_repeats_until_its_time_floor_or_the_cap(tmp_path):
    """--min-seconds keeps timing past --repeats (the rounds counted, not seconds: a floor no machine reaches stops at
    the cap, which the help states), and the table says how many rounds the medians are of."""
    from spvit_dsl.compact.speed import MAX_ROUNDS_FACTOR

    _, _, path = _frozen("spvit", tmp_path)
    capped = [*FAST[:-1], "1e4"]
    result = runner.invoke(app, ["bench", str(path), *capped, "--json"])
    assert result.exit_code == 0, result.output
    timings = json.loads(result.output)["timings"]
    assert {t["repeats"] for t in timings.values()} == {MAX_ROUNDS_FACTOR * 2}
    result = runner.invoke(app, ["bench", str(path), *FAST])
    assert result.exit_code == 0, result.output
    assert "median of 2 interleaved rounds" in " ".join(result.output.split())
    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "300"})
    assert f"at most {MAX_ROUNDS_FACTOR}x --repeats rounds" in " ".join(result.output.split())


def test_bench_table_without_dense(frozen):
    _, _, path = frozen
    result = runner.invoke(app, ["bench", str(path), *FAST, "--no-vs-dense", "--round", "8"])
    assert result.exit_code == 0, result.output
    assert "compact" in result.output and "dense" not in result.output.split("batch 2", 1)[1]


def test_bench_failures(tmp_path, capsys):
    _, _, path = _frozen("spvit", tmp_path)
    cases = [
        (["bench", str(tmp_path / "missing.vit"), *FAST], "file not found"),
        (["bench", str(path), *FAST, "--batch-size", "0"], "--batch-size: expected a positive integer"),
        (
            ["bench", str(path), "--device", "tpu"],
            "--device: expected auto, cpu, cuda or cuda:N, found 'tpu'",
        ),
        (["bench", str(path), *FAST, "--round", "0"], "--round"),
        (
            ["bench", str(path), *FAST, "--threads", "99999"],
            "--threads: expected 0 (torch's default) to 1024",
        ),
        (["bench", str(path), *FAST, "--threads", "-1"], "--threads: expected 0 (torch's default) to 1024"),
        (["bench", str(path), *FAST, "--warmup", "-1"], "--warmup: expected 0 or more"),
        *(
            (
                ["bench", str(path), *FAST, "--min-seconds", v],
                f"--min-seconds: expected 0 to 86400, found {float(v)}",
            )
            for v in ("-1", "nan", "inf", "1e300")
        ),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", str(path), "--device", "cuda"], "--device cuda: CUDA is not available"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 1 and message in err and "Traceback" not in err, (argv, err)
