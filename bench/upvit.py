"""UP-ViT benchmarks: scoring throughput of the batched ablations against one model per unit, and quality on digits.

* ``throughput`` — the same units (every embedding channel, the attention channels of two blocks, the FFN neurons
  of two blocks) of a tiny ViT scored on the same proxy images by (a) spvit-dsl's batched path
  (``UpvitStrategy.score``: per-sample masks, ``units_per_pass`` units per forward, blocks' inputs cached) and (b)
  the naive path of the official code: for every unit, a copy of the model with that unit removed, run over the
  proxy images. Units scored per second, side by side in one run (target ≥ 10× on CPU). Both give the same scores
  (checked here, ≤ 1e-6 relative).
* ``quality`` — per seed: train the dense ViT (digits, 40 epochs), then, from the same dense weights, the uniform
  target shape at 34% of the dense FLOPs (embedding 64 of 96, 2 regrouped heads of 4, FFN 192 of 384) chosen by
  ``upvit``, ``magnitude`` and ``random``, plus non-uniform ``upvit`` (ranges, the same FLOPs as a budget: our
  extension); each fine-tuned for the same epochs. Best validation top-1.

    python bench/upvit.py [--parts throughput quality] [--seeds 0 1 2] [--epochs 40] [--resume]

Writes bench/results/upvit-<host>.json (``quality`` also read by tests/test_upvit_quality.py, marked slow).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._cells import finished_cell, run_cell, summarise  # noqa: E402
from bench._machine import run_parts  # noqa: E402

BACKBONE = """backbone vit_tiny_patch16_224 {
  weights = none; image = 32; patch = 8; channels = 1; classes = 10
  embed_dim = 96; depth = 6; heads = 4
}
"""
TARGET = "embed: 64\nblocks all { heads: 2; head_dim: 24; ffn: width 192 }\n"
RANGES = "embed: 48..96 step 8\nblocks all { heads: 1..4; head_dim: 12..24 step 4; ffn: per neuron }\n"


def _spec(body: str, search: str, budget: str = "") -> str:
    return BACKBONE + body + (f"budget {{ {budget} }}\n" if budget else "") + search + "\n"


def throughput(proxy: int, per_pass: int, groups: tuple[str, ...]) -> dict[str, object]:
    import torch
    import torch.nn.functional as F

    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.runtime.data import load_data
    from spvit_dsl.search.budget import targets_of
    from spvit_dsl.search.methods.upvit import UpvitStrategy
    from spvit_dsl.search.protocol import Batch, SearchContext
    from spvit_dsl.supernet.lower import lower

    torch.manual_seed(0)
    program = compile_text(
        _spec(TARGET, f"search upvit {{ units_per_pass = {per_pass} }}"), "upvit_bench.vit"
    )
    net = lower(program.space).eval()
    with torch.no_grad():  # weights with real structure: random init at std 0.02 gives every unit a KL of ~0
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    data = load_data("digits", program.space.geometry)
    x = torch.stack([data.train[i][0] for i in range(proxy)])
    ctx = SearchContext(
        program,
        net,
        targets_of(program.budgets),
        dict(program.checked.search.values),
        torch.device("cpu"),
        data,
    )
    strategy = UpvitStrategy(ctx)
    strategy.units = {k: v for k, v in strategy.units.items() if k in groups}
    units = sum(strategy.scores.get_buffer(k).numel() for k in strategy.units)
    t0 = time.perf_counter()
    strategy.score(0, Batch(x, torch.zeros(proxy, dtype=torch.long)))
    batched_s = time.perf_counter() - t0
    batched = {k: strategy.scores.get_buffer(k).clone() for k in strategy.units}

    def naive_kl(model, teacher) -> float:  # noqa: ANN001
        with torch.no_grad():
            s = F.log_softmax(model(x).double(), -1)
        return float((teacher.exp() * (teacher - s)).sum())

    net.reset()
    net.board.clear()
    with torch.no_grad():
        teacher = F.log_softmax(net(x).double(), -1)
    naive: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for name, (what, block) in strategy.units.items():
        size = batched[name].numel()
        naive[name] = []
        for j in range(size):
            model = copy.deepcopy(net)  # one model per unit, as the official scoring scripts do
            mask = torch.ones(size)
            mask[j] = 0
            if what == "embed":
                model.board.set("embed", mask)
            elif what == "ffn":
                model.board.set(f"blocks.{block}.ffn", mask)
            else:
                model.set_probe(block, mask[None].expand(proxy, -1))
            naive[name].append(naive_kl(model, teacher))
    naive_s = time.perf_counter() - t0
    worst = max(
        float(
            (
                (batched[k] - torch.tensor(v, dtype=torch.float64)).abs() / batched[k].abs().clamp_min(1e-12)
            ).max()
        )
        for k, v in naive.items()
    )
    return {
        "groups": sorted(strategy.units),
        "units": units,
        "proxy_images": proxy,
        "units_per_pass": per_pass,
        "batched_units_per_s": round(units / batched_s, 1),
        "naive_units_per_s": round(units / naive_s, 1),
        "speedup": round(naive_s / batched_s, 2),
        "target_met": naive_s / batched_s >= 10,
        "max_relative_difference": worst,
        "threads": torch.get_num_threads(),
    }


def quality_seed(seed: int, epochs: int, out: str, resume: bool = False) -> dict[str, object]:
    """One seed's cells; ``resume``: reuse the dense network and every finished cell found under ``out``."""
    import torch

    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.train import recipe
    from spvit_dsl.train.finetune import FinetuneSettings

    torch.manual_seed(seed)
    out = os.path.join(out, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    target = compile_text(_spec(TARGET, "search upvit { }"), os.path.join(out, "target.vit"))
    flops = target.graph.cost(target.space.largest(), target.convention).macs
    dense_flops = target.bounds().macs.dense
    dense = recipe.train_dense(
        target,
        os.path.join(out, "dense"),
        FinetuneSettings(epochs=epochs, lr=2e-3, warmup_epochs=2, seed=seed),
        reuse=resume,
    )
    data = recipe.data_of(target)
    tune = FinetuneSettings(epochs=epochs, lr=1e-3, warmup_epochs=1, seed=seed)
    runs = {
        "upvit": _spec(TARGET, f"search upvit {{ seed = {seed} }}"),
        "magnitude": _spec(TARGET, f"search magnitude {{ seed = {seed} }}"),
        "random": _spec(TARGET, f"search random {{ seed = {seed} }}"),
        "upvit_nonuniform": _spec(
            RANGES, f"search upvit {{ seed = {seed} }}", f"flops <= {flops / 1e6:.6f}M"
        ),
    }
    rows: dict[str, object] = {"dense": {"top1": dense.metrics.top1, "flops": dense_flops}}
    for name, text in runs.items():
        done = finished_cell(out, name) if resume else None
        rows[name] = done or run_cell(text, out, name, init=dense.timm_state, seed=seed, tune=tune, data=data)
    return rows


def quality(seeds: list[int], epochs: int, out: str, resume: bool = False) -> dict[str, object]:
    per_seed = {s: quality_seed(s, epochs, out, resume) for s in seeds}
    summary = summarise(per_seed)
    return {"epochs": epochs, "seeds": seeds, "per_seed": per_seed, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["throughput", "quality"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--proxy", type=int, default=10, help="proxy images of the throughput part")
    ap.add_argument("--units-per-pass", type=int, default=64)
    ap.add_argument(
        "--groups",
        default="embed,attn_1,attn_4,ffn_1,ffn_4",
        help="the unit sets the throughput part scores (embed, attn_<block>, ffn_<block>)",
    )
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_upvit"))
    ap.add_argument(
        "--resume", action="store_true", help="quality: reuse the finished cells found under --out"
    )
    args = ap.parse_args()
    run_parts(
        "upvit",
        args.parts,
        {
            "throughput": lambda: throughput(args.proxy, args.units_per_pass, tuple(args.groups.split(","))),
            "quality": lambda: quality(args.seeds, args.epochs, args.out, args.resume),
        },
    )


if __name__ == "__main__":
    main()
