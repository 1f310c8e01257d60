"""The ``spvit`` strategy (search stage, torch): SPViT's joint search of weights and binary gates.

SPViT (He et al., TPAMI 2024, §4): weights and gates are updated together on the same batch by two AdamW optimizers;
the gates (:mod:`.spvit_gates`) choose each block's op along its single path and keep or drop FFN neurons. Ours
(docs/search.md): the gates learn from the task loss alone and the budget acts on their decision rule through one
price (:mod:`.spvit_price`), solved every step so that the derived network follows a schedule from the dense cost
down to the budget; :func:`~..budget.project` only rounds at the end.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...runtime.optim import adamw, param_groups
from ..budget import GroupSteps, project
from ..protocol import JSON, Batch, Decisions, SearchContext, Strategy, register_implementation
from .spvit_gates import FfnGate, OpGate, SpvitGates, decided, leading_ones
from .spvit_price import apply_price, gate_costs, reach_target, solve_price

if TYPE_CHECKING:
    from ...space.plan import FrozenArch

__all__ = ["SpvitStrategy"]


@register_implementation
class SpvitStrategy(Strategy):
    """SPViT with the budget met by a scheduled price on the gates' decisions, and a final projection."""

    name = "spvit"
    kind = "train"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        net = ctx.net
        self.gates = SpvitGates(net, float(s["gate_init"]), int(s["seed"]), float(s["gate_noise"]))
        self.opt_w = adamw(param_groups(net, float(s["weight_decay"])), lr=float(s["lr"]))
        gate_params = list(self.gates.parameters())
        self.opt_g = adamw(gate_params, lr=float(s["gate_lr"]), weight_decay=0.0) if gate_params else None
        self.warmup = float(s["warmup_epochs"])
        self.reach = float(s["budget_reach"])
        self.cost_weight = float(s["cost_weight"])
        self._gates_on = True
        # the schedule's length, fixed at the first start (a resume with more --epochs keeps it; --steps only stops)
        self.plan_epochs = (
            float(s["epochs"]) if s["epochs"] else ctx.total_steps / max(1, ctx.steps_per_epoch)
        )
        self._steps_done = 0
        self._price = 0.0
        self._target = 1.0
        self._costs: dict[str, float] = {}
        self._gate_costs = (
            gate_costs(self.gates, net, ctx.targets, ctx.price)
            if ctx.targets and self.gates.num_gates()
            else None
        )
        self._dense = float(self._gate_costs.full.max()) if self._gate_costs is not None else 1.0
        self._solve(self._dense)

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

    def notices(self) -> list[str]:
        start, planned = self._plan()
        if self._gate_costs is None or start < planned:
            return []
        return [
            f"note: the weight-only warm-up (warmup_epochs = {self.warmup:g}) is not shorter than the run "
            f"({self.plan_epochs:g} epoch{'' if self.plan_epochs == 1 else 's'}): the gates will never train, and "
            "the budget projection alone will cut the network to the budget at the end. Lower --warmup-epochs or "
            "raise --epochs (Ctrl-C stops now)."
        ]

    def _plan(self) -> tuple[int, int]:
        """(first gate-training step, planned steps), in optimizer steps."""
        spe = max(1, self.ctx.steps_per_epoch)
        return round(self.warmup * spe), max(1, round(self.plan_epochs * spe))

    def before_step(self, epoch: float) -> None:
        self._gates_on = epoch >= self.warmup
        self._steps_done = round(epoch * max(1, self.ctx.steps_per_epoch)) + 1  # counting this one
        self._solve(self._scheduled())

    def _scheduled(self) -> float:
        """The target ratio now: the dense ratio during the warm-up, then the schedule down to 1 (the budget)."""
        if not self._gates_on:
            return self._dense
        start, planned = self._plan()
        progress = min(1.0, max(0.0, (self._steps_done - start) / max(1, planned - start)))
        return reach_target(self._dense, progress, self.reach)

    def _solve(self, target: float) -> None:
        """Solve the price for ``target`` and set every gate's shift (a no-op without budgets or gates)."""
        self._target = target
        if self._gate_costs is None:
            return
        gates = self.gates.ordered()
        logits = torch.cat([g.logits.detach() for g in gates])
        solution = solve_price(logits, self._gate_costs, target)
        self._price = solution.price
        apply_price(gates, solution, self._gate_costs)
        # exact: costs add up in SPViT's space, and a latency's FFN gates are priced by rank (tests/test_spvit_price.py
        # and tests/test_latency.py check it against the cost model and the table)
        self._costs = {t.metric: r * t.limit for t, r in zip(self.ctx.targets, solution.ratios, strict=True)}

    def expected_costs(self) -> dict[str, Tensor]:
        """metric → the differentiable cost of the gates' counts (float64; value = the derived network's cost)."""
        counts = self.gates.counts(self.ctx.net)
        return {t.metric: self.ctx.expected_cost(counts, t) for t in self.ctx.targets}

    def extra_loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        """``cost_weight · Σ_k F_k / T_k`` on the differentiable cost of the gates' counts: it teaches each gate
        what it costs (an expensive gate needs more support from the task loss to stay on) while the price sets
        how much is cut; its value does not steer the level."""
        if not self.cost_weight or not self._gates_on or not self.ctx.targets:
            return None
        costs = self.expected_costs()
        return (
            self.cost_weight
            * torch.stack([costs[t.metric] / t.limit for t in self.ctx.targets]).sum().float()
        )

    def step(self) -> None:
        self.opt_w.step()
        if self.opt_g is not None and self._gates_on:
            self.opt_g.step()

    def derived(self) -> FrozenArch:
        """The network the gates select now: the price is re-solved for the logits as they are (the last step
        moved them), at the current target."""
        self._solve(self._target)
        return self.gates.derive(self.ctx.net)

    def costs(self) -> dict[str, float]:
        return dict(self._costs) if self._costs else super().costs()

    def metrics(self) -> dict[str, float]:
        """``price``: the controller's price τ (gate i is on when θ_i + δ_i > τ); ``target``: the ratio the
        schedule asks for now (1 = at the budget)."""
        return {"price": self._price, "target": self._target}

    def state_dict(self) -> dict[str, JSON]:
        return {"target": self._target, "plan_epochs": self.plan_epochs, "steps_done": self._steps_done}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        target = state.get("target", self._target)
        assert isinstance(target, float | int)
        self._target = float(target)
        plan = state.get("plan_epochs", self.plan_epochs)
        done = state.get("steps_done", 0)
        assert isinstance(plan, float | int) and isinstance(done, int)
        self.plan_epochs, self._steps_done = float(plan), done

    # --- the end of the search -----------------------------------------------------------------------------

    def _steps(self) -> tuple[list[GroupSteps], dict[str, list[Tensor]]]:
        """Every gate as a group of levels (score of a step = the logit of the gate it turns off) and, per FFN
        gate, the neurons each level adds (to read kept indices back from the projected levels)."""
        net, steps, neurons = self.ctx.net, [], {}
        for g in self.gates.ordered():
            group = net.groups[g.decision]
            logits = (g.logits.detach().double() - g.shift).cpu()
            if isinstance(g, OpGate):
                steps.append(GroupSteps(group, list(g.candidates), g.level(), logits.tolist()))
                continue
            assert isinstance(g, FfnGate)
            if g.nested:
                widths = list(g.choice.widths or ())
                level = leading_ones(decided(g).double().tolist())
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
        self._solve(self._target)  # the logits may have just been loaded (a resume of a finished training)
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
            "raised_msa": result.raised_msa,
        }
        if self._target > 1.0 + 1e-9 and self._gate_costs is not None:  # stopped before the schedule's end
            start, planned = self._plan()
            gate_steps = max(0, self._steps_done - start)
            info["schedule"] = {
                "steps": self._steps_done,
                "reach_step": start + math.ceil(self.reach * (planned - start)),
                "planned_steps": planned,
                "warmup_steps": start,
                "reach_that_fits": _two_digits_down(gate_steps / max(1, planned - start)),
            }
        return Decisions(result.arch, {k: v.cpu() for k, v in kept.items()}, info)


def _two_digits_down(x: float) -> float:
    """``x`` rounded down to two significant digits (0.0056 → 0.0056, 0.4567 → 0.45); 0 for x ≤ 0: the largest
    ``budget_reach`` a run that took this share of its planned gate-training steps would have met."""
    if x <= 0:
        return 0.0
    scale = 10.0 ** (1 - math.floor(math.log10(x)))
    return float(f"{math.floor(x * scale) / scale:.2g}")
