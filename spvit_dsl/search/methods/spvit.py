"""The ``spvit`` strategy (search stage, torch): SPViT's joint search of weights and binary gates.

SPViT (He et al., TPAMI 2024, §4): weights and gates updated together on the same batch by two AdamW optimizers; the
budget enforced by a Lagrange multiplier and a final repair (:mod:`spvit_dsl.search.budget`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..budget import DualAscent, RepairResult, nested_levels, repair
from ..protocol import Decisions, SearchContext, Strategy, register_implementation

__all__ = ["SpvitStrategy", "apply_repair", "weight_param_groups"]


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
