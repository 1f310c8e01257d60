"""Quality on digits: does the searched network keep the dense accuracy, and beat uniform pruning at equal FLOPs?

For each seed: train the dense tiny ViT of examples/digits_tiny.vit, search at its budget (50% of the dense FLOPs)
from the dense weights, build and fine-tune the searched network; fine-tune, for the same epochs and from the same
dense weights, two uniformly pruned networks at the same budget (the same op in every block — msa, or conv1x1 —
and the widest uniform FFN that fits). Reports best validation top-1 per network and seed.

The all-conv1x1 baseline is degenerate, and that is worth seeing: conv1x1 mixes no tokens, and the cls
token passes a conv branch unchanged (SPViT's definition), so with conv in every block the classifier's token never
reads the image and accuracy stays at chance. Uniform MSA is the meaningful uniform baseline.

    python bench/quality.py [--seeds 0 1 2] [--epochs 40]

Writes bench/results/quality.json (also read by tests/test_quality.py, marked slow).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._machine import machine  # noqa: E402

SPEC = os.path.join(ROOT, "examples", "digits_tiny.vit")


def run_seed(seed: int, epochs: int, out: str) -> dict[str, object]:
    import torch

    from spvit_dsl.compile.program import compile_file
    from spvit_dsl.search import run_search
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
    tune = FinetuneSettings(epochs=epochs, lr=1e-3, warmup_epochs=1, seed=seed)
    searched = run_search(
        program, out=os.path.join(out, "search"), init_checkpoint=dense.timm_state, seed=seed, quiet=True
    )
    rows = {"dense": {"top1": dense.metrics.top1, "flops": program.bounds().macs.dense}}
    tuned = recipe.finetune_frozen(
        searched.frozen_path, searched.checkpoint_path, os.path.join(out, "searched"), tune, data=data
    )
    rows["searched"] = {
        "top1": tuned.metrics.top1,
        "flops": searched.costs[f"flops_{program.convention}"],
        "ops": [b.op for b in searched.arch.blocks],
        "ffn": [b.ffn for b in searched.arch.blocks],
    }
    for op in ("msa", "conv1x1"):
        arch = recipe.uniform_arch(program, op)
        spec = recipe.write_frozen(
            program, arch, os.path.join(out, f"uniform_{op}.vit"), {"strategy": "uniform"}, budget=True
        )
        uniform = recipe.finetune_frozen(
            spec, dense.timm_state, os.path.join(out, f"uniform_{op}"), tune, data=data
        )
        rows[f"uniform_{op}"] = {
            "top1": uniform.metrics.top1,
            "flops": program.graph.cost(arch, program.convention).macs,
            "ffn": arch.blocks[0].ffn,
        }
    return rows


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, float]]:
    names = next(iter(per_seed.values())).keys()
    out = {}
    for name in names:
        accs = [per_seed[s][name]["top1"] for s in per_seed]
        out[name] = {"mean_top1": statistics.mean(accs), "min_top1": min(accs), "max_top1": max(accs)}
    return out


def run(seeds: list[int], epochs: int, out: str) -> dict[str, object]:
    started = time.time()
    per_seed = {s: run_seed(s, epochs, out) for s in seeds}
    return {
        "benchmark": "quality",
        "spec": "examples/digits_tiny.vit",
        "machine": machine(),
        "epochs": epochs,
        "seeds": seeds,
        "per_seed": per_seed,
        "summary": summarise(per_seed),
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    args = ap.parse_args()
    result = run(args.seeds, args.epochs, args.out)
    path = os.path.join(ROOT, "bench", "results", "quality.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    for name, s in result["summary"].items():
        print(
            f"{name:16s} top-1 mean {s['mean_top1']:6.2f}  (min {s['min_top1']:.2f}, max {s['max_top1']:.2f})"
        )
    print("written", path)


if __name__ == "__main__":
    main()
