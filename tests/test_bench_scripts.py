"""Every benchmark script under ``bench/`` runs end to end in its cheapest configuration and writes a JSON report
naming the machine (so an API change cannot silently break a benchmark). Timings are not checked: benchmarks measure
speed, tests never do. ``bench/quality.py`` trains for minutes: the slow test ``tests/test_quality.py`` covers it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "compile": ["bench/compile.py", "--repeats", "1"],
    "search_step": [
        "bench/search_step.py",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "4",
    ],
    "supernet_step": [
        "bench/supernet_step.py",
        "--device",
        "cpu",
        "--models",
        "deit_tiny_patch16_224",
        "--batch",
        "1",
        "--steps",
        "1",
        "--modes",
        "all_on",
        "every_mask",
    ],  # fmt: skip
    "frozen_speed": [
        "bench/frozen_speed.py",
        "--models",
        "deit_s",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ],  # fmt: skip
    "latency": [
        "bench/latency.py",
        "--models",
        "tiny",
        "--batch-sizes",
        "1",
        "--points",
        "2",
        "--repeats",
        "1",
        "--pass-seconds",
        "1e9",
        "--search-epochs",
        "1",
    ],  # fmt: skip
    "dimap": ["bench/dimap.py", "--parts", "quality", "--seeds", "0", "--epochs", "1"],
    "ofb": ["bench/ofb.py", "--model", "deit_tiny_patch16_224", "--batch", "1", "--steps", "1"],
    "upvit": [
        "bench/upvit.py",
        "--parts",
        "throughput",
        "--proxy",
        "2",
        "--units-per-pass",
        "16",
        "--groups",
        "attn_1",
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_bench_script_runs_and_writes_its_report(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "SPVIT_BENCH_RESULTS": str(tmp_path)}
    args = [*CASES[name]]
    if name == "search_step":
        args += ["--out", str(tmp_path / "search_step-test.json")]
    if name == "dimap":
        args += ["--out", str(tmp_path / "runs")]
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = list(tmp_path.glob(f"{name}-*.json"))
    assert len(reports) == 1, sorted(p.name for p in tmp_path.iterdir())
    report = json.loads(reports[0].read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    assert report["results"], report
    if name == "latency":  # both predictions of every network, and the search's own epoch count
        for row in report["results"]["tables"]["runs"]:
            assert row["dense_ms_recalibrated"] > 0 and row["median_abs_error_recalibrated"] >= 0
            assert all(n["predicted_ms_recalibrated"] > 0 for n in row["networks"])
            same = row["median_abs_error_same_rounds"]  # None: the same-round factors did not solve
            assert (same is None) == (row["same_round_part_scale"] is None) and (same is None or same >= 0)
            # the noise floor: every network timed twice, the first timing read as the second's prediction
            for n in row["networks"]:
                assert n["measured_ms_again"] > 0
                assert n["error_repeat"] == pytest.approx(
                    n["measured_ms"] / n["measured_ms_again"] - 1, abs=2e-3
                )
            repeats = sorted(abs(n["error_repeat"]) for n in row["networks"])
            assert repeats[0] <= row["median_abs_error_repeat"] <= repeats[-1] and row["pass_seconds"] > 0
            assert row["pass_rounds"] == 8  # --repeats 1, and a floor no machine reaches: the cap, 8×
        assert report["results"]["search"]["epochs"] == 1
