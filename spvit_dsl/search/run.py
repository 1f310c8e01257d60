"""Search stage — the state of one run and its checkpoints (torch).

:class:`Run` holds everything a search changes as it goes (counters, the strategy, the DDP-wrapped trainee, the
metrics log); :func:`save` writes it to ``search.ckpt`` atomically and :func:`restore` reads it back for ``--resume``,
refusing a checkpoint of another spec text, other budgets or another seed, and re-applying the shrinks the supernet
had, so shapes match before the tensors are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..lang.errors import UsageError
from ..supernet._shrink import restore_shrunk
from .checkpoint import (
    Checkpoint,
    load_checkpoint,
    numpy_rng_extra,
    restore_rng,
    rng_state,
    save_checkpoint,
    spec_hash,
)
from .outputs import MetricsLog
from .progress import Reporter
from .protocol import SearchContext, Strategy

__all__ = ["Run", "Trainee", "barrier", "restore", "save", "wrap"]


class Trainee(nn.Module):
    """What the loop trains: the supernet and the strategy's own tensors in one module, so data-parallel training
    averages both; each forward first lets the strategy draw the masks and ops."""

    def __init__(self, ctx: SearchContext, strategy: Strategy) -> None:
        super().__init__()
        self.net = ctx.net
        self.strategy_tensors = strategy.module() or nn.Module()
        self.__dict__["strategy"] = strategy

    def forward(self, x: Tensor) -> Tensor:
        self.__dict__["strategy"].draw(self.training)
        return self.net(x)


def wrap(trainee: Trainee, device: torch.device, world: int) -> nn.Module:
    """The trainee under DDP when several processes train (only the chosen branches run, so the used parameters
    change from step to step: ``find_unused_parameters``)."""
    if world <= 1:
        return trainee
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    return DDP(
        trainee, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


@dataclass
class Run:
    """Mutable state of one search."""

    ctx: SearchContext
    strategy: Strategy
    trainee: Trainee
    model: nn.Module  # the trainee, or its DDP wrapper
    loss_fn: nn.Module | None
    paths: dict[str, str]
    settings: dict[str, Any]
    reporter: Reporter
    metrics: MetricsLog
    epoch: int = 0
    step: int = 0
    batch: int = 0  # batches done in the current epoch (train) or proxy batches scored (score)
    saved_any: bool = False
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, accuracy, steps of this epoch
    history: list[dict[str, Any]] = field(default_factory=list)


def _budgets(run: Run) -> list[dict[str, Any]]:
    return [{"metric": t.metric, "limit": t.limit, "text": t.text} for t in run.ctx.targets]


def checkpoint(run: Run, *, finished: bool = False, kept: dict[str, Tensor] | None = None) -> Checkpoint:
    """The whole state of ``run`` as a :class:`Checkpoint` (tensors on the CPU, JSON state)."""
    ctx, program = run.ctx, run.ctx.program
    state = {
        "epoch": run.epoch,
        "step": run.step,
        "batch": run.batch,
        "sums": run.sums,
        "finished": finished,
        "strategy": program.checked.search.strategy,
        "strategy_state": run.strategy.state_dict(),
        "settings": {k: run.settings[k] for k in sorted(run.settings)},
        "spec_hash": spec_hash(program.source),
        "budgets": _budgets(run),
        "history": run.history,
        "numpy_rng": numpy_rng_extra(),
        "world": ctx.world,
        "shrunk": {p: v.tolist() for p, v in ctx.net.kept_index.items()},
    }
    opts = {name: opt.state_dict() for name, opt in run.strategy.optimizers().items()}
    module = run.strategy.module()
    return Checkpoint(
        ctx.net.state_dict(),
        opts,
        rng_state(run.strategy.generator(), ctx.device),
        state,
        kept or {},
        dict(module.state_dict()) if module is not None else {},
        program.source,
        program.path,
    )


def save(run: Run, **kw: Any) -> None:
    """Flush the metrics of the steps the checkpoint covers (synced to disk), then checkpoint (rank 0 writes; every
    rank waits): a kill between the two leaves records past the last checkpoint, which a resume drops, and never
    a checkpoint whose records are lost."""
    if run.ctx.rank == 0:
        run.metrics.flush()
        save_checkpoint(run.paths["ckpt"], checkpoint(run, **kw))
    run.saved_any = True
    barrier(run.ctx)


RESUMABLE = frozenset(
    {"epochs", "steps", "workers"}
)  # settings a resume may change: how long, how many loaders


def restore(run: Run) -> None:
    """Load ``search.ckpt`` into ``run`` (``--resume``); a checkpoint of another search is a :class:`UsageError`."""
    ckpt = load_checkpoint(run.paths["ckpt"])
    ctx, state = run.ctx, ckpt.state
    if state.get("spec_hash") != spec_hash(ctx.program.source):
        raise UsageError(
            f"--resume: {run.paths['ckpt']} was written for a different spec text; "
            "start again without --resume or use another --out"
        )
    if state.get("budgets") != _budgets(run):
        raise UsageError(
            f"--resume: the checkpoint searched for other budgets ({_texts(state.get('budgets', []))}); "
            "resume with the same --budget or start again"
        )
    if int(state["settings"].get("seed", -1)) != run.settings["seed"]:
        raise UsageError(
            f"--resume: the checkpoint used seed {state['settings']['seed']}, not {run.settings['seed']}"
        )
    changed = [
        k
        for k, v in sorted(state["settings"].items())
        if k not in RESUMABLE and k in run.settings and run.settings[k] != v
    ]
    if changed:
        shown = ", ".join(f"{k} {state['settings'][k]!r} (now {run.settings[k]!r})" for k in changed)
        raise UsageError(
            f"--resume: the checkpoint was searched with {shown}; resume with the same settings (only --epochs, "
            "--steps and --workers may change) or start again with --force"
        )
    restore_shrunk(ctx.net, state.get("shrunk", {}), list(run.strategy.optimizers().values()))
    run.strategy.load_state_dict(state.get("strategy_state", {}))  # before its tensors: it may reshape them
    try:
        ctx.net.load_state_dict({k: v.to(ctx.device) for k, v in ckpt.net.items()}, strict=True)
        module = run.strategy.module()
        if module is not None:
            module.load_state_dict({k: v.to(ctx.device) for k, v in ckpt.strategy.items()}, strict=True)
    except RuntimeError as e:
        raise UsageError(
            f"--resume: {run.paths['ckpt']} does not match the supernet: {' '.join(str(e).split())[:200]}"
        ) from None
    for name, opt in run.strategy.optimizers().items():
        opt.load_state_dict(ckpt.optimizers[name])
    restore_rng(run.strategy.generator(), ckpt.rng, ctx.device, state.get("numpy_rng"))
    run.epoch, run.step, run.batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
    run.sums = [float(v) for v in state.get("sums", [0.0, 0.0, 0.0])]
    run.history = list(state.get("history", []))
    run.saved_any = True


def _texts(budgets: list[dict[str, Any]]) -> str:
    return ", ".join(f"{b['metric']} <= {b['text']}" for b in budgets) or "none"


def barrier(ctx: SearchContext) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.barrier()
