"""Side by side with a peer: Torch-Pruning's magnitude-pruned DeiT-S against spvit-dsl's frozen networks at the same
FLOPs (an optional extra: ``pip install -e ".[peers]"``).

At 70% and 50% of DeiT-S's FLOPs (exact convention), timed interleaved with the dense network:

* ``torch-pruning``: ``torch_pruning.pruner.MagnitudePruner`` (L1 magnitude) pruning the FFN hidden neurons of every
  block by one ratio, bisected until the network meets the target (attention left dense, as its ViT example does
  with ``prune_num_heads`` off);
* ``spvit-dsl``: the SPViT-style network of ``bench/frozen_speed.py`` (early convolutions, FFN widths falling with
  depth) at raw widths and after ``build --round auto`` (latency-aware widths for this device).

Efficiency = measured speed-up / FLOPs speed-up. Writes bench/results/peers-<host>.json.

    python bench/peers.py [--threads 2] [--batch-sizes 8 1] [--repeats 7]

``--repeats`` counts rounds at batch 8; a smaller batch times ``repeats · 8 / batch`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench._machine import machine, result_path, rounds_for  # noqa: E402
from bench.frozen_speed import CONVENTION, latency_round, spvit_like  # noqa: E402
from spvit_dsl._io import write_text  # noqa: E402
from spvit_dsl.compact import create_compact, create_dense  # noqa: E402
from spvit_dsl.compact.speed import time_models  # noqa: E402
from spvit_dsl.space import cost  # noqa: E402
from spvit_dsl.space.backbones import resolve  # noqa: E402
from spvit_dsl.space.plan import BlockArch, FrozenArch, Geometry  # noqa: E402

MODEL = "deit_small_patch16_224"
TARGETS = (0.7, 0.5)


def torch_pruning_network(g: Geometry, target: float) -> tuple[nn.Module, list[int]]:
    """DeiT-S with every FFN pruned by Torch-Pruning's MagnitudePruner at the one ratio that meets ``target``."""
    import torch_pruning as tp

    dense = cost.dense_cost(g, CONVENTION).macs

    def widths(ratio: float) -> list[int]:  # what the pruner keeps per FFN at this ratio (no rounding)
        return [b.hidden - int(ratio * b.hidden) for b in g.blocks]

    def flops(ratio: float) -> float:
        blocks = tuple(
            BlockArch("msa", w, b.heads, b.head_dim) for w, b in zip(widths(ratio), g.blocks, strict=True)
        )
        return cost.arch_cost(g, FrozenArch(blocks, g.dims), CONVENTION).macs

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if flops(mid) <= target * dense else (mid, hi)
    ratio = hi
    torch.manual_seed(0)
    model = create_dense(g).eval()
    fc1 = [m.mlp.fc1 for m in model.blocks]  # type: ignore[union-attr]
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in fc1]
    example = torch.randn(1, g.in_chans, g.img_size, g.img_size)
    warnings.filterwarnings("ignore", module="torch_pruning")  # the tokens are not in any pruned group here
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        root_module_types=[nn.Linear],
    )
    pruner.step()
    kept = [int(m.out_features) for m in model.modules() if isinstance(m, nn.Linear) and m in fc1]
    return (
        model,
        kept,
    )  # its FLOPs: the cost model's at these widths (attention, embedding and head are dense)


def run(threads: int, batch: int, repeats: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    g = resolve(MODEL, {})
    device = torch.device("cpu")
    dense_flops = cost.dense_cost(g, CONVENTION).macs
    models: dict[str, nn.Module] = {"dense": create_dense(g)}
    flops: dict[str, float] = {"dense": dense_flops}
    widths: dict[str, list[int]] = {}
    for t in TARGETS:
        name = f"{round(t * 100)}%"
        tp_model, kept = torch_pruning_network(g, t)
        models[f"torch-pruning {name}"] = tp_model
        blocks = tuple(BlockArch("msa", w, b.heads, b.head_dim) for w, b in zip(kept, g.blocks, strict=True))
        flops[f"torch-pruning {name}"] = cost.arch_cost(g, FrozenArch(blocks, g.dims), CONVENTION).macs
        widths[f"torch-pruning {name}"] = kept
        ours = spvit_like(g, t)
        auto = latency_round(g, ours, t, device, batch)
        for label, arch in ((f"spvit-dsl {name}", ours), (f"spvit-dsl {name} round auto", auto)):
            models[label] = create_compact(g, arch)
            flops[label] = cost.arch_cost(g, arch, CONVENTION).macs
            widths[label] = [b.ffn for b in arch.blocks]
    timings = time_models(models, (batch, g.in_chans, g.img_size, g.img_size), device=device, repeats=repeats)
    dense_ms = timings["dense"].median_ms
    rows = {}
    for name, t in timings.items():
        speedup = dense_ms / t.median_ms
        ideal = dense_flops / flops[name]
        rows[name] = {
            "median_ms": round(t.median_ms, 2),
            "flops_exact": flops[name],
            "flops_ratio": round(flops[name] / dense_flops, 4),
            "speedup": round(speedup, 4),
            "efficiency": round(speedup / ideal, 4),
            "ffn": widths.get(name),
        }
        print(
            f"{threads} threads, batch {batch}: {name:28s} {flops[name] / dense_flops:6.1%} FLOPs "
            f"{t.median_ms:8.1f} ms  speed-up {speedup:4.2f}x  efficiency {speedup / ideal:5.0%}",
            flush=True,
        )
    return {"threads": threads, "batch": batch, "repeats": repeats, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise SystemExit('bench/peers.py needs Torch-Pruning: pip install -e ".[peers]"') from None
    results = [run(args.threads, b, rounds_for(args.repeats, b)) for b in args.batch_sizes]
    out = {
        "benchmark": "peers",
        "machine": machine("cpu") | {"torch_threads": args.threads},
        "convention": CONVENTION,
        "results": results,
    }
    path = result_path("peers")
    write_text(path, json.dumps(out, indent=1) + "\n")
    print("written", path)


if __name__ == "__main__":
    main()
