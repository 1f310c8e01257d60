"""The search-strategy registry (pure Python): names, hyperparameters and supported decisions.

A user names a strategy in ``search NAME { ... }``; the checker validates its settings from this table without
importing torch. The implementation (a plug-in receiving the supernet's unit groups, the cost model, data and
the budget) is looked up by the same name in :mod:`spvit_dsl.search` (see docs/strategies.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._registry import Registry


@dataclass(frozen=True)
class Param:
    type: type  # int, float, str or bool
    default: object
    doc: str


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    doc: str
    decisions: frozenset[str]  # decision kinds it can search: attention, ffn, heads, head_dim, density, embed
    params: dict[str, Param] = field(default_factory=dict)


STRATEGIES: Registry[StrategyInfo] = Registry("strategy")

# Settings every strategy understands (the search loop's own knobs).
COMMON: dict[str, Param] = {
    "data": Param(str, "digits", "digits | synthetic | a folder with train/ and val/ class folders"),
    "epochs": Param(int, 10, "passes over the training data"),
    "steps": Param(int, 0, "stop after this many optimizer steps (0: no limit)"),
    "batch_size": Param(int, 64, "images per step (per process under torchrun)"),
    "seed": Param(int, 0, "seed of data order, gate noise and init"),
    "lr": Param(float, 1e-4, "AdamW learning rate of the weights"),
    "weight_decay": Param(float, 0.05, "AdamW weight decay of the weights (none on 1-D params and biases)"),
    "workers": Param(int, 0, "data-loader worker processes"),
}


def register_strategy(info: StrategyInfo) -> StrategyInfo:
    return STRATEGIES.register(info.name, info)


register_strategy(
    StrategyInfo(
        name="spvit",
        doc="SPViT: single-path MSA/conv weight sharing, binary gates on ops and FFN units (He et al., 2024)",
        decisions=frozenset({"attention", "ffn"}),
        params={
            "gate_lr": Param(float, 1e-3, "AdamW learning rate of the gate logits (no weight decay)"),
            "gate_init": Param(float, 1.5, "initial gate logit (sigmoid(1.5) ~ 0.82)"),
            "alpha": Param(
                float, 0.0, "softmax temperature of the head-mixing matrix (0: 1e-2 ViT, 1e2 Swin)"
            ),
            "dual_lr": Param(float, 0.05, "step of the Lagrange multiplier enforcing the budget"),
            "warmup_epochs": Param(float, 0.0, "epochs of weight-only training before the gates learn"),
        },
    )
)
