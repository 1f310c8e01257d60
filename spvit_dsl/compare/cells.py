"""Compare stage — cells: one strategy and one seed, from the shared dense start to a fine-tuned, evaluated network.

Input: a compiled spec (backbone, space, data, budgets), a strategy name, a seed, the dense start and the shared
fine-tuning recipe. Output: the cell's row (``cell.json`` in the cell's folder, written atomically once the cell is
done): top-1, FLOPs and parameters of the frozen network (the spec's convention; sparse for a weights space), the
search's wall time, whether the structure is dense or sparse, and the search's own one-line notice — or, for a
strategy that cannot search the space, the reason in one line. A finished cell is read back, never recomputed; an
interrupted one continues from its search checkpoint and its fine-tuning checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from .._io import write_text
from ..compile.check import STRATEGY_DEFAULTS
from ..compile.program import Program, compile_text
from ..compile.strategies import STRATEGIES
from ..lang import ast
from ..lang.emit import emit
from ..lang.parse import parse
from ..runtime.device import pick_device
from ..search import run_search
from ..space.groups import block_path, embed_path
from ..space.units import Limit
from ..train.finetune import FinetuneSettings
from ..train.recipe import finetune_frozen

__all__ = ["CellPlan", "cell_spec", "finished", "run_cell"]

CARRIED = (
    "data",
    "data_dir",
    "train_split",
    "val_split",
    "batch_size",
    "workers",
    "precision",
    "lr",
    "weight_decay",
)  # shared by a kind's strategies


@dataclass(frozen=True)
class CellPlan:
    """What every cell of one comparison shares."""

    program: Program  # the user's spec, compiled
    budgets: tuple[Limit, ...]  # --budget flags (empty: the spec's budgets)
    dense_state: str | None  # the dense start (a timm state dict), None: the spec's weights
    tune: FinetuneSettings  # the shared fine-tuning recipe (its seed is replaced by the cell's)
    search_epochs: int | None  # None: the spec's epochs (or the strategy's default)
    search_steps: int  # 0: no limit (tests and smoke runs)
    data: Any  # the loaded dataset (shared by fine-tuning and evaluation)
    device: str = "auto"
    dimap_sparse: bool = True  # DIMAP in the paper's form (single weights), see cell_spec


DIMAP_SPACE = (
    "blocks all { sparsity: 0..0.95 step 0.05 }"  # the paper's: single weights of qkv, proj, fc1, fc2
)


def cell_spec(program: Program, strategy: str, *, dimap_sparse: bool = False) -> str:
    """The user's spec with its ``search`` block replaced by one for ``strategy``: the spec's own strategy keeps every
    setting; another strategy gets the settings every strategy of its kind reads (data, batch size, workers,
    precision; epochs, lr and weight decay for training strategies), its own ones at its defaults.

    ``dimap_sparse``: DIMAP in the paper's form — the space's block and embedding declarations give way to
    :data:`DIMAP_SPACE` (unless the space already declares sparsity), so its row is a sparse network."""
    spec = program.checked.spec
    info = STRATEGIES.get(strategy)
    accepted = info.settings()
    old = spec.first("search")
    own = old is not None and old.strategy == strategy
    carried = tuple(
        s
        for s in (old.settings if old is not None else ())
        if own or (s.key in CARRIED + ("epochs",) and s.key in accepted)
    )
    block = ast.Search(strategy=strategy, settings=carried)
    items = [i for i in spec.items if i.kind != "search"]
    if (
        strategy in STRATEGY_DEFAULTS
    ):  # e.g. OFB's grids: searching more than the spec's space would be unfair
        items += [i for i in parse(_pins(program)).items if i.kind in ("scope", "embed")]
    if strategy == "dimap" and dimap_sparse and not _declares_sparsity(program):
        items = [i for i in items if i.kind not in ("scope", "embed")]
        items += [i for i in parse(DIMAP_SPACE).items if i.kind == "scope"]
    return emit(spec.model_copy(update={"items": (*items, block)}))


def _pins(program: Program) -> str:
    """Declarations that fix every dimension the spec leaves open at its dense value (a strategy with default grids
    fills only undeclared dimensions), as spec text."""
    declared = set(program.checked.origins)
    geo = program.space.geometry
    lines = []
    for s in range(geo.stages):
        if embed_path(geo, s) not in declared:
            width = geo.stage_dim(s)
            lines.append(f"embed: {width}" if geo.family != "swin" else f"stage {s} {{ embed: {width} }}")
    for p in program.space.plans:
        b, i = p.geom, p.geom.index
        fields = {
            "heads": f"heads: {b.heads}",
            "head_dim": f"head_dim: {b.head_dim}",
            "ffn": f"ffn: width {b.hidden}",
        }
        pinned = [text for f, text in fields.items() if block_path(i, f) not in declared]
        if pinned:
            lines.append(f"block {i} {{ {'; '.join(pinned)} }}")
    return "\n".join(lines) + "\n"


def _declares_sparsity(program: Program) -> bool:
    return any(
        min(v for layer in (d.qkv, d.proj, d.fc1, d.fc2) for v in layer) < 1
        for d in (p.density for p in program.space.plans)
    )


REQUIRED = ("strategy", "seed", "top1", "flops", "params")  # the keys a finished cell's record must hold


def finished(folder: str) -> dict[str, Any] | None:
    """The record of a finished cell in ``folder``, or None (not finished, or a record that is unreadable, not
    JSON or missing a key: then the cell runs again)."""
    path = os.path.join(folder, "cell.json")
    try:
        with open(path, encoding="utf-8") as fh:
            row = json.load(fh)
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and all(k in row for k in REQUIRED) else None


def run_cell(plan: CellPlan, strategy: str, seed: int, folder: str, *, lead: bool = True) -> dict[str, Any]:
    """Run (or read back) one cell; its row. The strategy must be able to search the space (the run checks every
    strategy before any training). Ctrl-C propagates: the search has saved its checkpoint, fine-tuning keeps its
    own, and the next call continues from them. Under torchrun every rank calls it (the search is data-parallel);
    only the ``lead`` rank writes, fine-tunes and evaluates, the others return the bare row."""
    done = finished(folder)
    if done is not None:
        return done
    text = cell_spec(plan.program, strategy, dimap_sparse=plan.dimap_sparse)
    if lead:
        os.makedirs(folder, exist_ok=True)
        write_text(os.path.join(folder, f"{strategy}.vit"), text)
    program = compile_text(text, plan.program.path, budgets=list(plan.budgets) or None)
    row: dict[str, Any] = {"strategy": strategy, "seed": seed}
    kind = STRATEGIES.get(strategy).kind
    search_out = os.path.join(folder, "search")
    resume = os.path.isfile(os.path.join(search_out, "search.ckpt"))
    started = time.perf_counter()
    result = run_search(
        program,
        epochs=plan.search_epochs if kind == "train" else None,
        steps=plan.search_steps or None if kind == "train" else None,
        device=plan.device,
        out=search_out,
        resume=resume,
        seed=seed,
        init_checkpoint=plan.dense_state,
        quiet=True,
    )
    timed = os.path.join(folder, "search_time.json")
    if not lead:
        return row
    search_s: float | None = None  # a search interrupted midway has no comparable time
    if not resume:
        search_s = time.perf_counter() - started
        write_text(timed, json.dumps({"seconds": search_s}) + "\n")
    elif os.path.isfile(timed):  # the search had finished before the interruption: its own time
        with open(timed, encoding="utf-8") as fh:
            search_s = float(json.load(fh)["seconds"])
    tune_out = os.path.join(folder, "finetune")
    tune = dataclasses.replace(plan.tune, seed=seed)
    tuned = finetune_frozen(
        result.frozen_path,
        result.checkpoint_path,
        tune_out,
        tune,
        data=plan.data,
        resume=os.path.isfile(os.path.join(tune_out, "finetune.ckpt")),
        device=pick_device(plan.device),
    )
    convention = program.convention
    row |= {
        "top1": tuned.metrics.top1,
        "flops": result.costs[f"flops_{convention}"],
        "params": result.costs["params"],
        "budget_ratio": max(b["ratio"] for b in result.budgets) if result.budgets else None,
        "sparse": result.arch.sparse,
        "search_s": round(search_s, 2) if search_s is not None else None,
        "search_epochs_done": result.epochs,
        "search_steps": result.steps,
        "frozen_spec": result.frozen_path,
        "weights": os.path.join(tune_out, "best.safetensors"),
        "notice": result.info.get("notice"),
    }
    _write_row(folder, row)
    return row


def _write_row(folder: str, row: dict[str, Any]) -> None:
    write_text(os.path.join(folder, "cell.json"), json.dumps(row, indent=1, sort_keys=True) + "\n")
