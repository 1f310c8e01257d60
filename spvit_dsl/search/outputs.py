"""Search stage — outputs: the frozen spec with its provenance header, and the metrics log.

Input: the program, the projected :class:`~spvit_dsl.space.plan.FrozenArch` and the run's facts. Output:
``<name>.frozen.vit`` (via :func:`spvit_dsl.compile.freeze.freeze` and :func:`spvit_dsl.lang.emit.emit`, checked to compile with
zero decisions and to meet every budget) and ``metrics.jsonl`` (one JSON object per step and per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .._io import write_text
from ..compile.check import BudgetItem
from ..lang.errors import Span
from ..space.plan import FrozenArch
from .budget import Target

__all__ = ["MetricsLog", "achieved_costs", "frozen_text", "verify_frozen"]


def achieved_costs(program: Any, arch: FrozenArch) -> dict[str, float]:
    """flops_paper, flops_exact (multiply-adds) and params of ``arch`` by the analytic cost model."""
    paper, exact = program.graph.cost(arch, "paper"), program.graph.cost(arch, "exact")
    return {"flops_paper": float(paper.macs), "flops_exact": float(exact.macs), "params": float(paper.params)}


def _checked_with_budgets(program: Any) -> Any:
    """The checked spec carrying the budgets actually searched for (``--budget`` flags included)."""
    items = tuple(BudgetItem(b.limit, b.span if b.span is not None else Span()) for b in program.budgets)
    return dataclasses.replace(
        program.checked, budgets=items, convention=program.convention, latency=program.latency
    )


def frozen_text(program: Any, arch: FrozenArch, facts: dict[str, Any]) -> str:
    """The frozen spec's text. ``facts``: strategy, seed, epochs (and anything else for the header)."""
    from ..compile.freeze import freeze
    from ..lang.emit import emit

    path = program.path
    header = {
        # the absolute path: `latency`, `bench --predict` and `build` find the searched spec from any folder
        "source": os.path.abspath(path) if os.path.isfile(path) else path,
        "strategy": facts["strategy"],
        "budget": "; ".join(f"{b.metric} <= {b.limit.text}" for b in program.budgets),
        "seed": int(facts["seed"]),
        "epochs": int(facts["epochs"]),
    }
    header.update({k: v for k, v in facts.items() if k not in ("strategy", "seed", "epochs")})
    spec = freeze(_checked_with_budgets(program), arch, header, convention=program.convention)
    return emit(spec)


def verify_frozen(text: str, path: str, targets: list[Target], convention: str) -> None:
    """The frozen spec must compile with zero decisions and meet every target (an internal error otherwise)."""
    from ..compile.freeze import arch_of
    from ..compile.program import compile_text

    prog = compile_text(text, path, convention=convention)  # type: ignore[arg-type]
    if not prog.frozen:
        raise RuntimeError(f"internal error: the frozen spec {path} still has {prog.decisions} decisions")
    cost = prog.graph.cost(arch_of(prog.checked), convention)  # type: ignore[arg-type]
    arch = arch_of(prog.checked)
    for t in targets:
        if t.metric == "latency":
            assert t.table is not None  # targets_of attaches the table to every latency target
            value = t.table.arch_ms(prog.space.geometry, arch)
        else:
            value = cost.macs if t.metric == "flops" else cost.params
        if value > t.limit:
            raise RuntimeError(
                f"internal error: the frozen network costs {value:g} > {t.metric} budget {t.limit:g}"
            )


class MetricsLog:
    """``metrics.jsonl`` kept consistent with the checkpoint: records are buffered and appended when a checkpoint
    is written; on resume, records past the checkpoint's step are dropped."""

    def __init__(self, path: str, *, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.pending: list[dict[str, Any]] = []

    def start(self, resume_step: int | None) -> None:
        if not self.enabled:
            return
        if resume_step is None:
            write_text(self.path, "")
            return
        kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def add(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.pending.append(record)

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.pending)
            fh.flush()
            os.fsync(fh.fileno())
        self.pending = []

    def read(self) -> list[dict[str, Any]]:
        """The records; a line a kill cut short (or any line that is not a JSON object) is skipped."""
        if not os.path.isfile(self.path):
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    out.append(record)
        return out
