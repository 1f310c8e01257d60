"""Search stage — the loops of ``train`` and ``score`` strategies (torch).

Training (SPViT §4; step 4 of :mod:`.loop`): every step one forward of the supernet (bf16 autocast on GPU; DDP
across ranks with identical masks), the task loss plus the strategy's extra loss, one backward, the strategy's
optimizers, then any physical shrinks it asks for (tensors and optimizer states sliced; DDP re-wrapped).
Validation and a checkpoint at the end of every epoch; Ctrl-C stops after the current step and saves first.

Scoring: the proxy batches a ``score`` strategy asks for, in a fixed order, without gradients; a checkpoint every
5% of the proxy batches, on Ctrl-C and at the end, so an interrupted scoring resumes where it stopped.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..lang.errors import UsageError
from ..runtime.data import Data, make_loader
from ..runtime.evaluate import autocast, evaluate
from ..supernet import Supernet
from .protocol import Batch, Strategy
from .run import Run, save, wrap
from .setup import cost_text

__all__ = ["NonFinite", "SigintFlag", "StepInfo", "score", "train", "train_step"]


@dataclass
class StepInfo:
    """Handed to the ``callback`` after every optimizer step (tests use it to interrupt or corrupt a run)."""

    epoch: int
    step: int  # global optimizer steps done
    loss: float
    net: Supernet
    strategy: Strategy


class NonFinite(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(str(value))
        self.value = value


class SigintFlag:
    """First Ctrl-C: stop after the current step (checkpoint saved); a second one interrupts at once."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> SigintFlag:
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


def _accuracy(logits: Tensor, target: Tensor) -> float:
    labels = target.argmax(-1) if target.ndim > 1 else target
    return float((logits.argmax(-1) == labels).float().mean())


def batches(loader: Any) -> Iterator[Any]:
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
    head, _, tail = last.partition(": ")
    return tail if tail and head.endswith(("Error", "Image")) else last


# --------------------------------------------------------------------------------------------- training
def train_step(run: Run, x: Tensor, y: Tensor, mixup: Any) -> tuple[float, float, dict[str, float]]:
    """One optimizer step of the run's strategy on a batch: (task loss, accuracy, derived costs)."""
    ctx, strategy = run.ctx, run.strategy
    x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
    if mixup is not None:
        x, y = mixup(x, y)
    strategy.before_step(run.epoch + run.batch / max(1, ctx.steps_per_epoch))
    for opt in strategy.optimizers().values():
        opt.zero_grad(set_to_none=True)
    with autocast(ctx.device, str(run.settings.get("precision", "auto"))):
        logits = run.model(x)
        assert run.loss_fn is not None
        loss = run.loss_fn(logits.float(), y)
    extra = strategy.extra_loss(Batch(x, y), logits)
    total = loss + extra if extra is not None else loss
    value = float(total.detach())
    if not math.isfinite(value):
        raise NonFinite(value)
    total.backward()
    strategy.step()
    strategy.after_step()
    _shrink(run)
    return float(loss.detach()), _accuracy(logits.detach(), y), strategy.costs()


def _shrink(run: Run) -> None:
    """Apply the strategy's physical shrinks; re-wrap DDP, whose buckets hold the old parameters."""
    cuts = run.strategy.shrinks()
    if not cuts:
        return
    for cut in cuts:
        run.ctx.net.shrink(cut.path, cut.keep, run.strategy.optimizers().values())
    run.model = wrap(run.trainee, run.ctx.device, run.ctx.world)


def _reduce_mean(run: Run, values: list[float]) -> list[float]:
    if run.ctx.world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=run.ctx.device)
    dist.all_reduce(t)
    return (t / run.ctx.world).tolist()


