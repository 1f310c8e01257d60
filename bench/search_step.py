"""Benchmark: search-step throughput (images/s) against dense training throughput, same device, side by side.

A search step is the loop's own step (the gated supernet's forward, task loss + cost term, backward, weight and gate
AdamW steps) with the gates **held fixed** (gate learning rate 0, the price not re-solved), so every timed step
trains the same network, the derived network at the dense start; a dense step is timm's model with one AdamW. Synthetic data, bf16 autocast on GPU.
CPU default: examples/digits_tiny.vit. With CUDA: DeiT-S and Swin-S (specs/deit_s.vit, specs/swin_s.vit, random
init). Writes bench/results/search_step-<host>.json naming the machine.

    .venv/bin/python bench/search_step.py [--device auto|cpu|cuda] [--steps 10] [--warmup 3] [--batch-size N]
                                          [--spec PATH ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._machine import machine, result_path  # noqa: E402
from spvit_dsl.compile.program import compile_file  # noqa: E402
from spvit_dsl.runtime.evaluate import autocast  # noqa: E402
from spvit_dsl.runtime.optim import adamw  # noqa: E402
from spvit_dsl.search.budget import targets_of  # noqa: E402
from spvit_dsl.search.methods.spvit import SpvitStrategy  # noqa: E402
from spvit_dsl.search.outputs import MetricsLog  # noqa: E402
from spvit_dsl.search.progress import Reporter  # noqa: E402
from spvit_dsl.search.protocol import SearchContext  # noqa: E402
from spvit_dsl.search.run import Run, Trainee  # noqa: E402
from spvit_dsl.search.train import train_step  # noqa: E402
from spvit_dsl.supernet._timm import create_backbone  # noqa: E402
from spvit_dsl.supernet.lower import lower  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Any, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


def _batch(program: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = program.space.geometry
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, g.in_chans, g.img_size, g.img_size, generator=gen).to(device)
    y = torch.randint(g.num_classes, (batch,), generator=gen).to(device)
    return x, y


def dense_step(program: Any, batch: int, device: torch.device) -> Any:
    model = create_backbone(program.space.geometry, "none", device).train()
    opt = adamw(model.parameters(), lr=1e-4, weight_decay=0.05)
    x, y = _batch(program, batch, device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


def search_step(program: Any, batch: int, device: torch.device) -> Any:
    settings = dict(program.checked.search.values, batch_size=batch)
    net = lower(program.space, weights="none", convention=program.convention, seed=0, device=device)
    ctx = SearchContext(program, net, targets_of(program.budgets), settings, device, None, 1, 1)
    strategy = SpvitStrategy(ctx)
    # gates held fixed while timing: no gate updates and no re-solved price, so every timed step trains the same
    # derived network (the dense start). With moving gates the network, and the ratio, drifted between runs.
    if strategy.opt_g is not None:
        for group in strategy.opt_g.param_groups:
            group["lr"] = 0.0
    strategy.before_step = lambda epoch: None  # type: ignore[method-assign]
    trainee = Trainee(ctx, strategy)
    loss = torch.nn.CrossEntropyLoss()
    run = Run(ctx, strategy, trainee, trainee, loss, {}, settings, Reporter(), MetricsLog("", enabled=False))
    x, y = _batch(program, batch, device)
    return lambda: train_step(run, x, y, None)


def bench_one(
    spec: str, batch: int, steps: int, warmup: int, device: torch.device, rounds: int = 3
) -> dict[str, Any]:
    program = compile_file(spec)
    out: dict[str, Any] = {
        "spec": os.path.relpath(spec, ROOT),
        "model": program.space.geometry.model,
        "image": program.space.geometry.img_size,
        "batch": batch,
        "steps": steps,
    }
    steppers = {}
    for name, make in (("dense", dense_step), ("search", search_step)):
        torch.manual_seed(0)
        steppers[name] = make(program, batch, device)
        _timed(steppers[name], 0, warmup, device)
        if device.type == "cuda":
            out[f"{name}_peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(device)
    # alternate the two in rounds and keep each one's best round: robust to other load on a shared machine
    best = {name: 0.0 for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            best[name] = max(best[name], batch * steps / _timed(step, steps, 0, device))
    for name, value in best.items():
        out[f"{name}_img_s"] = round(value, 2)
    out["rounds"] = rounds
    out["search_over_dense"] = round(out["search_img_s"] / out["dense_img_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternating timing rounds; the best of each is kept"
    )
    ap.add_argument("--batch-size", type=int, default=0, help="0: 64 on CPU, 128 on GPU")
    ap.add_argument(
        "--spec",
        action="append",
        help="specs to time (default: digits_tiny on CPU, DeiT-S and Swin-S on GPU)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    specs = args.spec or (
        [os.path.join(ROOT, "specs", s) for s in ("deit_s.vit", "swin_s.vit")]
        if use_cuda
        else [os.path.join(ROOT, "examples", "digits_tiny.vit")]
    )
    batch = args.batch_size or (128 if use_cuda else 64)
    results = [bench_one(s, batch, args.steps, args.warmup, device, args.rounds) for s in specs]
    report = {"benchmark": "search_step", "machine": machine(str(device)), "results": results}
    path = args.out or result_path("search_step")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    for r in results:
        print(
            f"{r['model']:<32} batch {r['batch']:>4}: dense {r['dense_img_s']:>9.1f} img/s   "
            f"search {r['search_img_s']:>9.1f} img/s   ratio {r['search_over_dense']:.2f}"
        )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
