"""`make demo`: the whole pipeline on the embedded default (scikit-learn's digits, examples/digits_tiny.vit).

1. compile the spec and print its search space;
2. train the dense tiny ViT (or reuse the cached checkpoint in runs/demo/dense/);
3. search at the spec's budget (50% of the dense FLOPs), starting from the dense weights;
4. build the compact network from the search checkpoint and fine-tune it;
5. evaluate both networks, measure their CPU latency, diff the frozen spec against the dense one, and print a
   summary table; the search's report.png shows the chosen op and FFN width per block.

    python examples/demo.py [--out runs/demo] [--dense-epochs 40] [--finetune-epochs 40] [--search-epochs N]
                            [--seed 0] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SPEC = os.path.join(ROOT, "examples", "digits_tiny.vit")


def step(title: str) -> None:
    from rich.console import Console

    Console().rule(f"[bold]{title}")


def _bar(title: str):
    from rich.progress import Progress

    progress = Progress()
    task = progress.add_task(title, total=None)
    progress.start()

    def update(done: int, total: int, loss: float) -> None:
        progress.update(task, completed=done, total=total, description=f"{title}  loss {loss:.3f}")
        if done >= total:
            progress.stop()

    return update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    ap.add_argument("--dense-epochs", type=int, default=40)
    ap.add_argument("--finetune-epochs", type=int, default=40)
    ap.add_argument("--search-epochs", type=int, default=None, help="default: the spec's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="retrain the dense network instead of reusing it")
    args = ap.parse_args()

    import torch

    torch.manual_seed(args.seed)
    from spvit_dsl.cli.compile import print_summary
    from spvit_dsl.compact.speed import time_models
    from spvit_dsl.compile.diff import diff
    from spvit_dsl.compile.freeze import arch_of
    from spvit_dsl.compile.program import compile_file
    from spvit_dsl.search import run_search
    from spvit_dsl.train import recipe
    from spvit_dsl.train.finetune import FinetuneSettings, evaluate

    os.makedirs(args.out, exist_ok=True)
    started = time.time()

    step("1. compile the spec")
    program = compile_file(SPEC)
    print_summary(program)

    step("2. the dense network")
    dense_settings = FinetuneSettings(
        epochs=args.dense_epochs, batch_size=64, lr=2e-3, warmup_epochs=2, seed=args.seed
    )
    dense = recipe.train_dense(
        program,
        os.path.join(args.out, "dense"),
        dense_settings,
        reuse=not args.fresh,
        progress=_bar("dense training"),
    )
    print(f"dense network: top-1 {dense.metrics.top1:.2f}% ({dense.spec_path})")
    data = recipe.data_of(program)

    step(f"3. search at {program.budgets[0].describe()}")
    result = run_search(
        program,
        out=os.path.join(args.out, "search"),
        init_checkpoint=dense.timm_state,
        seed=args.seed,
        epochs=args.search_epochs,
    )
    print(result.frozen_text)

    step("4. build the compact network and fine-tune it")
    settings = FinetuneSettings(
        epochs=args.finetune_epochs, batch_size=64, lr=1e-3, warmup_epochs=1, seed=args.seed
    )
    tuned = recipe.finetune_frozen(
        result.frozen_path,
        result.checkpoint_path,
        os.path.join(args.out, "finetune"),
        settings,
        data=data,
        progress=_bar("fine-tuning"),
    )
    dense, compact = dense.model, tuned.model

    step("5. evaluate, measure, compare")
    acc_dense = evaluate(dense, data.val)
    acc_compact = evaluate(compact, data.val)
    shape = (64, *data.val[0][0].shape)
    timing = time_models(
        {"dense": dense, "searched": compact}, shape, device=torch.device("cpu"), repeats=30, warmup=5
    )
    frozen_program, dense_program = (
        compile_file(result.frozen_path),
        compile_file(os.path.join(args.out, "dense", "dense.vit")),
    )
    d = diff(dense_program, frozen_program)
    summary = _summary(program, dense_program, frozen_program, acc_dense, acc_compact, timing, d)
    _print_table(summary)
    summary["seconds"] = round(time.time() - started, 1)
    summary["report"] = result.report_path
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(
        f"\nblock changes vs dense: {len(d.rows)}; report {result.report_path}; "
        f"total {summary['seconds']:.0f} s; outputs in {args.out}"
    )
    assert arch_of(frozen_program.checked) == result.arch


def _summary(program, dense_program, frozen_program, acc_dense, acc_compact, timing, d) -> dict:
    from spvit_dsl.compile.freeze import arch_of

    conv = program.convention
    rows = {}
    for name, prog, acc in (("dense", dense_program, acc_dense), ("searched", frozen_program, acc_compact)):
        cost = prog.graph.cost(arch_of(prog.checked), conv)
        rows[name] = {
            "top1": round(acc.top1, 2),
            "flops_M": cost.macs / 1e6,  # exact: a rounded figure could cross the budget it meets
            "params_M": cost.params / 1e6,
            "latency_ms": round(timing[name].median_ms, 3),
        }
    return {
        "convention": conv,
        "budget": program.budgets[0].describe(),
        "rows": rows,
        "ops": [b.op for b in arch_of(frozen_program.checked).blocks],
        "ffn": [b.ffn for b in arch_of(frozen_program.checked).blocks],
        "changes": len(d.rows),
    }


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"digits: dense vs searched ({summary['budget']}, {summary['convention']} convention)"
    )
    for col in ("network", "top-1 %", "FLOPs (M)", "params (M)", "CPU latency, batch 64 (ms)"):
        table.add_column(col, justify="right")
    for name, r in summary["rows"].items():
        table.add_row(
            name, f"{r['top1']:.2f}", f"{r['flops_M']:.3f}", f"{r['params_M']:.4f}", f"{r['latency_ms']:.2f}"
        )
    Console().print(table)
    print("ops per block:", " ".join(summary["ops"]))
    print("FFN width per block:", " ".join(map(str, summary["ffn"])))


if __name__ == "__main__":
    main()
