"""One search training step of the SPViT supernet against the same step of the dense timm model.

A step is forward + cross-entropy (+ the supernet's cost term) + backward + AdamW, on the same batch and device,
the two models interleaved step by step. Modes of the supernet:

* ``all_on``   — every gate logit at +8: the sampled ops are msa, the FFNs full, gates still straight-through;
* ``sampled``  — every gate logit at 0: each block samples skip/conv1x1/conv3x3/msa (P = 1/2, 1/4, 1/8, 1/8),
  each FFN neuron is kept with P = 1/2 (all neurons are still computed, as SPViT's search does).

Reported per model and mode: median step time of both and their ratio (also the ratio of the fastest steps and of
process CPU time, which a busy shared machine disturbs less), peak memory of both and their ratio.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the PyTorch profiler's allocator events
(``profile_memory=True``: the largest rise of "Total Allocated" during one step, i.e. the peak of what the step
allocates) plus the bytes alive before it (parameters, buffers, optimizer state, the batch) — the same quantity as CUDA's.

    python bench/supernet_step.py [--device cpu|cuda] [--batch 8] [--steps 5] [--models deit_small_patch16_224 ...]

Writes bench/results/supernet_step-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench._machine import machine, result_path  # noqa: E402
from spvit_dsl.space.backbones import resolve  # noqa: E402
from spvit_dsl.space.plan import BlockPlan, FfnChoice, Space  # noqa: E402
from spvit_dsl.supernet.lower import lower  # noqa: E402

OPS = ("skip", "conv1x1", "conv3x3", "msa")  # SPViT's official candidates
MODES = {"all_on": 8.0, "sampled": 0.0}


def spvit_space(model: str) -> Space:
    g = resolve(model)
    plans = tuple(BlockPlan(b, OPS, FfnChoice(group=1), (b.heads,), (b.head_dim,)) for b in g.blocks)
    return Space(g, plans, (g.embed_dim,))


def make_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cost: Callable[[], torch.Tensor] | None,
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if cost is not None:  # SPViT's two-sided cost term, F in GMACs
            loss = loss + 1.0 * (cost().float() / 1e9 - 3.0) ** 2
        loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def alive_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> int:
    tensors = list(model.parameters()) + list(model.buffers()) + [x]
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def peak_bytes(
    step: Callable[[], None],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    device: torch.device,
) -> int:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    before = alive_bytes(model, opt, x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return before
    # "Total Allocated" is the allocator reporter's running total since the process started profiling;
    # subtract its value just before the step's first allocation.
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return before + int(max(e["args"]["Total Allocated"] for e in mem) - start)


def build(model_name: str, mode: str | None, device: torch.device, x: torch.Tensor, y: torch.Tensor):
    """(step, model, optimizer) for the dense timm model (mode None) or the supernet in ``mode``."""
    torch.manual_seed(0)
    space = spvit_space(model_name)
    if mode is None:
        model = timm.create_model(model_name, pretrained=False, **space.geometry.kwargs()).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        return make_step(model, opt, x, y, None), model, opt
    net = lower(space, device=device).train()
    with torch.no_grad():
        for p in net.gate_parameters():
            p.fill_(MODES[mode])
    opt = torch.optim.AdamW(
        [
            {"params": net.weight_parameters(), "weight_decay": 0.05},
            {"params": net.gate_parameters(), "lr": 1e-3, "weight_decay": 0.0},
        ],
        lr=1e-4,
    )
    return make_step(net, opt, x, y, net.expected_cost), net, opt


def run_pair(model_name: str, mode: str, device: torch.device, batch: int, steps: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    dense_step, dense, dense_opt = build(model_name, None, device, x, y)
    net_step, net, net_opt = build(model_name, mode, device, x, y)
    for _ in range(2):  # warm-up: optimizer state, allocator, kernels
        dense_step(), net_step()
    t_dense, t_net, c_dense, c_net, ops = [], [], [], [], []
    for _ in range(steps):
        for step, wall, cpu in ((dense_step, t_dense, c_dense), (net_step, t_net, c_net)):
            w, c = timed(step, device)
            wall.append(w), cpu.append(c)
        ops.append([r.attn.op for r in net.rows])
    m_dense = peak_bytes(dense_step, dense, dense_opt, x, device)
    m_net = peak_bytes(net_step, net, net_opt, x, device)
    td, tn = statistics.median(t_dense), statistics.median(t_net)
    msa = sum(op == "msa" for step_ops in ops for op in step_ops) / max(1, sum(len(s) for s in ops))
    return {
        "model": model_name,
        "mode": mode,
        "device": str(device),
        "batch": batch,
        "steps": steps,
        "dense_s": td,
        "supernet_s": tn,
        "time_ratio": tn / td,
        "time_ratio_min": min(t_net) / min(t_dense),
        "cpu_time_ratio": statistics.median(c_net) / statistics.median(c_dense),
        "dense_peak_mb": m_dense / 2**20,
        "supernet_peak_mb": m_net / 2**20,
        "memory_ratio": m_net / m_dense,
        "msa_fraction": msa,
        "dense_times": t_dense,
        "supernet_times": t_net,
        "dense_cpu_times": c_dense,
        "supernet_cpu_times": c_net,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    args = ap.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (8 if device.type == "cpu" else 64)
    rows = []
    for model_name in args.models:
        for mode in args.modes:
            r = run_pair(model_name, mode, device, batch, args.steps)
            rows.append(r)
            print(
                f"{model_name:32s} {mode:8s} time {r['dense_s']:.3f}s -> {r['supernet_s']:.3f}s "
                f"(x{r['time_ratio']:.3f}, min x{r['time_ratio_min']:.3f}, cpu x{r['cpu_time_ratio']:.3f})  peak {r['dense_peak_mb']:.0f} -> {r['supernet_peak_mb']:.0f} MB "
                f"(x{r['memory_ratio']:.3f})  msa {r['msa_fraction']:.2f}",
                flush=True,
            )
    out = {
        "benchmark": "supernet_step",
        "machine": machine(),
        "results": rows,
        "targets": {"time_ratio_all_on": 1.15, "memory_ratio_all_on": 1.2},
    }
    path = result_path("supernet_step")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
