"""One search training step of the supernet against the same step of the dense timm model.

A step is forward + cross-entropy (+ a cost term) + backward + AdamW, on the same batch and device, the two models
interleaved step by step. Modes of the supernet:

* ``all_on``   — SPViT's space, every gate logit at +8: the sampled ops are msa, the FFNs full, gates still
  straight-through;
* ``sampled``  — SPViT's space, every gate logit at 0: each block samples skip/conv1x1/conv3x3/msa (P = 1/2, 1/4,
  1/8, 1/8), each FFN neuron is kept with P = 1/2 (all neurons are still computed, as SPViT's search does);
* ``every_mask`` — a space declaring every dimension, with every group's mask active: learned soft masks (values in
  [0.1, 1], gradients flowing to them, as a bi-mask strategy trains them) on the embedding channels, the heads, the
  per-head channels and the FFN neurons of every block, and a 0/1 sparsity mask on every qkv, proj, fc1 and fc2; the
  ops stay msa, so the dense work is the same and the ratio is the price of masking; the cost term is the
  differentiable cost of the masks' expected counts;
* ``every_mask_fixed`` — the same masks held constant (no gradient to them): what evaluating or fine-tuning a
  masked point costs.

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
from spvit_dsl.runtime.optim import adamw  # noqa: E402
from spvit_dsl.search.methods.spvit_gates import SpvitGates  # noqa: E402
from spvit_dsl.space.backbones import resolve  # noqa: E402
from spvit_dsl.space.cost import BlockCounts, Counts  # noqa: E402
from spvit_dsl.space.plan import BlockPlan, DensityChoice, FfnChoice, Space  # noqa: E402
from spvit_dsl.supernet import Supernet  # noqa: E402
from spvit_dsl.supernet.lower import lower  # noqa: E402

OPS = ("skip", "conv1x1", "conv3x3", "msa")  # SPViT's official candidates
MODES = {"all_on": 8.0, "sampled": 0.0, "every_mask": None, "every_mask_fixed": None}


def spvit_space(model: str) -> Space:
    g = resolve(model)
    plans = tuple(BlockPlan(b, OPS, FfnChoice(group=1), (b.heads,), (b.head_dim,)) for b in g.blocks)
    return Space(g, plans, tuple((d,) for d in g.dims))


def every_dimension_space(model: str) -> Space:
    g = resolve(model)
    d = (0.5, 1.0)
    plans = tuple(
        BlockPlan(b, ("msa",), FfnChoice(group=1), (1, b.heads), (1, b.head_dim), DensityChoice(d, d, d, d))
        for b in g.blocks
    )
    return Space(g, plans, tuple((1, w) for w in g.dims))


class EveryMask(torch.nn.Module):
    """Learned soft masks for every structured group and fixed 0/1 sparsity masks, set before each forward."""

    def __init__(self, net: Supernet) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net_ref = [net]
        self.logits = torch.nn.ParameterDict()
        self.paths: dict[str, str] = {}  # ParameterDict keys may not contain '.'
        self.sparse: dict[str, torch.Tensor] = {}
        dev = next(net.parameters()).device
        for path, g in net.groups.items():
            if g.structured:
                key = f"g{len(self.paths)}"
                self.paths[key] = path
                self.logits[key] = torch.nn.Parameter((torch.rand(g.size, generator=gen) * 4 - 1).to(dev))
            elif g.kind == "weights":
                w = net._layer_weight(g)
                self.sparse[path] = (torch.rand(w.shape, generator=gen) > 0.5).to(dev, w.dtype)

    def masks(self) -> dict[str, torch.Tensor]:
        soft = {self.paths[k]: 0.1 + 0.9 * torch.sigmoid(v) for k, v in self.logits.items()}
        return soft | self.sparse

    def counts(self, masks: dict[str, torch.Tensor]) -> Counts:
        """Expected kept counts: the sum of each structured group's mask (its size when unmasked)."""
        net = self.net_ref[0]

        def count(path: str) -> torch.Tensor | int:
            return masks[path].sum() if path in masks else net.size(path)

        embed = [count(g.path) for g in net.groups.values() if g.kind == "embed"]
        blocks = [
            BlockCounts(
                {"msa": 1},
                count(f"blocks.{r.index}.heads"),
                count(f"blocks.{r.index}.head_dim"),
                count(f"blocks.{r.index}.ffn"),
            )
            for r in net.rows
        ]
        return Counts(embed, blocks)


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
    space = (
        every_dimension_space(model_name)
        if mode and mode.startswith("every_mask")
        else spvit_space(model_name)
    )
    if mode is None:
        model = timm.create_model(model_name, pretrained=False, **space.geometry.kwargs()).to(device).train()
        opt = adamw(model.parameters(), lr=1e-4, weight_decay=0.05)
        return make_step(model, opt, x, y, None), model, opt
    net = lower(space, device=device).train()
    if mode in ("every_mask", "every_mask_fixed"):
        masker = EveryMask(net)
        masker.requires_grad_(mode == "every_mask")

        def forward(images: torch.Tensor) -> torch.Tensor:
            masks = masker.masks()
            net.set_masks(masks)
            forward.cost = net.cost(masker.counts(masks), "exact", "macs")  # type: ignore[attr-defined]
            return net(images)

        groups = [{"params": net.parameters(), "weight_decay": 0.05}]
        if mode == "every_mask":
            groups.append({"params": masker.parameters(), "lr": 1e-3})
        opt = adamw(groups, lr=1e-4)
        model = _Forward(net, masker, forward)
        return make_step(model, opt, x, y, lambda: forward.cost), model, opt  # type: ignore[attr-defined]
    gates = SpvitGates(net, gate_init=MODES[mode], seed=0)

    def forward_gated(images: torch.Tensor) -> torch.Tensor:
        gates.draw(net, training=True)
        return net(images)

    opt = adamw(
        [
            {"params": net.parameters(), "weight_decay": 0.05},
            {"params": gates.parameters(), "lr": 1e-3, "weight_decay": 0.0},
        ],
        lr=1e-4,
    )
    model = _Forward(net, gates, forward_gated)
    return make_step(model, opt, x, y, lambda: net.cost(gates.counts(net), "exact", "macs")), model, opt


class _Forward(torch.nn.Module):
    """The supernet and the strategy's tensors as one module whose forward draws the masks first."""

    def __init__(self, net: Supernet, extra: torch.nn.Module, fn) -> None:
        super().__init__()
        self.net, self.extra = net, extra
        self.__dict__["fn"] = fn

    @property
    def rows(self):
        return self.net.rows

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


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
        "targets": {
            "time_ratio_all_on": 1.15,
            "memory_ratio_all_on": 1.2,
            "time_ratio_every_mask": 1.10,
            "memory_ratio_every_mask": 1.10,
        },
    }
    path = result_path("supernet_step")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
