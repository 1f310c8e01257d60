"""Evidence of quality (slow: ~10 minutes on 2 cores): on digits with 3 seeds, the searched network at 50% FLOPs,
fine-tuned, is within 2 points of the dense network and beats uniform pruning (MSA everywhere, the widest uniform
FFN that fits) fine-tuned for the same epochs. `python bench/quality.py` writes the same figures to
bench/results/quality.json."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_searched_keeps_dense_accuracy_and_beats_uniform_pruning(tmp_path: Path) -> None:
    from bench.quality import run
    from spvit_dsl.compile.program import compile_file

    result = run([0, 1, 2], 40, str(tmp_path))
    budget = compile_file(str(ROOT / "examples/digits_tiny.vit")).budgets[0].absolute
    summary = result["summary"]
    assert summary["searched"]["mean_top1"] >= summary["dense"]["mean_top1"] - 2.0
    assert summary["searched"]["mean_top1"] > summary["uniform_msa"]["mean_top1"]
    for rows in result["per_seed"].values():
        for name in ("searched", "uniform_msa"):
            assert 0.99 * budget <= rows[name]["flops"] <= budget
