"""Search stage — setup: settings, output paths and the lowered supernet of one search.

Helpers of :mod:`spvit_dsl.search.loop` (steps 1–2 of its procedure), kept apart so the loop reads as a procedure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..compile.check import setting_value
from ..compile.program import Program, unsearchable
from ..compile.strategies import STRATEGIES, with_data
from ..lang.errors import SpecError, UsageError
from ..lang.parse import parse
from ..space.groups import groups
from ..space.units import fmt_metric
from ..supernet import Supernet
from ..supernet.lower import lower
from .budget import Target
from .protocol import IMPLEMENTATIONS, SettingValue

__all__ = [
    "budget_text",
    "check_searchable",
    "cost_text",
    "lower_supernet",
    "out_dir_for",
    "output_paths",
    "resolve_settings",
]


def parse_setting(program: Program, text: str, flag: str = "--set") -> tuple[str, SettingValue]:
    """``KEY=VALUE`` from the command line → a validated strategy setting, checked exactly as the spec's ``search``
    block checks it (type, range, choices, did-you-mean). UsageError: one line naming the flag."""
    key, sep, value = text.partition("=")
    key, value = key.strip().replace("-", "_"), value.strip()
    if not sep or not key or not value:
        raise UsageError(f"{flag} {text}: expected KEY=VALUE (e.g. lr=1e-3)")
    info = STRATEGIES.get(program.checked.search.strategy)
    try:
        spec = parse(f"search {info.name} {{ {key} = {value} }}", flag)
        search = spec.first("search")
        assert search is not None and len(search.settings) == 1
        return key, setting_value(search.settings[0], info)
    except SpecError as e:
        hint = f" ({e.hint})" if e.hint else ""
        shown = text if flag == "--set" else value  # `--lr nan`, `--set arch_lr=0.1`
        raise UsageError(f"{flag} {shown}: {e.message}{hint}") from None


def resolve_settings(
    program: Program, overrides: Mapping[str, SettingValue | None]
) -> dict[str, SettingValue]:
    """The spec's search settings with command-line ``overrides`` applied (None: not given); a flag the strategy's
    kind does not use is a :class:`UsageError` (e.g. ``--epochs`` for a data-free strategy)."""
    info = STRATEGIES.get(program.checked.search.strategy)
    accepted = info.settings()
    data = overrides.get("data")
    values = with_data(
        program.checked.search.values, str(data) if data is not None and "data" in accepted else None
    )
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in accepted:
            raise UsageError(
                f"--{key.replace('_', '-')} does not apply to strategy '{info.name}' ({info.kind.replace('_', '-')}: "
                f"its settings are {', '.join(sorted(accepted))})"
            )
        values[key] = value
    pair = info.misordered(values)
    if pair is not None:
        raise UsageError(f"'{pair[0]}' ({values[pair[0]]}) must not exceed '{pair[1]}' ({values[pair[1]]})")
    for key in ("epochs", "steps", "batch_size", "seed"):
        if key in values:
            values[key] = int(values[key])
    if "batch_size" in values and int(values["batch_size"]) < 1:
        raise UsageError(f"--batch-size must be at least 1, found {values['batch_size']}")
    if info.kind == "train":
        if int(values["epochs"]) < 0 or int(values["steps"]) < 0:
            raise UsageError("--epochs and --steps must not be negative")
        if int(values["epochs"]) < 1 and int(values["steps"]) < 1:
            raise UsageError("nothing to train: --epochs and --steps are both 0")
    return values


def check_searchable(program: Program) -> str:
    """The strategy's name, after refusing what it cannot do (one clear line each)."""
    name = program.checked.search.strategy
    info = STRATEGIES.get(name)
    fields = unsearchable(info, program.graph)
    if fields:
        raise UsageError(
            f"strategy '{name}' cannot search {', '.join(fields)}; fix those choices in the spec or pick another "
            f"strategy (e.g. 'search magnitude', which searches every dimension)"
        )
    if name not in IMPLEMENTATIONS:
        raise UsageError(
            f"strategy '{name}' has no search implementation yet (available: {', '.join(IMPLEMENTATIONS.names())})"
        )
    declared, implemented = STRATEGIES.get(name).kind, IMPLEMENTATIONS.get(name).kind
    if declared != implemented:  # a plug-in bug, not a user mistake: the two registrations disagree
        raise TypeError(
            f"strategy '{name}' is declared as {declared} (compile.strategies) but implemented as {implemented}"
        )
    # a space may fix widths below the dense ones (a target shape): which units to keep is then still searched
    reduced = any(
        g.kind in ("embed", "heads", "head_dim", "ffn") and max(int(c) for c in g.choices) < g.size
        for g in groups(program.space)
    )
    if not program.graph.decisions():
        if not reduced:
            raise UsageError(f"{program.path} has no decisions left: nothing to search")
    elif not program.budgets:
        raise UsageError(
            "no budget to search for: add e.g. `budget { flops <= 50% }` to the spec or pass --budget 50%"
        )
    return str(name)


def out_dir_for(program: Program, out: str | None) -> str:
    if out:
        return out
    stem = os.path.splitext(os.path.basename(program.path))[0]
    return os.path.join("runs", stem)


def output_paths(program: Program, out_dir: str) -> dict[str, str]:
    stem = os.path.splitext(os.path.basename(program.path))[0]
    return {
        "out": out_dir,
        "frozen": os.path.join(out_dir, f"{stem}.frozen.vit"),
        "ckpt": os.path.join(out_dir, "search.ckpt"),
        "metrics": os.path.join(out_dir, "metrics.jsonl"),
        "report": os.path.join(out_dir, "report.png"),
    }


def lower_supernet(
    program: Program, settings: dict[str, SettingValue], weights: str, device: torch.device
) -> Supernet:
    """The program's supernet on ``device`` (a backbone the supernet cannot mask is a :class:`UsageError`)."""
    try:
        return lower(
            program.space,
            weights=weights,
            convention=program.convention,
            alpha=float(settings.get("alpha", 0.0)) or None,
            seed=int(settings["seed"]),
            device=device,
        )
    except NotImplementedError as e:
        raise UsageError(str(e)) from None


def budget_text(targets: list[Target]) -> str:
    return ", ".join(fmt_metric(t.metric, t.limit) for t in targets)


def cost_text(costs: dict[str, float], targets: list[Target]) -> str:
    return ", ".join(fmt_metric(t.metric, costs[t.metric]) for t in targets)
