"""The ``spvit`` strategy (search stage, torch): SPViT's joint search of weights and binary gates.

SPViT (He et al., TPAMI 2024, §4): weights and gates are updated together on the same batch by two AdamW optimizers;
the gates (:mod:`.spvit_gates`) choose each block's op along its single path and keep or drop FFN neurons. Ours
(docs/search.md): the budget is a constraint enforced by a Lagrange multiplier (:class:`~..budget.DualAscent`) on
the differentiable cost of the gates' counts, and :func:`~..budget.project` makes the derived network meet every
budget exactly at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...runtime.optim import adamw, param_groups
from ..budget import DualAscent, GroupSteps, project
from ..protocol import JSON, Batch, Decisions, SearchContext, Strategy, register_implementation
from .spvit_gates import FfnGate, OpGate, SpvitGates, leading_ones

if TYPE_CHECKING:
    from ...space.plan import FrozenArch

__all__ = ["SpvitStrategy"]


@register_implementation
class SpvitStrategy(Strategy):
    """SPViT with the budget as a constraint (dual ascent) and a final projection."""

    name = "spvit"
    kind = "train"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        net = ctx.net
        self.gates = SpvitGates(net, float(s["gate_init"]), int(s["seed"]))
        self.opt_w = adamw(param_groups(net, float(s["weight_decay"])), lr=float(s["lr"]))
        gate_params = list(self.gates.parameters())
        self.opt_g = adamw(gate_params, lr=float(s["gate_lr"]), weight_decay=0.0) if gate_params else None
        self.dual = DualAscent(ctx.targets, float(s["dual_lr"]))
        self.warmup = float(s["warmup_epochs"])
        self._gates_on = True
        self._costs: dict[str, float] = {}

    def module(self) -> nn.Module:
        return self.gates

    def generator(self) -> torch.Generator | None:
        return self.gates.sample_generator

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out: dict[str, torch.optim.Optimizer] = {"weights": self.opt_w}
        if self.opt_g is not None:
            out["gates"] = self.opt_g
        return out

    def draw(self, training: bool) -> None:
        self.gates.draw(self.ctx.net, training)

    def before_step(self, epoch: float) -> None:
        self._gates_on = epoch >= self.warmup

    def expected_costs(self) -> dict[str, Tensor]:
        """metric → the differentiable cost of the gates' counts (float64; value = the derived network's cost)."""
        counts = self.gates.counts(self.ctx.net)
        return {t.metric: self.ctx.net.cost(counts, self.ctx.convention, t.field) for t in self.ctx.targets}

    def extra_loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        costs = self.expected_costs()
        self._costs = {m: float(c.detach()) for m, c in costs.items()}
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

    def after_step(self) -> None:
        if self._gates_on and self._costs:
            self.dual.update(self._ratios())

    def _ratios(self) -> list[float]:
        return [self._costs[t.metric] / t.limit for t in self.ctx.targets]

    def derived(self) -> FrozenArch:
        return self.gates.derive(self.ctx.net)

    def costs(self) -> dict[str, float]:
        return dict(self._costs) if self._costs else super().costs()

    def metrics(self) -> dict[str, float]:
        """``multiplier``: the effective multiplier of the binding budget (integral + proportional part)."""
        ratios = self._ratios() if self._costs else [1.0] * len(self.ctx.targets)
        eff = self.dual.effective(ratios)
        k = max(range(len(ratios)), key=lambda i: ratios[i]) if ratios else 0
        return {"multiplier": eff[k] if eff else 0.0}

    def state_dict(self) -> dict[str, JSON]:
        return {"dual": self.dual.state_dict()}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        dual = state["dual"]
        assert isinstance(dual, dict)
        self.dual.load_state_dict(dual)

    # --- the end of the search -----------------------------------------------------------------------------

    def _steps(self) -> tuple[list[GroupSteps], dict[str, list[Tensor]]]:
        """Every gate as a group of levels (score of a step = the logit of the gate it turns off) and, per FFN
        gate, the neurons each level adds (to read kept indices back from the projected levels)."""
        net, steps, neurons = self.ctx.net, [], {}
        for g in self.gates.ordered():
            group = net.groups[g.decision]
            logits = g.logits.detach().cpu().double()
            if isinstance(g, OpGate):
                steps.append(GroupSteps(group, list(g.candidates), g.level(), logits.tolist()))
                continue
            assert isinstance(g, FfnGate)
            if g.nested:
                widths = list(g.choice.widths or ())
                level = leading_ones((logits > 0).double().tolist())
                adds = [torch.nonzero(g.group_of.cpu() == k).flatten() for k in range(len(widths))]
                steps.append(GroupSteps(group, widths, level, logits.tolist()))
            else:
                order = torch.sort(logits, descending=True, stable=True).indices
                adds = [torch.nonzero(g.group_of.cpu() == int(k)).flatten() for k in order]
                values = [0] + torch.cumsum(torch.tensor([a.numel() for a in adds]), 0).tolist()
                level = int((logits > 0).sum())
                steps.append(GroupSteps(group, values, level, logits[order].tolist()))
                adds = [torch.zeros(0, dtype=torch.long), *adds]
            neurons[g.decision] = adds
        return steps, neurons

    def finalize(self) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        derived = self.derived()
        steps, neurons = self._steps()
        result = project(net.geometry, derived, steps, ctx.targets, ctx.convention)
        kept = {
            path: torch.sort(torch.cat(adds[: result.levels[path] + 1])).values
            for path, adds in neurons.items()
            if sum(a.numel() for a in adds[: result.levels[path] + 1]) < net.size(path)
        }
        kept = net.kept_for(result.arch, kept)
        info: dict[str, JSON] = {
            "derived_cost": dict(ctx.price(derived)),
            "projected_cost": dict(result.cost),
            "removed": result.removed,
            "added": result.added,
        }
        return Decisions(result.arch, {k: v.cpu() for k, v in kept.items()}, info)
