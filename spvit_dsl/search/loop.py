"""Search stage — the loop: a compiled :class:`~spvit_dsl.compile.program.Program` → a searched, frozen network.

Input: the program (space, budgets, search settings) and run options. Output: :class:`SearchResult` and, in the
output folder, ``<name>.frozen.vit``, ``search.ckpt``, ``metrics.jsonl`` and ``report.png``.

Steps (SPViT §4, He et al., TPAMI 2024):

1. resolve settings (arguments over the spec's values over defaults), refuse unsupported decisions, pick the device,
   join the process group under torchrun;
2. load the data (:mod:`.data`), lower the supernet (:func:`spvit_dsl.supernet.lower.lower`), build the strategy plug-in;
3. optionally restore ``search.ckpt`` (weights, gates, optimizers, multiplier, counters, random states);
4. train: every step one forward of the gated supernet (bf16 autocast on GPU; DDP across ranks with identical gate
   samples), task loss + the strategy's budget term, one backward, both optimizers; checkpoint every epoch
   atomically, and on Ctrl-C;
5. finalize: the strategy derives and repairs the architecture; write the frozen spec, checkpoint (with the kept
   masks), metrics and report (rank 0 only).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..lang.errors import UsageError
from ..runtime.data import Data, batches_per_epoch, load_data, make_loader
from ..space.plan import FrozenArch
from . import methods  # noqa: F401  (registers the strategies)
from .budget import targets_of
from .checkpoint import (
    Checkpoint,
    load_checkpoint,
    numpy_rng_extra,
    restore_rng,
    rng_state,
    save_checkpoint,
    spec_hash,
)
from .outputs import MetricsLog, achieved_costs, frozen_text, verify_frozen
from .progress import Reporter, RichReporter
from .protocol import IMPLEMENTATIONS, Decisions, SearchContext, Strategy
from .setup import (
    budget_text,
    check_searchable,
    cost_text,
    init_distributed,
    lower_supernet,
    out_dir_for,
    output_paths,
    pick_device,
    resolve_settings,
    world_info,
)

__all__ = ["SearchInterrupted", "SearchResult", "StepInfo", "run_search"]

_log = logging.getLogger(__name__)


class SearchInterrupted(UsageError):
    """Ctrl-C (or a test hook): the checkpoint was saved; ``--resume`` continues."""


@dataclass
class SearchResult:
    """What :func:`run_search` returns (paths are inside ``out_dir``; ``kept``: bool masks on the CPU)."""

    frozen_path: str
    frozen_text: str
    arch: FrozenArch
    kept: dict[str, Tensor]
    costs: dict[str, float]  # flops_paper, flops_exact, params
    budgets: list[dict[str, Any]]  # metric, limit (absolute), text, achieved, ratio
    out_dir: str
    checkpoint_path: str
    metrics_path: str
    report_path: str
    epochs: int  # completed epochs
    steps: int  # optimizer steps
    val_accuracy: float | None = None
    repair: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepInfo:
    """Handed to the ``callback`` after every optimizer step (tests use it to interrupt or corrupt a run)."""

    epoch: int
    step: int  # global optimizer steps done
    loss: float
    net: Any
    strategy: Strategy


@dataclass
class _Run:
    """Mutable state of one search."""

    ctx: SearchContext
    strategy: Strategy
    model: Any  # the supernet, or its DDP wrapper
    loss_fn: Any
    paths: dict[str, str]
    settings: dict[str, Any]
    reporter: Reporter
    metrics: MetricsLog
    epoch: int = 0
    step: int = 0
    batch: int = 0  # batches done in the current epoch
    saved_any: bool = False
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, accuracy, steps of this epoch
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(run: _Run, *, finished: bool = False, kept: dict[str, Tensor] | None = None) -> Checkpoint:
    ctx = run.ctx
    state = {
        "epoch": run.epoch,
        "step": run.step,
        "batch": run.batch,
        "sums": run.sums,
        "finished": finished,
        "strategy": ctx.program.checked.search.strategy,
        "strategy_state": run.strategy.state_dict(),
        "settings": {k: run.settings[k] for k in sorted(run.settings)},
        "spec_hash": spec_hash(ctx.program.source),
        "budgets": [{"metric": t.metric, "limit": t.limit, "text": t.text} for t in ctx.targets],
        "history": run.history,
        "numpy_rng": numpy_rng_extra(),
        "world": ctx.world,
    }
    opts = {name: opt.state_dict() for name, opt in run.strategy.optimizers().items()}
    return Checkpoint(ctx.net.state_dict(), opts, rng_state(ctx.net, ctx.device), state, kept or {})


def _save(run: _Run, **kw: Any) -> None:
    if run.ctx.rank == 0:
        save_checkpoint(run.paths["ckpt"], _checkpoint(run, **kw))
        run.metrics.flush()
    run.saved_any = True
    _barrier(run.ctx)


def _restore(run: _Run) -> None:
    ckpt = load_checkpoint(run.paths["ckpt"])
    ctx, state = run.ctx, ckpt.state
    if state.get("spec_hash") != spec_hash(ctx.program.source):
        raise UsageError(
            f"--resume: {run.paths['ckpt']} was written for a different spec text; "
            "start again without --resume or use another --out"
        )
    budgets = [{"metric": t.metric, "limit": t.limit, "text": t.text} for t in ctx.targets]
    if state.get("budgets") != budgets:
        raise UsageError(
            f"--resume: the checkpoint searched for other budgets ({_texts(state.get('budgets', []))}); "
            "resume with the same --budget or start again"
        )
    if int(state["settings"].get("seed", -1)) != run.settings["seed"]:
        raise UsageError(
            f"--resume: the checkpoint used seed {state['settings']['seed']}, not {run.settings['seed']}"
        )
    try:
        ctx.net.load_state_dict({k: v.to(ctx.device) for k, v in ckpt.net.items()}, strict=True)
    except RuntimeError as e:
        raise UsageError(
            f"--resume: {run.paths['ckpt']} does not match the supernet: {' '.join(str(e).split())[:200]}"
        ) from None
    for name, opt in run.strategy.optimizers().items():
        opt.load_state_dict(ckpt.optimizers[name])
    run.strategy.load_state_dict(state.get("strategy_state", {}))
    restore_rng(ctx.net, ckpt.rng, ctx.device, state.get("numpy_rng"))
    run.epoch, run.step, run.batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
    run.sums = [float(v) for v in state.get("sums", [0.0, 0.0, 0.0])]
    run.history = list(state.get("history", []))
    run.saved_any = True


def _texts(budgets: list[dict[str, Any]]) -> str:
    return ", ".join(f"{b['metric']} <= {b['text']}" for b in budgets) or "none"


def _barrier(ctx: SearchContext) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------- training
class _SigintFlag:
    """First Ctrl-C: stop after the current step (checkpoint saved); a second one interrupts at once."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> _SigintFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _accuracy(logits: Tensor, target: Tensor) -> Tensor:
    labels = target.argmax(-1) if target.ndim > 1 else target
    return (logits.argmax(-1) == labels).float().mean()


