"""Search stage — the strategy protocol: what a method receives, what the loop calls, what it must return.

A strategy is a plug-in registered under a name of :data:`spvit_dsl.compile.strategies.STRATEGIES`. Its kind says
how the loop drives it:

* ``train`` (spvit, ofb) — trains a masked supernet: per step :meth:`Strategy.before_step`, then the forward of the
  supernet (inside which :meth:`Strategy.draw` sets the masks and ops), the task loss plus
  :meth:`Strategy.extra_loss`, one backward, :meth:`Strategy.step`, :meth:`Strategy.after_step`, and
  :meth:`Strategy.shrinks` (groups to cut physically now: the loop slices the tensors and optimizer states);
* ``score`` (upvit) — scores units with data and trains nothing: :meth:`Strategy.score` on proxy batches, no
  gradients;
* ``data_free`` (magnitude, random, dimap) — reads no data at all.

Every kind ends with :meth:`Strategy.finalize`, which returns :class:`Decisions` at or under every budget (the
projection in :mod:`.budget` is the shared tool). The loop owns everything that is not the method: data, DDP, mixed
precision, checkpoints (the strategy's :meth:`Strategy.module` tensors, its optimizers and its JSON
:meth:`Strategy.state_dict` included), resume, metrics, progress, the frozen spec and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .._registry import Registry
from ..compile.program import Program
from ..compile.strategies import SettingValue
from ..runtime.data import Data
from ..space.cost import Counts
from ..space.plan import Convention, FrozenArch
from ..supernet import Supernet
from .budget import Target

__all__ = [
    "IMPLEMENTATIONS",
    "Batch",
    "Decisions",
    "JSON",
    "SearchContext",
    "Shrink",
    "Strategy",
    "StrategyKind",
    "register_implementation",
]

StrategyKind = Literal["train", "score", "data_free"]
JSON = None | bool | int | float | str | list["JSON"] | dict[str, "JSON"]


@dataclass(frozen=True)
class Batch:
    """One batch: ``images`` (B, C, H, W) and ``targets`` — labels (B,) or soft targets (B, classes) after mixup."""

    images: Tensor
    targets: Tensor


@dataclass
class SearchContext:
    """What a strategy receives (typed: no ``Any`` at the plug-in boundary)."""

    program: Program  # space, graph, convention, budgets, checked spec
    net: Supernet  # on ``device``
    targets: list[Target]  # the budgets: metric, absolute limit (program convention), text
    settings: dict[str, SettingValue]  # the strategy's settings, spec values with command-line flags applied
    device: torch.device
    data: Data | None  # None for data-free strategies
    steps_per_epoch: int = 0
    total_steps: int = 0
    rank: int = 0
    world: int = 1

    @property
    def convention(self) -> Convention:
        return self.program.convention

    def price(self, arch: FrozenArch) -> dict[str, float]:
        """metric → the analytic cost of ``arch`` (program convention): ``flops`` (multiply-adds), ``params``, and
        with a latency budget ``latency`` (milliseconds predicted by the device's table)."""
        c = self.program.graph.cost(arch, self.convention)
        out = {"flops": float(c.macs), "params": float(c.params)}
        for t in self.targets:
            if t.table is not None:
                out["latency"] = float(t.table.arch_ms(self.program.space.geometry, arch))
        return out

    def expected_cost(self, counts: Counts, target: Target) -> Tensor:
        """The differentiable cost of (expected) ``counts`` on ``target``'s metric, a float64 tensor: the analytic
        model for FLOPs and parameters, the latency table's piecewise-linear prediction for latency."""
        if target.table is None:
            return self.net.cost(counts, self.convention, target.field)
        value = target.table.counts_ms(self.net.geometry, counts)
        if isinstance(value, Tensor):
            return value.to(torch.float64)
        return torch.tensor(float(value), dtype=torch.float64)


@dataclass
class Decisions:
    """What a strategy returns: the point, and the kept units of every group it keeps below its size (group path →
    ordered indices for channels, heads and neurons, where unit ``kept[k]`` becomes the compact unit ``k``; a bool
    mask of the weight's shape for ``weights`` groups)."""

    arch: FrozenArch
    kept: dict[str, Tensor]
    info: dict[str, JSON] = field(default_factory=dict)  # e.g. projection statistics, for the report


@dataclass(frozen=True)
class Shrink:
    """A group to cut physically: ``keep`` indexes the group's current units (see :meth:`Supernet.shrink`)."""

    path: str
    keep: Tensor


class Strategy:
    """Base class of strategy implementations; subclasses set ``name`` and ``kind`` and override what they need."""

    name: ClassVar[str] = ""
    kind: ClassVar[StrategyKind] = "train"

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    # --- state the loop checkpoints ------------------------------------------------------------------------

    def module(self) -> nn.Module | None:
        """Tensors the strategy owns (gate logits, importance scores): trained with the weights when parameters
        (wrapped by DDP with the supernet), checkpointed under ``strategy/``, restored before resume."""
        return None

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers; the loop zeroes their gradients each step and checkpoints their state."""
        return {}

    def generator(self) -> torch.Generator | None:
        """The generator the strategy draws random masks from (checkpointed, so a resume draws the same)."""
        return None

    def state_dict(self) -> dict[str, JSON]:
        """JSON state (schedules, counters) for the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        """Inverse of :meth:`state_dict`. On resume the loop calls it after re-applying the supernet's shrinks and
        *before* loading :meth:`module`'s tensors and the optimizers' states, so a strategy whose tensors follow
        shrunk groups (OFB) can bring them to the checkpoint's shapes here."""

    # --- train kind ----------------------------------------------------------------------------------------

    def draw(self, training: bool) -> None:
        """Set the supernet's masks and ops for the next forward (called inside the forward, so under DDP too)."""

    def before_step(self, epoch: float) -> None:
        """Schedules: called before each forward with the fractional epoch."""

    def extra_loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        """A term added to the task loss (a budget term, distillation, masked-image modelling...)."""
        return None

    def step(self) -> None:
        """After the backward: step the optimizers (default: all of them)."""
        for opt in self.optimizers().values():
            opt.step()

    def after_step(self) -> None:
        """After the optimizer step (e.g. a schedule that follows the moved parameters)."""

    def shrinks(self) -> list[Shrink]:
        """Groups to cut physically now (after the step); the loop applies them to the supernet and optimizers."""
        return []

    def on_epoch_end(self, epoch: int) -> None:
        """After each epoch's validation."""

    def derived(self) -> FrozenArch:
        """The network the strategy would choose now, before any budget projection (logged every step)."""
        return self.ctx.program.space.largest()

    def costs(self) -> dict[str, float]:
        """metric → the cost of :meth:`derived` (override when the strategy already knows it)."""
        return self.ctx.price(self.derived())

    def metrics(self) -> dict[str, float]:
        """Numbers for the progress bar and metrics.jsonl (under ``strategy``), shown by name (SPViT: ``price``,
        ``target`` (OFB: ``lambda``, ``searching``, ``mim_ratio``)."""
        return {}

    def notices(self) -> list[str]:
        """One-line notes the user sees before the first step (even when quiet): settings that will defeat the
        search, said while there is still time to stop it (SPViT: a warm-up as long as the run)."""
        return []

    # --- score kind ----------------------------------------------------------------------------------------

    def proxy(self, data: Data) -> Dataset:
        """The images :meth:`score` is fed, in a fixed order (default: the training set)."""
        return data.train

    def score_batches(self) -> int:
        """How many proxy batches :meth:`score` needs (the loop iterates :meth:`proxy` in a fixed order)."""
        return 0

    def score(self, index: int, batch: Batch) -> None:
        """Score units on proxy batch ``index`` (no gradients; runs under ``torch.no_grad``)."""

    # --- every kind ----------------------------------------------------------------------------------------

    def finalize(self) -> Decisions:
        raise NotImplementedError(f"strategy '{self.name}' does not implement finalize()")


IMPLEMENTATIONS: Registry[type[Strategy]] = Registry("strategy implementation")


def register_implementation(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: register a strategy implementation under ``cls.name``."""
    IMPLEMENTATIONS.register(cls.name, cls)
    return cls
