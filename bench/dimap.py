"""DIMAP benchmarks: one-shot quality (the paper's Table 3 and 4 protocols), the structured variant's real speed-up,
and the time to score and threshold Swin-B.

* ``quality`` — a tiny Swin (examples/dimap_swin_digits.vit) trained on digits per seed; then, one-shot and before
  any fine-tuning, 19%, 28%, 38% and 50% of the prunable weights (qkv, proj, fc1, fc2) removed (the paper's
  fractions; 65% and 80% added, where a network this small starts to break) by DIMAP (``scope = module``, the
  paper), DIMAP with one threshold for the whole model (``scope = global``, Table 4's ablation) and uniform
  magnitude pruning (every layer loses the same fraction, by |w|). Validation top-1 and loss of each.
* ``speed`` — Swin-T shapes (random init: no weights can be downloaded here), the structured variant
  (``ffn: groups of 32; head_dim: 8..32 step 8``) at 70% and 50% of the dense FLOPs, and at 50% with per-head
  widths in steps of 16 (``head_dim: 16..32 step 16``), built and timed against the dense model (interleaved, median, CPU, 2 threads, batch 8): latency cut ÷ FLOPs cut (target ≥ 0.9). The
  unstructured result at 50% is timed too: stored dense, it runs at dense speed (no speed-up is expected from
  dense kernels; its FLOPs are sparse FLOPs).
* ``scoring`` — Swin-B (88 M weights, random init): seconds to score every weight and bisect the thresholds
  (``DimapStrategy.finalize``), next to the time to build the supernet.

    python bench/dimap.py [--parts quality speed scoring] [--seeds 0 1 2] [--epochs 40]

Writes bench/results/dimap-<host>.json (``quality`` also read by tests/test_dimap_quality.py, marked slow).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._machine import run_parts  # noqa: E402

SPEC = os.path.join(ROOT, "examples", "dimap_swin_digits.vit")
FRACTIONS = (
    0.19,
    0.28,
    0.38,
    0.50,
    0.65,
    0.80,
)  # of the prunable weights removed: the paper's Table 3, then 2 more
LAYERS = ("qkv", "proj", "fc1", "fc2")


def _prunable(program) -> int:  # noqa: ANN001
    """Weights of every qkv, proj, fc1 and fc2 (biases excluded)."""
    from spvit_dsl.space.cost import arch_cost
    from spvit_dsl.space.plan import Density

    dense = program.space.dense()
    sparse = dense.__class__(
        tuple(b.__class__(b.op, b.ffn, b.heads, b.head_dim, Density.uniform(0.0)) for b in dense.blocks),
        dense.embed,
    )
    g = program.space.geometry
    return int(arch_cost(g, dense, "exact").params - arch_cost(g, sparse, "exact").params)


def _spec(text: str, budget: str, scope: str) -> str:
    body = text.split("budget {")[0]
    return body + f"budget {{ {budget} }}\nsearch dimap {{ scope = {scope} }}\n"


def quality_seed(seed: int, epochs: int, out: str) -> dict[str, object]:
    import torch

    from spvit_dsl.compact.build import build
    from spvit_dsl.compile.program import compile_file, compile_text
    from spvit_dsl.runtime.evaluate import evaluate
    from spvit_dsl.search import run_search
    from spvit_dsl.space.cost import arch_cost
    from spvit_dsl.space.plan import Density
    from spvit_dsl.supernet.lower import lower
    from spvit_dsl.train import recipe
    from spvit_dsl.train.finetune import FinetuneSettings

    torch.manual_seed(seed)
    program = compile_file(SPEC)
    out = os.path.join(out, f"seed{seed}")
    dense = recipe.train_dense(
        program,
        os.path.join(out, "dense"),
        FinetuneSettings(epochs=epochs, lr=2e-3, warmup_epochs=2, seed=seed),
        reuse=False,
    )
    data = recipe.data_of(program)
    prunable = _prunable(program)
    dense_params = arch_cost(program.space.geometry, program.space.dense(), program.convention).params
    text = open(SPEC).read()
    rows: dict[str, object] = {"dense": {"top1": dense.metrics.top1, "params": dense_params}}
    net = lower(program.space, weights=dense.timm_state, convention=program.convention)
    net.eval()
    for frac in FRACTIONS:
        limit = dense_params - frac * prunable
        key = f"{round(frac * 100)}%"
        row: dict[str, object] = {"removed_of_prunable": frac, "params_limit": limit}
        for scope in ("module", "global"):
            spec = compile_text(_spec(text, f"params <= {limit / 1e3:.6f}K", scope), f"dimap_{scope}.vit")
            res = run_search(
                spec, out=os.path.join(out, f"{key}_{scope}"), init_checkpoint=dense.timm_state, quiet=True
            )
            model = build(res.frozen_path, weights=res.checkpoint_path)
            m = evaluate(model, data.val)
            row[f"dimap_{scope}"] = {
                "top1": m.top1,
                "loss": m.loss,
                "params": res.costs["params"],
                "densities": [[round(b.density.of(la), 4) for la in LAYERS] for b in res.arch.blocks],
            }
        base = program.space.dense()
        uniform = base.__class__(
            tuple(
                b.__class__(b.op, b.ffn, b.heads, b.head_dim, Density.uniform(1.0 - frac))
                for b in base.blocks
            ),
            base.embed,
        )
        net.set_arch(uniform)  # every layer keeps its largest |w|
        m = evaluate(net, data.val)
        row["uniform_magnitude"] = {
            "top1": m.top1,
            "loss": m.loss,
            "params": arch_cost(program.space.geometry, uniform, program.convention).params,
        }
        net.reset()
        rows[key] = row
    return rows


def quality(seeds: list[int], epochs: int, out: str) -> dict[str, object]:
    per_seed = {s: quality_seed(s, epochs, out) for s in seeds}
    summary: dict[str, dict[str, object]] = {}
    for frac in FRACTIONS:
        key = f"{round(frac * 100)}%"
        summary[key] = {}
        for method in ("dimap_module", "dimap_global", "uniform_magnitude"):
            accs = [per_seed[s][key][method]["top1"] for s in seeds]
            losses = [per_seed[s][key][method]["loss"] for s in seeds]
            summary[key][method] = {
                "mean": statistics.mean(accs),
                "min": min(accs),
                "max": max(accs),
                "mean_loss": statistics.mean(losses),
            }
        summary[key]["dimap_ge_uniform_every_seed"] = all(
            per_seed[s][key]["dimap_module"]["top1"] >= per_seed[s][key]["uniform_magnitude"]["top1"]
            for s in seeds
        )
    dense = [per_seed[s]["dense"]["top1"] for s in seeds]
    return {
        "spec": os.path.relpath(SPEC, ROOT),
        "epochs": epochs,
        "seeds": seeds,
        "dense": {"mean": statistics.mean(dense), "min": min(dense), "max": max(dense)},
        "per_seed": per_seed,
        "summary": summary,
    }


SWIN_T = """backbone swin_tiny_patch4_window7_224 { weights = none }
blocks all { %s }
budget { flops <= %s }
search dimap { }
"""


def speed(threads: int, batch: int, repeats: int) -> dict[str, object]:
    import torch

    from spvit_dsl.compact.build import build
    from spvit_dsl.compact.skeleton import create_dense
    from spvit_dsl.compact.speed import time_models
    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.search import run_search
    from spvit_dsl.space import cost

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cases = {
        "structured 70%": ("ffn: groups of 32; head_dim: 8..32 step 8", "70%"),
        "structured 50%": ("ffn: groups of 32; head_dim: 8..32 step 8", "50%"),
        # the remedy docs/dimap.md recommends for CPUs: no head narrower than 16 channels
        "structured 50%, head_dim step 16": ("ffn: groups of 32; head_dim: 16..32 step 16", "50%"),
        "unstructured 50%": ("sparsity: 0..0.95 step 0.05", "50%"),
    }
    models, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (space, budget) in cases.items():
            program = compile_text(SWIN_T % (space, budget), "swin_t_dimap.vit")
            res = run_search(program, out=os.path.join(tmp, name.replace(" ", "_")), quiet=True)
            models[name] = build(res.frozen_path, weights=res.checkpoint_path)
            rows[name] = {"flops_exact": res.costs["flops_exact"], "arch": _widths(res.arch)}
        g = program.space.geometry
        models = {"dense": create_dense(g)} | models
        timings = time_models(models, (batch, 3, 224, 224), device=torch.device("cpu"), repeats=repeats)
    dense_ms, dense_flops = timings["dense"].median_ms, cost.dense_cost(g, "exact").macs
    out: dict[str, object] = {"dense": {"timing": timings["dense"].as_dict(), "flops_exact": dense_flops}}
    for name, row in rows.items():
        t = timings[name]
        flops_cut = 1 - float(row["flops_exact"]) / dense_flops
        latency_cut = 1 - t.median_ms / dense_ms
        out[name] = row | {
            "timing": t.as_dict(),
            "flops_cut": round(flops_cut, 4),
            "latency_cut": round(latency_cut, 4),
            "cut_ratio": round(latency_cut / flops_cut, 4),
            "target_met": latency_cut / flops_cut >= 0.9 if name.startswith("structured") else None,
        }
    return {"model": "swin_tiny_patch4_window7_224", "threads": threads, "batch": batch, "rows": out}


def _widths(arch) -> dict[str, list[int]]:  # noqa: ANN001
    return {"ffn": [b.ffn for b in arch.blocks], "head_dim": [b.head_dim for b in arch.blocks]}


def scoring() -> dict[str, object]:
    import torch

    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.search import run_search
    from spvit_dsl.search.methods.dimap import DimapStrategy

    torch.manual_seed(0)
    text = """backbone swin_base_patch4_window7_224 { weights = none }