def _batches(loader: Any) -> Iterator[Any]:
    """Iterate a loader, turning data errors raised in worker processes into one-line UsageErrors."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UsageError as e:
            raise UsageError(_last_line(str(e))) from None
        yield batch


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    return (
        last.split(": ", 1)[1]
        if last.split(": ", 1)[0].endswith(("Error", "Image")) and ": " in last
        else last
    )


def _train_step(run: _Run, x: Tensor, y: Tensor, mixup: Any) -> tuple[float, float, dict[str, float]]:
    ctx, strategy = run.ctx, run.strategy
    x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
    if mixup is not None:
        x, y = mixup(x, y)
    strategy.before_step(run.epoch + run.batch / max(1, ctx.steps_per_epoch))
    for opt in strategy.optimizers().values():
        opt.zero_grad(set_to_none=True)
    with _autocast(ctx.device):
        logits = run.model(x)
        loss = run.loss_fn(logits.float(), y)
    costs = ctx.expected_costs()
    extra = strategy.extra_loss(costs)
    total = loss + extra if extra is not None else loss
    value = float(total.detach())
    if not math.isfinite(value):
        raise _NonFinite(value)
    total.backward()
    strategy.step()
    ratios = {t.metric: float(costs[t.metric].detach()) / t.limit for t in ctx.targets}
    strategy.after_step(ratios)
    return (
        float(loss.detach()),
        float(_accuracy(logits.detach(), y)),
        {m: float(c.detach()) for m, c in costs.items()},
    )


class _NonFinite(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(str(value))
        self.value = value


def _evaluate(run: _Run, data: Data) -> float | None:
    ctx = run.ctx
    loader = make_loader(
        data.val,
        run.settings["batch_size"],
        train=False,
        seed=0,
        rank=ctx.rank,
        world=ctx.world,
        workers=int(run.settings.get("workers", 0)),
        pin=ctx.device.type == "cuda",
    )
    ctx.net.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    with torch.no_grad(), _autocast(ctx.device):
        for x, y in _batches(loader):
            x, y = x.to(ctx.device), y.to(ctx.device)
            correct[0] += (ctx.net(x).argmax(-1) == y).sum()
            correct[1] += y.numel()
    ctx.net.train()
    if ctx.world > 1:
        dist.all_reduce(correct)
    return float(correct[0] / correct[1]) if correct[1] > 0 else None


def _reduce_mean(ctx: SearchContext, values: list[float]) -> list[float]:
    if ctx.world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world).tolist()


def _epoch_end(run: _Run, data: Data) -> None:
    """Validate, log the epoch, advance the counters."""
    ctx, sums = run.ctx, run.sums
    loss, acc = _reduce_mean(ctx, [sums[0] / max(1, sums[2]), sums[1] / max(1, sums[2])])
    val = _evaluate(run, data)
    costs = ctx.derived_costs()
    arch = ctx.net.derive()
    record = {
        "kind": "epoch",
        "epoch": run.epoch + 1,
        "step": run.step,
        "train_loss": loss,
        "train_acc": acc,
        "val_acc": val,
        "cost": {t.metric: costs[t.metric] for t in ctx.targets},
        "ratio": {t.metric: costs[t.metric] / t.limit for t in ctx.targets},
        "multiplier": run.strategy.metrics().get("multiplier", 0.0),
        "arch": [[b.op, b.ffn] for b in arch.blocks],
    }
    run.history.append({k: record[k] for k in ("epoch", "step", "val_acc", "cost", "ratio")})
    run.metrics.add(record)
    run.reporter.epoch(dict(record, cost_text=cost_text(costs, ctx.targets)))
    run.epoch += 1
    run.batch = 0
    run.sums = [0.0, 0.0, 0.0]


def _train(run: _Run, data: Data, callback: Callable[[StepInfo], None] | None, flag: _SigintFlag) -> None:
    ctx, s = run.ctx, run.settings
    epochs, max_steps = s["epochs"] or math.inf, s["steps"]  # --epochs 0: until --steps
    ctx.net.train()
    while run.epoch < epochs and not (max_steps and run.step >= max_steps):
        loader = make_loader(
            data.train,
            s["batch_size"],
            train=True,
            seed=s["seed"],
            epoch=run.epoch,
            skip_batches=run.batch,
            rank=ctx.rank,
            world=ctx.world,
            workers=int(s.get("workers", 0)),
            pin=ctx.device.type == "cuda",
        )
        for x, y in _batches(loader):
            loss, acc, costs = _train_step(run, x, y, data.mixup)
            run.step += 1
            run.batch += 1
            run.sums = [run.sums[0] + loss, run.sums[1] + acc, run.sums[2] + 1]
            _log_step(run, loss, acc, costs)
            if callback is not None:
                callback(StepInfo(run.epoch, run.step, loss, ctx.net, run.strategy))
            if flag.hit:
                raise KeyboardInterrupt
            if max_steps and run.step >= max_steps:
                break
        if run.batch >= ctx.steps_per_epoch:
            _epoch_end(run, data)
        _save(run)


def _log_step(run: _Run, loss: float, acc: float, costs: dict[str, float]) -> None:
    ctx = run.ctx
    mult = run.strategy.metrics().get("multiplier", 0.0)
    run.metrics.add(
        {
            "kind": "step",
            "epoch": run.epoch,
            "step": run.step,
            "loss": loss,
            "acc": acc,
            "cost": costs,
            "ratio": {t.metric: costs[t.metric] / t.limit for t in ctx.targets},
            "multiplier": mult,
        }
    )
    run.reporter.step(
        {
            "epoch": run.epoch + 1,
            "loss": loss,
            "acc": acc,
            "cost": cost_text(costs, ctx.targets),
            "multiplier": mult,
        }
    )


# --------------------------------------------------------------------------------------------- entry point
def run_search(
    program: Any,
    *,
    data: str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    out: str | None = None,
    resume: bool = False,
    seed: int | None = None,
    init_checkpoint: str | None = None,
    quiet: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
    reporter: Reporter | None = None,
) -> SearchResult:
    """Search ``program``'s space for its budgets and write the outputs (see the module docstring).

    Arguments override the spec's search settings. ``init_checkpoint``: a dense timm state-dict file to start from
    (overrides the spec's ``weights``). ``callback``: called after every step with a :class:`StepInfo`.
    """
    check_searchable(program)
    settings = resolve_settings(
        program, {"data": data, "epochs": epochs, "steps": steps, "batch_size": batch_size, "seed": seed}
    )
    rank, world, local_rank = world_info()
    dev = pick_device(device, local_rank)
    started = init_distributed(dev, world)
    try:
        return _run(
            program, settings, dev, rank, world, out, resume, init_checkpoint, quiet, callback, reporter
        )
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    program: Any,
    settings: dict[str, Any],
    dev: torch.device,
    rank: int,
    world: int,
    out: str | None,
    resume: bool,
    init_checkpoint: str | None,
    quiet: bool,
    callback: Any,
    reporter: Reporter | None,
) -> SearchResult:
    torch.manual_seed(settings["seed"])
    targets = targets_of(program.budgets)
    data = load_data(str(settings["data"]), program.space.geometry)
    net = lower_supernet(program, settings, init_checkpoint or program.checked.weights, dev)
    spe = batches_per_epoch(data.train, settings["batch_size"], world=world)
    if spe == 0:
        raise UsageError(f"the training set of '{settings['data']}' is empty")
    total = settings["epochs"] * spe if settings["epochs"] else settings["steps"]
    total = min(total, settings["steps"]) if settings["steps"] else total
    ctx = SearchContext(program, net, targets, settings, dev, data, spe, total, rank, world)
    strategy = IMPLEMENTATIONS.get(program.checked.search.strategy)(ctx)
    out_dir = out_dir_for(program, out)
    paths = output_paths(program, out_dir)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    rep = reporter if reporter is not None else (Reporter() if quiet or rank != 0 else RichReporter())
    run = _Run(
        ctx,
        strategy,
        _wrap(net, dev, world),
        data.loss(),
        paths,
        settings,
        rep,
        MetricsLog(paths["metrics"], enabled=rank == 0),
    )
    if resume:
        _restore(run)
    run.metrics.start(run.step if resume else None)
    return _search(run, data, callback)


def _wrap(net: Any, dev: torch.device, world: int) -> Any:
    if world <= 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    # only the sampled branch runs, so the set of used parameters changes from step to step
    return DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)


def _search(run: _Run, data: Data, callback: Any) -> SearchResult:
    ctx = run.ctx
    run.reporter.start(ctx.total_steps, min(run.step, ctx.total_steps), budget_text(ctx.targets))
    try:
        with _SigintFlag() as flag:
            _train(run, data, callback, flag)
    except KeyboardInterrupt:
        _save(run)
        run.reporter.stop()
        raise SearchInterrupted(
            f"interrupted at epoch {run.epoch + 1}, step {run.step}; checkpoint saved to "
            f"{run.paths['ckpt']} (continue with --resume)"
        ) from None
    except _NonFinite as e:
        run.reporter.stop()
        raise UsageError(
            f"the loss became {e.value} at step {run.step + 1} (learning rate too high? lr "
            f"{run.settings['lr']:g}, gate_lr {run.settings.get('gate_lr', 0):g}); " + _kept_text(run)
        ) from None
    except torch.OutOfMemoryError:
        run.reporter.stop()
        raise UsageError(
            f"out of memory on {ctx.device} at batch size {run.settings['batch_size']}: lower --batch-size; "
            + _kept_text(run)
        ) from None
    except UsageError:
        run.reporter.stop()
        raise
    run.reporter.stop()
    return _finish(run)


def _check_ranks_agree(ctx: SearchContext, arch: FrozenArch) -> None:
    """Every rank must derive the same network (identical gate samples and all-reduced gradients)."""
    if ctx.world <= 1:
        return
    seen: list[Any] = [None] * ctx.world
    dist.all_gather_object(seen, repr(arch))
    if len(set(seen)) != 1:
        raise RuntimeError("internal error: data-parallel ranks derived different architectures")


def _kept_text(run: _Run) -> str:
    if run.saved_any:
        return f"the last good checkpoint is kept at {run.paths['ckpt']}"
    return "no checkpoint was written yet"


def _finish(run: _Run) -> SearchResult:
    ctx = run.ctx
    decisions: Decisions = run.strategy.finalize()
    arch = decisions.arch
    _check_ranks_agree(ctx, arch)
    costs = achieved_costs(ctx.program, arch)
    facts = {
        "strategy": ctx.program.checked.search.strategy,
        "seed": run.settings["seed"],
        "epochs": run.epoch,
        "steps": run.step,
    }
    text = frozen_text(ctx.program, arch, facts)
    verify_frozen(text, run.paths["frozen"], ctx.targets, ctx.convention)
    analytic = ctx.program.graph.cost(arch, ctx.convention)
    budgets = []
    for t in ctx.targets:
        value = float(analytic.macs if t.metric == "flops" else analytic.params)
        budgets.append(
            {
                "metric": t.metric,
                "limit": t.limit,
                "text": t.text,
                "achieved": value,
                "ratio": value / t.limit,
            }
        )
    val = run.history[-1]["val_acc"] if run.history else None
    if ctx.rank == 0:
        from .._io import write_text
        from .report import write_report

        write_text(run.paths["frozen"], text)
        save_checkpoint(run.paths["ckpt"], _checkpoint(run, finished=True, kept=decisions.kept))
        run.metrics.flush()
        write_report(run.paths["report"], ctx.program, arch, decisions.kept, run.metrics.read(), ctx.targets)
    _barrier(ctx)
    return SearchResult(
        run.paths["frozen"],
        text,
        arch,
        decisions.kept,
        costs,
        budgets,
        run.paths["out"],
        run.paths["ckpt"],
        run.paths["metrics"],
        run.paths["report"],
        run.epoch,
        run.step,
        val,
        decisions.info,
    )
