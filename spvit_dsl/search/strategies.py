"""Search stage — strategy plug-ins: the registry of implementations keyed by the names of
:data:`spvit_dsl.strategies.STRATEGIES`, the :class:`Strategy` interface the loop drives, and SPViT's implementation.

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
from torch import Tensor, nn

from .._registry import Registry
from ..space import FrozenArch
from .budget import DualAscent, RepairResult, Target, nested_levels, repair

__all__ = [
    "IMPLEMENTATIONS",
    "Decisions",
    "SearchContext",
    "SpvitStrategy",
    "Strategy",
    "register_implementation",
]

_log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    """What a strategy receives."""

    program: Any  # spvit_dsl.compiler.Program (space, graph, convention, budgets, settings)
    net: Any  # spvit_dsl.nn.Supernet, on ``device``
    targets: list[Target]
    settings: dict[str, Any]  # common and strategy settings, flags applied
    device: torch.device
    data: Any  # spvit_dsl.search.data.Data
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
    """The interface the loop drives. Subclasses set ``name`` (a name in :data:`spvit_dsl.strategies.STRATEGIES`).

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


# --------------------------------------------------------------------------------------------- SPViT
def weight_param_groups(net: nn.Module, gate_ids: set[int], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on ≥2-D weights, none on 1-D parameters, biases and timm's no-decay tokens."""
    skip = set()
    model = getattr(net, "model", net)
    if hasattr(model, "no_weight_decay"):
        skip = {f"model.{n}" for n in model.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if id(p) in gate_ids or not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@register_implementation
class SpvitStrategy(Strategy):
    """SPViT with the budget as a constraint (dual ascent) and a final repair."""

    name = "spvit"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        net = ctx.net
        gates = net.gate_parameters()
        self.opt_w = torch.optim.AdamW(
            weight_param_groups(net, {id(p) for p in gates}, float(s["weight_decay"])), lr=float(s["lr"])
        )
        self.opt_g = torch.optim.AdamW(gates, lr=float(s["gate_lr"]), weight_decay=0.0) if gates else None
        self.dual = DualAscent(ctx.targets, float(s["dual_lr"]))
        self.warmup = float(s.get("warmup_epochs", 0.0))
        self._gates_on = True

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out: dict[str, torch.optim.Optimizer] = {"weights": self.opt_w}
        if self.opt_g is not None:
            out["gates"] = self.opt_g
        return out

    def before_step(self, epoch: float) -> None:
        self._gates_on = epoch >= self.warmup

    def extra_loss(self, costs: dict[str, Tensor]) -> Tensor | None:
        if not self._gates_on or not costs:
            return None
        terms = []
        for lam, t in zip(self.dual.values, self.ctx.targets, strict=True):
            gap = costs[t.metric] / t.limit - 1.0
            terms.append(lam * gap + 0.5 * self.dual.rho * gap * gap)
        return torch.stack(terms).sum().float()

    def step(self) -> None:
        self.opt_w.step()
        if self.opt_g is not None and self._gates_on:
            self.opt_g.step()

    def after_step(self, ratios: dict[str, float]) -> None:
        self._ratios = [ratios[t.metric] for t in self.ctx.targets]
        if self._gates_on:
            self.dual.update(self._ratios)

    def metrics(self) -> dict[str, float]:
        """``multiplier``: the effective multiplier of the binding budget (integral + proportional part)."""
        ratios = getattr(self, "_ratios", [1.0] * len(self.ctx.targets))
        eff = self.dual.effective(ratios)
        k = max(range(len(ratios)), key=lambda i: ratios[i]) if ratios else 0
        return {"multiplier": eff[k] if eff else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"dual": self.dual.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dual.load_state_dict(state["dual"])

    def finalize(self) -> Decisions:
        ctx = self.ctx
        before = ctx.derived_costs()
        result = repair(ctx.net.unit_table(ctx.convention), before, ctx.targets)
        trained = [p.detach().clone() for p in ctx.net.gate_parameters()]
        apply_repair(ctx.net, result)
        arch, kept = ctx.net.derive(), {k: v.detach().cpu() for k, v in ctx.net.kept_units().items()}
        with (
            torch.no_grad()
        ):  # the checkpoint keeps the trained logits, so a longer resumed search continues them
            for p, v in zip(ctx.net.gate_parameters(), trained, strict=True):
                p.copy_(v)
        info = {
            "derived_cost": before,
            "repaired_cost": result.cost,
            "removed": result.removed,
            "added": result.added,
        }
        return Decisions(arch, kept, info)


def apply_repair(net: Any, result: RepairResult) -> None:
    """Set the gate logits' signs to the repaired state (cumulative decisions: exactly their level's prefix)."""
    levels = nested_levels(result)
    with torch.no_grad():
        for name, gate in net.gates.items():
            logits = gate.logits.detach().cpu().tolist()
            nested = name in levels and (not hasattr(gate, "nested") or gate.nested)
            for j, v in enumerate(logits):
                want = j < levels[name] if nested else result.on.get((name, j), v > 0)
                if (v > 0) != want:
                    net.set_unit(name, j, want)
