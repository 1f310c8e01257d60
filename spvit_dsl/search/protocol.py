"""Search stage — strategy plug-ins: the registry of implementations keyed by the names of
:data:`spvit_dsl.compile.strategies.STRATEGIES`, the :class:`Strategy` interface the loop drives, and SPViT's implementation.

Input (:class:`SearchContext`): the lowered supernet (its gates, unit table and differentiable cost), the budget
targets, the resolved settings, the data and the device. Output (:meth:`Strategy.finalize`): :class:`Decisions` —
the frozen architecture and the kept-unit masks, already repaired to the budget. The loop (:mod:`.loop`) owns
batches, mixed precision, DDP, checkpoints and metrics; a strategy owns its optimizers, extra loss terms and
schedules (docs/strategies.md explains how to add UP-ViT, OFB or DIMAP without touching the loop).

SPViT (He et al., TPAMI 2024, §4): weights and gates updated together on the same batch by two AdamW optimizers;
the budget enforced by a Lagrange multiplier and a final repair (:mod:`.budget`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._registry import Registry
from ..space.plan import FrozenArch
from .budget import Target

__all__ = [
    "IMPLEMENTATIONS",
    "Decisions",
    "SearchContext",
    "Strategy",
    "register_implementation",
]

_log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    """What a strategy receives."""

    program: Any  # spvit_dsl.compile.program.Program (space, graph, convention, budgets, settings)
    net: Any  # spvit_dsl.supernet.Supernet, on ``device``
    targets: list[Target]
    settings: dict[str, Any]  # common and strategy settings, flags applied
    device: torch.device
    data: Any  # spvit_dsl.runtime.data.Data
    steps_per_epoch: int
    total_steps: int
    rank: int = 0
    world: int = 1

    @property
    def convention(self) -> str:
        return self.program.convention  # type: ignore[no-any-return]

    def expected_costs(self) -> dict[str, Tensor]:
        """metric → differentiable expected cost F(gates) (float64; value = the derived network's cost)."""
        out = {}
        for t in self.targets:
            out[t.metric] = self.net.expected_cost(self.convention, t.field)
        return out

    def derived_costs(self) -> dict[str, float]:
        """metric → the analytic cost (program convention) of the network the gates derive now."""
        c = self.program.graph.cost(self.net.derive(), self.convention)
        return {"flops": float(c.macs), "params": float(c.params)}


@dataclass
class Decisions:
    """What a strategy returns: the architecture and the kept FFN neurons per block (bool masks)."""

    arch: FrozenArch
    kept: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. repair statistics, for the report


class Strategy:
    """The interface the loop drives. Subclasses set ``name`` (a name in :data:`spvit_dsl.compile.strategies.STRATEGIES`).

    Per step the loop calls: :meth:`before_step` → forward → :meth:`extra_loss` → backward → :meth:`step` →
    :meth:`after_step`; per epoch :meth:`on_epoch_end`; at the end :meth:`finalize`. :meth:`state_dict` (JSON) and
    :meth:`optimizers` (their state is saved by the loop) make the strategy resumable.
    """

    name: ClassVar[str] = ""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def before_step(self, epoch: float) -> None:
        """Schedules: called before each forward with the fractional epoch."""

    def extra_loss(self, costs: dict[str, Tensor]) -> Tensor | None:
        """A term added to the task loss (e.g. the budget term); ``costs`` from ``ctx.expected_costs()``."""
        return None

    def step(self) -> None:
        for opt in self.optimizers().values():
            opt.step()

    def after_step(self, ratios: dict[str, float]) -> None:
        """After the optimizer step; ``ratios``: metric → derived cost / budget."""

    def on_epoch_end(self, epoch: int) -> None:
        """After each epoch's checkpoint-worthy end."""

    def metrics(self) -> dict[str, float]:
        """Numbers for the progress bar and metrics.jsonl (e.g. the multiplier)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def finalize(self) -> Decisions:
        raise NotImplementedError


IMPLEMENTATIONS: Registry[Callable[[SearchContext], Strategy]] = Registry("strategy implementation")


def register_implementation(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: register a strategy implementation under ``cls.name``."""
    IMPLEMENTATIONS.register(cls.name, cls)
    return cls
