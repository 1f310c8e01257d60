"""The end-to-end recipe on a spec: dense reference → dense training → search → build → fine-tune → evaluate.

Used by ``make demo`` (examples/demo.py) and the quality benchmark (bench/quality.py); each step is one call to a
stage module, so the recipe stays a few straight lines. Torch is imported from here on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._io import write_atomic, write_text
from ..compact.build import build, load
from ..compile.freeze import freeze
from ..compile.program import Program
from ..lang.emit import emit
from ..runtime.data import Data, data_of_settings
from ..space.plan import BlockArch, FrozenArch
from .finetune import FinetuneSettings, Metrics, evaluate, finetune

Progress = Callable[[int, int, float], None] | None


@dataclass
class Trained:
    model: nn.Module
    spec_path: str  # the frozen .vit of the network
    metrics: Metrics  # best validation metrics
    timm_state: str | None = None  # a plain timm state dict (the dense network: the search's init_checkpoint)


def write_frozen(
    program: Program, arch: FrozenArch, path: str, header: dict[str, Any], *, budget: bool
) -> str:
    write_text(path, emit(freeze(program.checked, arch, header, budget=budget)))
    return path


def dense_spec(program: Program, out: str) -> str:
    """Write the frozen spec of ``program``'s dense network to ``out/dense.vit``; its path."""
    os.makedirs(out, exist_ok=True)
    return write_frozen(
        program,
        program.space.dense(),
        os.path.join(out, "dense.vit"),
        {"source": program.path, "strategy": "dense reference"},
        budget=False,
    )


def train_dense(
    program: Program,
    out: str,
    settings: FinetuneSettings,
    *,
    reuse: bool = True,
    progress: Progress = None,
    device: torch.device | str = "cpu",
) -> Trained:
    """Train the dense backbone of ``program`` from its spec weights; reuse ``out/best.safetensors`` if present."""
    spec = dense_spec(program, out)
    best, state = os.path.join(out, "best.safetensors"), os.path.join(out, "dense_timm.safetensors")
    data = data_of(program)
    if not (reuse and os.path.exists(best) and os.path.exists(state)):
        model = build(spec, weights=program.checked.weights)
        finetune(model, data, settings, out=out, progress=progress, device=device)
        tensors = {k: v.contiguous() for k, v in load(best).state_dict().items()}
        write_atomic(state, lambda tmp: save_file(tensors, tmp))
    model = load(best)
    return Trained(model, spec, evaluate(model, data.val, device=device), state)


def data_of(program: Program) -> Data:
    """The spec's data (a data-free strategy's spec names none: digits, the embedded default)."""
    return data_of_settings(program.checked.search.values, program.space.geometry)


def finetune_frozen(
    spec: str,
    weights: str,
    out: str,
    settings: FinetuneSettings,
    *,
    data: Data,
    masks: str | None = None,
    progress: Progress = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
) -> Trained:
    """Build ``spec`` from ``weights`` (a search checkpoint or a dense checkpoint) and fine-tune it (``resume``:
    continue from ``out/finetune.ckpt``)."""
    model = build(spec, weights=weights, masks=masks)
    result = finetune(model, data, settings, out=out, progress=progress, resume=resume, device=device)
    return Trained(load(result.best_path), spec, result.best)


def uniform_arch(program: Program, op: str) -> FrozenArch:
    """The same op and the same FFN width in every block, as wide as the binding FLOPs budget allows."""
    dense = program.space.dense()
    budget = min(b.absolute for b in program.budgets if b.metric == "flops")
    hidden = program.space.plans[0].geom.hidden
    best = None
    for width in range(hidden + 1):
        arch = FrozenArch(tuple(BlockArch(op, width, b.heads, b.head_dim) for b in dense.blocks), dense.embed)
        if program.graph.cost(arch, program.convention).macs > budget:
            break
        best = arch
    if best is None:
        raise ValueError(f"no uniform '{op}' network meets the budget")
    return best