def _epoch_end(run: Run, data: Data) -> None:
    """Validate, log the epoch, advance the counters."""
    ctx, sums = run.ctx, run.sums
    loss, acc = _reduce_mean(run, [sums[0] / max(1, sums[2]), sums[1] / max(1, sums[2])])
    val = (
        evaluate(
            run.trainee,
            data.val,
            batch_size=int(run.settings["batch_size"]),
            device=ctx.device,
            rank=ctx.rank,
            world=ctx.world,
            workers=int(run.settings.get("workers", 0)),
            precision=str(run.settings.get("precision", "auto")),
        ).top1
        / 100.0
    )
    arch = run.strategy.derived()
    costs = ctx.price(arch)
    record = {
        "kind": "epoch",
        "epoch": run.epoch + 1,
        "step": run.step,
        "train_loss": loss,
        "train_acc": acc,
        "val_acc": val,
        "cost": {t.metric: costs[t.metric] for t in ctx.targets},
        "ratio": {t.metric: costs[t.metric] / t.limit for t in ctx.targets},
        "strategy": run.strategy.metrics(),
        "arch": [[b.op, b.ffn] for b in arch.blocks],
    }
    run.history.append({k: record[k] for k in ("epoch", "step", "val_acc", "cost", "ratio")})
    run.metrics.add(record)
    run.reporter.epoch(
        dict(record, cost_text=cost_text(costs, ctx.targets), shown=shown(run.strategy.metrics()))
    )
    run.strategy.on_epoch_end(run.epoch)
    run.epoch += 1
    run.batch = 0
    run.sums = [0.0, 0.0, 0.0]


def train(run: Run, data: Data, callback: Callable[[StepInfo], None] | None, flag: SigintFlag) -> None:
    """Train until ``epochs`` (or ``steps``) are done, checkpointing every epoch; Ctrl-C raises KeyboardInterrupt."""
    ctx, s = run.ctx, run.settings
    epochs, max_steps = s["epochs"] or math.inf, s["steps"]  # --epochs 0: until --steps
    run.trainee.train()
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
        for x, y in batches(loader):
            loss, acc, costs = train_step(run, x, y, data.mixup)
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
        save(run)


def _log_step(run: Run, loss: float, acc: float, costs: dict[str, float]) -> None:
    ctx = run.ctx
    numbers = run.strategy.metrics()
    ratio = {t.metric: costs[t.metric] / t.limit for t in ctx.targets}
    run.metrics.add(
        {
            "kind": "step",
            "epoch": run.epoch,
            "step": run.step,
            "loss": loss,
            "acc": acc,
            "cost": costs,
            "ratio": ratio,
            "strategy": numbers,
        }
    )
    run.reporter.step(
        {
            "epoch": run.epoch + 1,
            "loss": loss,
            "acc": acc,
            "cost": cost_text(costs, ctx.targets),
            "shown": shown(numbers),
        }
    )


def shown(m: dict[str, float]) -> str:
    """The strategy's numbers for the progress line, by name (SPViT: the controller's ``price`` and ``target``
    ratio; OFB: ``lambda`` of its bi-mask, the groups still searching, the MIM ratio)."""
    return "  ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in m.items())


# --------------------------------------------------------------------------------------------- scoring
def score(run: Run, data: Data, callback: Callable[[StepInfo], None] | None, flag: SigintFlag) -> None:
    """Feed the strategy its proxy batches (fixed order, no gradients), checkpointing every 5% of the proxy batches."""
    ctx, s = run.ctx, run.settings
    total = run.strategy.score_batches()
    loader = make_loader(
        run.strategy.proxy(data),
        s["batch_size"],
        train=False,
        seed=s["seed"],
        workers=int(s.get("workers", 0)),
    )
    run.trainee.eval()
    with torch.no_grad():
        for index, (x, y) in enumerate(batches(loader)):
            if index >= total:
                break
            if index < run.batch:
                continue
            run.strategy.score(index, Batch(x.to(ctx.device), y.to(ctx.device)))
            run.batch = index + 1
            run.step = run.batch
            shown = "  ".join(f"{k.replace('_', ' ')} {v:,.1f}" for k, v in run.strategy.metrics().items())
            run.reporter.step({"epoch": "score", "text": f"proxy batches scored  {shown}"})
            if callback is not None:
                callback(StepInfo(run.epoch, run.step, 0.0, ctx.net, run.strategy))
            if flag.hit:
                raise KeyboardInterrupt
            if run.batch % max(1, math.ceil(total / 20)) == 0:  # every 5% of the proxy set, and at Ctrl-C
                save(run)
    save(run)