blocks all { sparsity: 0..0.95 step 0.05 }
budget { flops <= 60% }
search dimap { }
"""
    program = compile_text(text, "swin_b_dimap.vit")
    spent: list[float] = []
    original = DimapStrategy.finalize

    def timed(self):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        try:
            return original(self)
        finally:
            spent.append(time.perf_counter() - t0)

    DimapStrategy.finalize = timed  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = run_search(program, out=tmp, quiet=True)
            total = time.perf_counter() - t0
    finally:
        DimapStrategy.finalize = original  # type: ignore[method-assign]
    weights = sum(
        b.dim * 3 * b.heads * b.head_dim + b.heads * b.head_dim * b.dim + 2 * b.dim * b.hidden
        for b in program.space.geometry.blocks
    )
    return {
        "model": "swin_base_patch4_window7_224",
        "prunable_weights": weights,
        "score_and_threshold_s": round(spent[0], 2),
        "search_total_s": round(total, 2),
        "budget_ratio": res.budgets[0]["ratio"],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["quality", "speed", "scoring"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_dimap"))
    args = ap.parse_args()
    run_parts(
        "dimap",
        args.parts,
        {
            "quality": lambda: quality(args.seeds, args.epochs, args.out),
            "speed": lambda: speed(args.threads, args.batch_size, args.repeats),
            "scoring": scoring,
        },
    )


if __name__ == "__main__":
    main()
