"""Evidence of quality of the UP-ViT, DIMAP and OFB strategies (slow: ~15 + ~13 + ~40 minutes on 2 cores), the
protocols of `bench/upvit.py`, `bench/dimap.py` and `bench/ofb.py`, which write the same figures to bench/results/."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_upvit_beats_random_and_magnitude_at_the_same_shape(tmp_path: Path) -> None:
    """At 34% of the dense FLOPs, the uniform target shape chosen by UP-ViT, fine-tuned, beats the same shape
    chosen by `random` and by `magnitude` in mean top-1 over 3 seeds; every network has the same FLOPs."""
    from bench.upvit import quality

    result = quality([0, 1, 2], 40, str(tmp_path))
    summary = result["summary"]
    assert summary["upvit"]["mean_top1"] > summary["random"]["mean_top1"]
    assert summary["upvit"]["mean_top1"] > summary["magnitude"]["mean_top1"]
    for rows in result["per_seed"].values():
        same = {rows[name]["flops"] for name in ("upvit", "random", "magnitude")}
        assert len(same) == 1
        assert rows["upvit_nonuniform"]["flops"] <= next(iter(same))


@pytest.mark.slow
def test_dimap_one_shot_is_at_least_uniform_magnitude_on_average(tmp_path: Path) -> None:
    """DIMAP's Table 3 protocol on the tiny Swin, 3 seeds: at 38% and 50% of the prunable weights removed, DIMAP's
    mean one-shot top-1 is at least uniform magnitude pruning's (the per-seed comparison is reported, not asserted:
    on this network one seed at 38% trails by 3 images; see README), and at 80% DIMAP is ahead."""
    from bench.dimap import quality

    result = quality([0, 1, 2], 40, str(tmp_path))
    per_seed = result["per_seed"]
    for key in ("38%", "50%", "80%"):
        dimap = statistics.mean(per_seed[s][key]["dimap_module"]["top1"] for s in per_seed)
        uniform = statistics.mean(per_seed[s][key]["uniform_magnitude"]["top1"] for s in per_seed)
        assert dimap >= uniform, key


@pytest.mark.slow
def test_ofb_beats_random_and_magnitude_at_the_same_budget(tmp_path: Path) -> None:
    """At 50% of the dense FLOPs on OFB's default grids, 3 seeds, the same dense start and 40 epochs of training
    after it: OFB (10 search epochs + 30 of fine-tuning) beats `random` and `magnitude` (40 of fine-tuning) in mean
    top-1; OFB's frozen networks are at or under the budget within 1%, the baselines' at or under it."""
    from bench.ofb import quality

    result = quality([0, 1, 2], 40, 10, str(tmp_path), False)
    summary = result["summary"]
    assert summary["ofb"]["mean_top1"] > summary["random"]["mean_top1"]
    assert summary["ofb"]["mean_top1"] > summary["magnitude"]["mean_top1"]
    for rows in result["per_seed"].values():
        budget = rows["dense"]["flops"] * 0.5
        for name in ("ofb", "ofb_no_mim"):
            assert 0.99 * budget <= rows[name]["flops"] <= budget, name
        for name in (
            "random",
            "magnitude",
        ):  # the baselines: at or under (within 1% is not guaranteed for them)
            assert rows[name]["flops"] <= budget, name
