"""`make demo` end to end on digits with few epochs: every stage runs and the summary holds what it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from spvit_dsl.compile.program import compile_file

ROOT = Path(__file__).parent.parent


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        str(ROOT / "examples/demo.py"),
        "--out",
        str(out),
        "--dense-epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--search-epochs",
        "1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {"dense", "searched"}
    budget = compile_file(str(ROOT / "examples/digits_tiny.vit")).budgets[0].absolute
    assert summary["rows"]["searched"]["flops_M"] * 1e6 <= budget * (1 + 1e-6)
    assert summary["rows"]["searched"]["flops_M"] * 1e6 >= 0.99 * budget
    assert summary["rows"]["dense"]["flops_M"] > summary["rows"]["searched"]["flops_M"]
    frozen = compile_file(str(out / "search" / "digits_tiny.frozen.vit"))
    assert frozen.frozen and frozen.decisions == 0
    assert (out / "search" / "report.png").stat().st_size > 10_000
    assert "dense vs searched" in run.stdout and "ops per block" in run.stdout
