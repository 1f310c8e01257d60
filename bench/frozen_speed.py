"""Measured speed of compact SPViT networks against their dense backbone (CPU; GPU too when one is present).

For DeiT-S and Swin-S, SPViT-style frozen networks are constructed at about 70% and 50% of the dense FLOPs (exact
convention): convolutions replace MSA in the earliest blocks (1x1, the last of them 3x3 for DeiT), FFN widths shrink
linearly with depth (pruned hardest late), and one global FFN scale is bisected until the network hits the target.
Each network is timed raw (arbitrary widths, as a search leaves them) and with ``--round 8`` widths, interleaved with
the dense model (torch.inference_mode, warm-up, median of repeats).

    python bench/frozen_speed.py [--batch-sizes 8 1] [--repeats 7] [--warmup 2] [--threads 1 2] [--models deit_s swin_s]

``--repeats`` counts rounds at batch 8; a smaller batch times ``repeats · 8 / batch`` rounds (56 at batch 1), so
every row sees as many images.

Target: the measured speed-up reaches at least 90% of the FLOPs reduction, i.e.
``(t_dense / t_compact) / (F_dense / F_compact) >= 0.9``. Writes bench/results/frozen_speed-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._machine import machine, result_path, rounds_for  # noqa: E402
from spvit_dsl._io import write_text  # noqa: E402
from spvit_dsl.compact import create_compact, create_dense  # noqa: E402
from spvit_dsl.compact.build import round_widths  # noqa: E402
from spvit_dsl.compact.latency import table_for  # noqa: E402
from spvit_dsl.compact.speed import time_models  # noqa: E402
from spvit_dsl.space import cost  # noqa: E402
from spvit_dsl.space.backbones import resolve  # noqa: E402
from spvit_dsl.space.latency import LatencySetting, round_for_latency, rounding_space  # noqa: E402
from spvit_dsl.space.plan import BlockArch, BlockPlan, FfnChoice, FrozenArch, Geometry, Space  # noqa: E402

MODELS = {"deit_s": "deit_small_patch16_224", "swin_s": "swin_small_patch4_window7_224"}
TARGETS = (0.7, 0.5)
CONVENTION = "exact"


def _ops(g: Geometry, target: float) -> list[str]:
    """Convolutions in the earliest blocks: more of them for a tighter target (SPViT's released pattern)."""
    if g.family == "swin":  # stages 0-1 (4 blocks) first, then the start of stage 2
        n = 4 if target >= 0.65 else 7
        return ["conv1x1" if b.index < n else "msa" for b in g.blocks]
    n = 3 if target >= 0.65 else 5
    return ["conv3x3" if i == n - 1 else "conv1x1" if i < n else "msa" for i in range(g.depth)]


def spvit_like(g: Geometry, target: float) -> FrozenArch:
    """Early convolutions plus FFN keep ratios ``min(1, s · (1 − 0.6 · i/(L−1)))``; ``s`` bisected to the target."""
    ops = _ops(g, target)
    dense = cost.dense_cost(g, CONVENTION).macs
    L = g.depth

    def arch(s: float) -> FrozenArch:
        blocks = tuple(
            BlockArch(
                op,
                max(0, min(b.hidden, round(s * (1 - 0.6 * b.index / (L - 1)) * b.hidden))),
                b.heads,
                b.head_dim,
            )
            for op, b in zip(ops, g.blocks, strict=True)
        )
        return FrozenArch(blocks, g.dims)

    lo, hi = 0.0, 2.5
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost.arch_cost(g, arch(mid), CONVENTION).macs < target * dense else (lo, mid)
    return arch(lo)


def _describe(g: Geometry, a: FrozenArch) -> dict[str, object]:
    dense = cost.dense_arch(g)
    return {
        "ops": [b.op for b in a.blocks],
        "ffn": [b.ffn for b in a.blocks],
        **{f"flops_{c}": cost.arch_cost(g, a, c).macs for c in ("paper", "exact")},
        **{
            f"flops_ratio_{c}": cost.arch_cost(g, a, c).macs / cost.arch_cost(g, dense, c).macs
            for c in ("paper", "exact")
        },
        "params": cost.arch_cost(g, a, "exact").params,
    }


def latency_round(g: Geometry, a: FrozenArch, target: float, device: torch.device, batch: int) -> FrozenArch:
    """``build --round auto`` on ``a``: the widths this device runs fastest, within the target's FLOPs."""
    plans = tuple(BlockPlan(b, ("msa",), FfnChoice(), (b.heads,), (b.head_dim,)) for b in g.blocks)
    space = rounding_space(Space(g, plans, tuple((e,) for e in g.dims)), a)
    setting = LatencySetting(device.type, torch.get_num_threads(), batch, "fp32")
    table, _, _ = table_for(space, setting)

    def price(p: FrozenArch) -> dict[str, float]:
        c = cost.arch_cost(g, p, CONVENTION)
        return {"flops": float(c.macs), "params": float(c.params)}

    limit = target * cost.dense_cost(g, CONVENTION).macs
    return round_for_latency(g, a, table, price, {"flops": limit})


def bench_model(key: str, device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    g = resolve(MODELS[key], {})
    archs: dict[str, FrozenArch] = {}
    for t in TARGETS:
        a = spvit_like(g, t)
        archs[f"{round(t * 100)}%"] = a
        archs[f"{round(t * 100)}% round8"] = round_widths(g, a, 8)
        archs[f"{round(t * 100)}% auto"] = latency_round(g, a, t, device, args.batch_size)
    torch.manual_seed(0)
    models = {"dense": create_dense(g)} | {name: create_compact(g, a) for name, a in archs.items()}
    start = time.perf_counter()
    timings = time_models(
        models,
        (args.batch_size, g.in_chans, g.img_size, g.img_size),
        device=device,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    dense_ms = timings["dense"].median_ms
    dense_flops = cost.dense_cost(g, CONVENTION).macs
    rows = {
        "dense": {
            "timing": timings["dense"].as_dict(),
            "flops_exact": dense_flops,
            "params": cost.dense_cost(g, "exact").params,
        }
    }
    for name, a in archs.items():
        t = timings[name]
        speedup = dense_ms / t.median_ms
        ideal = dense_flops / cost.arch_cost(g, a, CONVENTION).macs
        rows[name] = {
            "timing": t.as_dict(),
            **_describe(g, a),
            "speedup": round(speedup, 4),
            "flops_speedup": round(ideal, 4),
            "efficiency": round(speedup / ideal, 4),
            "target_met": speedup / ideal >= 0.9,
        }
    return {
        "model": g.model,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


def _print(result: dict[str, object]) -> None:
    print(
        f"\n{result['model']} on {result['device']}, {result['threads']} thread(s), batch {result['batch_size']} "
        f"({result['seconds']} s)"
    )
    print(
        f"{'network':14s} {'FLOPs':>8s} {'ratio':>6s} {'median ms':>10s} {'img/s':>8s} {'speed-up':>9s} "
        f"{'by FLOPs':>9s} {'eff.':>6s}"
    )
    for name, r in result["rows"].items():  # type: ignore[union-attr]
        t = r["timing"]
        if name == "dense":
            print(
                f"{name:14s} {r['flops_exact'] / 1e9:7.3f}G {1:6.1%} {t['median_ms']:10.1f} "
                f"{t['images_per_s']:8.1f}"
            )
            continue
        print(
            f"{name:14s} {r['flops_exact'] / 1e9:7.3f}G {r['flops_ratio_exact']:6.1%} {t['median_ms']:10.1f} "
            f"{t['images_per_s']:8.1f} {r['speedup']:8.2f}x {r['flops_speedup']:8.2f}x {r['efficiency']:6.0%}"
        )


def _runs(args: argparse.Namespace) -> list[tuple[torch.device, int, int]]:
    """(device, CPU threads, batch size) of every measured configuration."""
    threads = args.threads or [torch.get_num_threads()]
    runs = [(torch.device("cpu"), t, b) for t in threads for b in args.batch_sizes]
    if torch.cuda.is_available():
        runs.append((torch.device("cuda"), torch.get_num_threads(), args.gpu_batch_size))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="CPU batch sizes to measure")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--gpu-batch-size", type=int, default=64)
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[], help="CPU thread counts to measure (default: torch's)"
    )
    args = ap.parse_args()
    results = []
    for device, threads, batch_size in _runs(args):
        torch.set_num_threads(threads)
        repeats = rounds_for(args.repeats, batch_size)
        run = argparse.Namespace(**{**vars(args), "batch_size": batch_size, "repeats": repeats})
        for key in args.models:
            r = bench_model(key, device, run)
            r.update(batch_size=batch_size, threads=threads, repeats=repeats)
            _print(r)
            results.append(r)
    out = {
        "benchmark": "frozen_speed",
        "machine": machine(),
        "convention": CONVENTION,
        "target_efficiency": 0.9,
        "repeats": args.repeats,  # at batch 8 and above; smaller batches time more (each run records its own)
        "warmup": args.warmup,
        "results": results,
    }
    write_text(result_path("frozen_speed"), json.dumps(out, indent=1) + "\n")
    print("written", result_path("frozen_speed"))


if __name__ == "__main__":
    main()
