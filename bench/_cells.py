"""Cells of the quality benchmarks (bench/upvit.py, bench/ofb.py): one strategy searched from a shared dense start,
then fine-tuned; read back when a run is resumed; summarised over seeds."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any


def _shape(arch: Any) -> dict[str, object]:
    return {
        "embed": list(arch.embed),
        "heads": [b.heads for b in arch.blocks],
        "head_dim": [b.head_dim for b in arch.blocks],
        "ffn": [b.ffn for b in arch.blocks],
    }


def finished_cell(out: str, name: str) -> dict[str, object] | None:
    """A finished cell (search and fine-tune) read back from its folders under ``out``, or None."""
    from spvit_dsl.compile.freeze import arch_of
    from spvit_dsl.compile.program import compile_file

    stem = os.path.join(out, name)
    frozen, tuned = os.path.join(stem, f"{name}.frozen.vit"), os.path.join(f"{stem}-ft", "finetune.json")
    if not (os.path.exists(frozen) and os.path.exists(tuned)):
        return None
    program = compile_file(frozen)
    arch = arch_of(program.checked)
    with open(tuned) as fh:
        top1 = json.load(fh)["best"]["top1"]
    flops = program.graph.cost(arch, program.convention).macs
    return {
        "top1": top1,
        "flops": flops,
        "search_s": None,
        **_shape(arch),
    }  # search_s: not timed when read back


def run_cell(
    text: str, out: str, name: str, *, init: str, seed: int, tune: Any, data: Any
) -> dict[str, object]:
    """Search spec ``text`` from the dense weights ``init`` into ``out/name``, fine-tune the frozen network with
    ``tune`` (FinetuneSettings) into ``out/name-ft``; the cell's row (best top-1, FLOPs, times, shape)."""
    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.search import run_search
    from spvit_dsl.train import recipe

    program = compile_text(text, os.path.join(out, f"{name}.vit"))
    started = time.perf_counter()
    res = run_search(program, out=os.path.join(out, name), init_checkpoint=init, seed=seed, quiet=True)
    search_s = time.perf_counter() - started
    tuned = recipe.finetune_frozen(
        res.frozen_path, res.checkpoint_path, os.path.join(out, f"{name}-ft"), tune, data=data
    )
    derived = res.info.get("derived_cost")
    return {
        "top1": tuned.metrics.top1,
        "flops": res.costs[f"flops_{program.convention}"],
        "search_s": round(search_s, 1),
        "search_val_top1": res.val_accuracy,
        "derived_flops": derived.get("flops") if isinstance(derived, dict) else None,
        **_shape(res.arch),
        "notice": res.info.get("notice"),
    }


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max best top-1 of every cell over the seeds."""
    names = next(iter(per_seed.values()))
    out = {}
    for name in names:
        accs = [rows[name]["top1"] for rows in per_seed.values()]
        out[name] = {"mean_top1": statistics.mean(accs), "min_top1": min(accs), "max_top1": max(accs)}
    return out
