"""Search stage — setup: settings, device, process group, output paths and the lowered supernet of one search.

Helpers of :mod:`spvit_dsl.search.loop` (step 1–2 of its procedure), kept apart so the loop reads as training.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ..lang.errors import UsageError
from ..space.units import fmt_macs, fmt_params
from .budget import Target
from .protocol import IMPLEMENTATIONS

RUN_KEYS = ("data", "epochs", "steps", "batch_size", "seed")


def resolve_settings(program: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    values = dict(program.checked.search.values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("epochs", "steps", "batch_size", "seed"):
        values[key] = int(values[key])
    if values["batch_size"] < 1:
        raise UsageError(f"--batch-size must be at least 1, found {values['batch_size']}")
    if values["epochs"] < 1 and values["steps"] < 1:
        raise UsageError("nothing to train: --epochs and --steps are both 0")
    if values["epochs"] < 0 or values["steps"] < 0:
        raise UsageError("--epochs and --steps must not be negative")
    return values


def check_searchable(program: Any) -> str:
    """The strategy's name, after refusing what it cannot do (one clear line each)."""
    from ..compile.strategies import STRATEGIES

    name = program.checked.search.strategy
    info = STRATEGIES.get(name)
    kinds = sorted({d.kind for d in program.graph.decisions()} - set(info.decisions))
    if kinds:
        raise UsageError(
            f"strategy '{name}' cannot search {', '.join(kinds)} (it searches "
            f"{', '.join(sorted(info.decisions))}); fix those choices in the spec or pick another strategy"
        )
    if name not in IMPLEMENTATIONS:
        raise UsageError(
            f"strategy '{name}' has no search implementation yet (available: {', '.join(IMPLEMENTATIONS.names())})"
        )
    if not program.budgets:
        raise UsageError(
            "no budget to search for: add e.g. `budget { flops <= 50% }` to the spec or pass --budget 50%"
        )
    if not program.graph.decisions():
        raise UsageError(f"{program.path} has no decisions left: nothing to search")
    return str(name)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise UsageError(f"--device: expected auto, cpu or cuda, found '{requested}'")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", local_rank)


def world_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device, world: int) -> bool:
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def out_dir_for(program: Any, out: str | None) -> str:
    if out:
        return out
    stem = os.path.splitext(os.path.basename(program.path))[0]
    return os.path.join("runs", stem)


def output_paths(program: Any, out_dir: str) -> dict[str, str]:
    stem = os.path.splitext(os.path.basename(program.path))[0]
    return {
        "out": out_dir,
        "frozen": os.path.join(out_dir, f"{stem}.frozen.vit"),
        "ckpt": os.path.join(out_dir, "search.ckpt"),
        "metrics": os.path.join(out_dir, "metrics.jsonl"),
        "report": os.path.join(out_dir, "report.png"),
    }


def lower_supernet(program: Any, settings: dict[str, Any], weights: str, device: torch.device) -> Any:
    from ..supernet.lower import lower

    try:
        return lower(
            program.space,
            weights=weights,
            convention=program.convention,
            alpha=float(settings.get("alpha", 0.0)) or None,
            gate_init=float(settings.get("gate_init", 1.5)),
            seed=settings["seed"],
            device=device,
        )
    except NotImplementedError as e:
        raise UsageError(str(e)) from None


def budget_text(targets: list[Target]) -> str:
    return ", ".join(fmt_macs(t.limit) if t.metric == "flops" else fmt_params(t.limit) for t in targets)


def cost_text(costs: dict[str, float], targets: list[Target]) -> str:
    return ", ".join(
        fmt_macs(costs[t.metric]) if t.metric == "flops" else fmt_params(costs[t.metric]) for t in targets
    )
