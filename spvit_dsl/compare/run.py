"""Compare stage — the run: checks, the dense start, every cell in turn, side-by-side latency, the written table."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._io import output_problem, write_text
from ..compact.build import build, load
from ..compact.speed import machine, time_models
from ..compile.program import Program, compile_text
from ..compile.strategies import STRATEGIES
from ..lang.errors import UsageError, did_you_mean
from ..runtime.device import pick_device, world_info
from ..runtime.evaluate import evaluate
from ..search.setup import check_searchable, unsearchable
from ..space.units import Limit
from ..train.finetune import FinetuneSettings
from ..train.recipe import data_of, dense_spec, train_dense
from . import cells as _cells
from .cells import CellPlan, cell_spec
from .report import UNITS, markdown, plot, rows_of

__all__ = ["DEFAULT_STRATEGIES", "CompareResult", "run_compare"]

DEFAULT_STRATEGIES = ("spvit", "upvit", "ofb", "dimap", "magnitude", "random")


@dataclass
class CompareResult:
    """The rows (one per strategy), the dense reference and the files written."""

    rows: list[dict[str, Any]]
    dense: dict[str, Any]
    json_path: str
    markdown_path: str
    plot_path: str
    title: str
    computed: int  # cells computed by this call (the others were read back)
    cells: int = 0  # cells in the table (skipped strategies excluded)


def _check_strategies(names: Sequence[str]) -> list[str]:
    known = STRATEGIES.names()
    out = []
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known) or f"known: {', '.join(sorted(known))}"
            raise UsageError(f"--strategies: unknown strategy '{name}' ({hint})")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError("--strategies: name at least one strategy")
    return out


def _skips(
    program: Program, names: list[str], budgets: Sequence[Limit], dimap_sparse: bool
) -> dict[str, str]:
    """Before any training: each strategy's cell spec compiled and checked. A strategy that cannot search the
    space's group kinds is skipped (strategy → reason); any other problem (no budget, a spec error) concerns every
    strategy and is raised now, not after the dense start."""
    skips = {}
    for name in names:
        text = cell_spec(program, name, dimap_sparse=dimap_sparse)
        cell = compile_text(text, program.path, budgets=list(budgets) or None)
        fields = unsearchable(STRATEGIES.get(name), cell.graph)
        if fields:
            skips[name] = f"'{name}' cannot search {', '.join(fields)}"
            continue
        check_searchable(cell)
    return skips


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _claim(folder: str, fingerprint: str, what: str, out: str, lead: bool = True) -> None:
    """Refuse to reuse ``folder`` for a different comparison (another budget, recipe, dense start or spec); every
    rank checks, only the ``lead`` rank records a new fingerprint."""
    path = os.path.join(folder, "fingerprint")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            if fh.read().strip() != fingerprint:
                raise UsageError(
                    f"{out} holds the {what} of another comparison (spec, budget, recipe or dense start differ): "
                    "pass another --out, or delete it to start over"
                )
        return
    if lead:
        os.makedirs(folder, exist_ok=True)
        write_text(path, fingerprint + "\n")


def run_compare(
    program: Program,
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    budgets: Sequence[Limit] = (),
    seeds: int = 3,
    out: str | None = None,
    finetune_epochs: int = 40,
    finetune_lr: float = 5e-4,
    dense_epochs: int = 40,
    search_epochs: int | None = None,
    search_steps: int = 0,
    finetune_steps: int = 0,
    latency_batch: int = 64,
    device: str = "auto",
    dimap: str = "sparse",
    say: Callable[[str], None] | None = None,
) -> CompareResult:
    """Compare ``strategies`` on ``program``'s space (see :mod:`spvit_dsl.compare`). ``dense_epochs = 0`` starts
    every cell from the spec's own weights. ``dimap``: ``sparse`` runs DIMAP in the paper's form (single weights of
    every qkv, proj, fc1 and fc2: a sparse row), ``structured`` on the spec's own space (our extension).

    Raises UsageError (one line) for an unknown strategy, a seed count below 1, a negative epoch count, an ``out``
    that is a file or holds another comparison, and for problems every strategy shares (no budget, ...), before
    any training; a strategy that cannot search the space is a row, not an error.
    """
    names = _check_strategies(strategies)
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    for flag, value, least in (
        ("--finetune-epochs", finetune_epochs, 1),
        ("--dense-epochs", dense_epochs, 0),
    ):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, not {value}")
    stem = os.path.splitext(os.path.basename(program.path))[0]
    out = out or os.path.join("runs", f"{stem}-compare")
    problem = output_problem(out, folder=True)
    if problem:
        raise UsageError(f"--out: {problem}")
    if dimap not in ("sparse", "structured"):
        raise UsageError(f"--dimap: expected 'sparse' or 'structured', found '{dimap}'")
    skips = _skips(program, names, budgets, dimap == "sparse")
    rank, world, local_rank = world_info()
    dev = pick_device(device, local_rank if world > 1 else None)
    started = _join(dev, world)
    try:
        return _compare(
            program,
            names,
            skips,
            budgets,
            seeds,
            out,
            finetune_epochs,
            finetune_lr,
            dense_epochs,
            search_epochs,
            search_steps,
            finetune_steps,
            latency_batch,
            device,
            dev,
            rank,
            say,
            dimap == "sparse",
        )
    finally:
        if started:
            dist.destroy_process_group()


def _join(dev: torch.device, world: int) -> bool:
    """Under torchrun: join the process group for the whole comparison (the searches reuse it) with a timeout long
    enough for rank 0 to fine-tune a cell while the other ranks wait."""
    if world <= 1 or dist.is_initialized():
        return False
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=24))
    return True


def _wait() -> None:
    """Every rank meets here (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _compare(
    program: Program,
    names: list[str],
    skips: dict[str, str],
    budgets: Sequence[Limit],
    seeds: int,
    out: str,
    finetune_epochs: int,
    finetune_lr: float,
    dense_epochs: int,
    search_epochs: int | None,
    search_steps: int,
    finetune_steps: int,
    latency_batch: int,
    device: str,
    dev: torch.device,
    rank: int,
    say: Callable[[str], None] | None,
    dimap_sparse: bool,
) -> CompareResult:
    """The comparison proper. Under torchrun every rank runs the searches (data-parallel); rank 0 alone trains the
    dense start, fine-tunes, evaluates, times and writes, while the others wait at a barrier."""
    lead = rank == 0
    stem = os.path.splitext(os.path.basename(program.path))[0]
    tell = (say or (lambda _line: None)) if lead else (lambda _line: None)
    os.makedirs(out, exist_ok=True)
    data = data_of(program)
    dense_out = os.path.join(out, "dense")
    spec_text = cell_spec(program, program.checked.search.strategy or "spvit")
    # the budgets as absolute limits: `--budget 50%` and the spec's `flops <= 50%` are the same comparison
    limits = [
        (b.metric, float(b.absolute))
        for b in compile_text(spec_text, program.path, budgets=list(budgets) or None).budgets
    ]
    if dense_epochs == 0 and program.checked.weights in (None, "none"):
        tell(
            "note: --dense-epochs 0 with `weights = none`: every cell starts from random weights (the dense row "
            "too); pass --dense-epochs N to train one dense start, or give the spec trained weights"
        )
    dense_state: str | None = None
    dense_top1 = 0.0
    dense_weights = os.path.join(dense_out, "best.safetensors") if dense_epochs > 0 else ""
    _claim(dense_out, _fingerprint(spec=spec_text, dense_epochs=dense_epochs), "dense start", out, lead)
    if lead:
        if dense_epochs > 0:
            tell(f"dense start: {dense_epochs} epochs (read back from {dense_out} when finished)")
            settings = FinetuneSettings(
                epochs=dense_epochs, batch_size=64, lr=2e-3, warmup_epochs=min(2, dense_epochs), seed=0
            )
            trained = train_dense(program, dense_out, settings, device=dev)
            dense_top1 = trained.metrics.top1
            del trained  # one model in memory at a time
        else:
            model = build(dense_spec(program, dense_out), weights=program.checked.weights)
            dense_top1 = evaluate(model, data.val, device=dev).top1
            del model
    _wait()
    dense_model_path = os.path.join(dense_out, "dense.vit")
    if dense_epochs > 0:
        dense_state = os.path.join(dense_out, "dense_timm.safetensors")
    dense_cost = program.graph.cost(program.space.dense(), program.convention)
    dense = {"top1": dense_top1, "flops": float(dense_cost.macs), "params": float(dense_cost.params)}
    tune = FinetuneSettings(
        epochs=finetune_epochs,
        batch_size=64,
        lr=finetune_lr,
        warmup_epochs=min(2, finetune_epochs),
        seed=0,
        steps=finetune_steps,
    )
    plan = CellPlan(
        program, tuple(budgets), dense_state, tune, search_epochs, search_steps, data, device, dimap_sparse
    )
    cells: dict[str, list[dict[str, Any]]] = {}
    computed = 0
    for name in names:
        if name in skips:
            tell(f"{name}: cannot search this space: {skips[name]}")
            cells[name] = [{"strategy": name, "seed": 0, "skipped": skips[name]}]
            continue
        for seed in range(seeds):
            folder = os.path.join(out, "cells", name, f"seed{seed}")
            _wait()  # every rank sees the same finished cells and checkpoints
            _claim(
                folder,
                _fingerprint(
                    spec=cell_spec(program, name, dimap_sparse=dimap_sparse),
                    budgets=limits,
                    tune=dataclasses.asdict(tune),
                    dense=dense_state,
                    search=(search_epochs, search_steps),
                ),
                "cells",
                out,
                lead,
            )
            cached = _cells.finished(folder) is not None
            resuming = os.path.isfile(os.path.join(folder, "search", "search.ckpt"))
            tell(
                f"{name}, seed {seed}: " + ("read back" if cached else "resuming" if resuming else "running")
            )
            row = _cells.run_cell(plan, name, seed, folder, lead=lead)
            computed += 0 if cached else 1
            cells.setdefault(name, []).append(row)
    _wait()
    if not lead:  # rank 0 times, tabulates and writes
        return CompareResult([], {}, "", "", "", "", computed)
    tell("timing every network side by side with the dense one")
    _time(cells, dense, dense_model_path, dense_weights, program, latency_batch, dev)
    rows = rows_of(cells, dense)
    shown = budgets or [b.limit for b in program.budgets]
    budget_text = ", ".join(f"{b.metric} <= {b.text}" for b in shown)
    title = f"{stem}: {budget_text}, {seeds} seed(s), {finetune_epochs} fine-tuning epochs"
    paths = {k: os.path.join(out, f"compare.{k}") for k in ("json", "md", "png")}
    report = {
        "spec": program.path,
        "title": title,
        "convention": program.convention,
        "budget": budget_text,
        "seeds": seeds,
        "strategies": names,
        "finetune": {"epochs": finetune_epochs, "lr": finetune_lr, "batch_size": 64, "steps": finetune_steps},
        "dense_epochs": dense_epochs,
        "search_epochs": search_epochs,
        "dense": dense,
        "rows": rows,
        "cells": cells,
        "latency": {"batch": latency_batch, "device": str(dev), "machine": machine(dev)},
        "units": UNITS,
    }
    write_text(paths["json"], json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    write_text(paths["md"], markdown(rows, dense, title))
    plot(paths["png"], rows, dense, title)
    total = sum(len(v) for k, v in cells.items() if k not in skips)
    return CompareResult(rows, dense, paths["json"], paths["md"], paths["png"], title, computed, total)


def _time(
    cells: dict[str, list[dict[str, Any]]],
    dense: dict[str, Any],
    dense_spec_path: str,
    dense_weights: str,
    program: Program,
    batch: int,
    dev: torch.device,
) -> None:
    """Each finished network timed side by side with the dense one (interleaved, median of 10); the dense
    latency is the median over every pairing."""
    g = program.space.geometry
    shape = (batch, g.in_chans, g.img_size, g.img_size)
    dense_model = (
        load(dense_weights) if dense_weights else build(dense_spec_path, weights=program.checked.weights)
    )
    dense_times = []
    for seeds in cells.values():
        for c in seeds:
            if "skipped" in c or not c.get("weights"):
                continue
            model = load(c["weights"])
            timing = time_models({"dense": dense_model, "cell": model}, shape, device=dev)
            c["latency_ms"], c["dense_latency_ms"] = timing["cell"].median_ms, timing["dense"].median_ms
            dense_times.append(timing["dense"].median_ms)
            del model
    if dense_times:
        dense["latency_ms"] = sorted(dense_times)[len(dense_times) // 2]
