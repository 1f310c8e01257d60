"""Search stage — the entry point: a compiled :class:`~spvit_dsl.compile.program.Program` → a searched, frozen network.

Input: the program (space, budgets, search settings) and run options. Output: :class:`SearchResult` and, in the
output folder, ``<name>.frozen.vit``, ``search.ckpt``, ``metrics.jsonl`` and ``report.png``.

Steps:

1. resolve settings (arguments over the spec's values over defaults), refuse what the strategy cannot search, pick
   the device, join the process group under torchrun;
2. load the data (none for a data-free strategy), lower the supernet (:func:`spvit_dsl.supernet.lower.lower`), build
   the strategy plug-in (:mod:`.methods`);
3. optionally restore ``search.ckpt`` (weights, strategy tensors, optimizers, counters, random states, shrinks);
4. by the strategy's kind: train (:func:`.train.train`), score proxy batches (:func:`.train.score`), or nothing;
5. finalize: the strategy returns the point and its kept units at or under every budget; write the frozen spec,
   the checkpoint (with the kept units), metrics and report (rank 0 only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._io import write_text
from ..compile.program import Program
from ..compile.strategies import STRATEGIES, SettingValue
from ..lang.errors import UsageError
from ..runtime.data import batches_per_epoch, data_of_settings
from ..runtime.device import init_distributed, pick_device, world_info
from ..space.latency import LatencyTable
from ..space.plan import FrozenArch
from . import methods  # noqa: F401  (registers the strategies)
from .budget import targets_of
from .checkpoint import save_checkpoint
from .outputs import MetricsLog, achieved_costs, frozen_text, verify_frozen
from .progress import Reporter, RichReporter
from .protocol import IMPLEMENTATIONS, Decisions, SearchContext
from .report import write_report
from .run import Run, Trainee, barrier, checkpoint, restore, save, wrap
from .setup import budget_text, check_searchable, lower_supernet, out_dir_for, output_paths, resolve_settings
from .train import NonFinite, SigintFlag, StepInfo, score, train

__all__ = ["SearchInterrupted", "SearchResult", "StepInfo", "check_latency_space", "run_search"]


class SearchInterrupted(UsageError):
    """Ctrl-C (or a test hook): the checkpoint was saved; ``--resume`` continues."""


@dataclass
class SearchResult:
    """What :func:`run_search` returns (paths are inside ``out_dir``; ``kept``: kept units on the CPU)."""

    frozen_path: str
    frozen_text: str
    arch: FrozenArch
    kept: dict[str, Tensor]
    costs: dict[str, float]  # flops_paper, flops_exact, params
    budgets: list[dict[str, Any]]  # metric, limit (absolute), text, achieved, ratio
    out_dir: str
    checkpoint_path: str
    metrics_path: str
    report_path: str
    epochs: int  # completed epochs
    steps: int  # optimizer steps (or proxy batches scored)
    val_accuracy: float | None = None
    info: dict[str, Any] = field(
        default_factory=dict
    )  # the strategy's finalize() info; "notice" when the projection did the work


def run_search(
    program: Program,
    *,
    data: str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    out: str | None = None,
    resume: bool = False,
    seed: int | None = None,
    init_checkpoint: str | None = None,
    quiet: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
    reporter: Reporter | None = None,
    settings: Mapping[str, SettingValue] | None = None,
    latency: LatencyTable | None = None,
) -> SearchResult:
    """Search ``program``'s space for its budgets and write the outputs (see the module docstring).

    Arguments override the spec's search settings (one that the strategy's kind does not use is a
    :class:`UsageError`); ``settings``: any other strategy settings (``--set``, already validated by
    :func:`~.setup.parse_setting`). ``init_checkpoint``: a dense timm state-dict file to start from (overrides the
    spec's ``weights``). ``callback``: called after every training step with a :class:`StepInfo`. ``latency``: the
    device's latency table (``spvit_dsl.compact.latency.table_for``), required when a budget is a latency.
    """
    program = program.with_latency(latency)  # `latency <= 60%`: milliseconds from the table's dense network
    if program.latency is not None:
        _check_latency_budget(program, latency)
    check_searchable(program)
    overrides: dict[str, SettingValue | None] = dict(settings or {})
    overrides |= {"data": data, "epochs": epochs, "steps": steps, "batch_size": batch_size, "seed": seed}
    settings = resolve_settings(program, overrides)
    rank, world, local_rank = world_info()
    dev = pick_device(device, local_rank)
    started = init_distributed(dev, world)
    try:
        run = _setup(
            program, settings, dev, rank, world, out, resume, init_checkpoint, quiet, reporter, latency
        )
        return _search(run, callback)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def check_latency_space(program: Program) -> None:
    """A latency budget needs a structured choice: refused in one line otherwise (checked before any table)."""
    if program.latency is not None and not any(d.kind != "weights" for d in program.graph.decisions()):
        raise UsageError(
            "a latency budget needs a structured choice (attention, ffn, heads, head_dim or embed): sparse weights "
            "run at dense speed on dense kernels, so sparsity alone cannot lower a latency"
        )


def _check_latency_budget(program: Program, table: LatencyTable | None) -> None:
    """Refuse, before any training, a latency budget without its table, on a space of sparsity only, or that no
    point of the space meets (one line, with the fastest point's predicted latency)."""
    check_latency_space(program)
    if table is None:
        raise UsageError(
            "a latency budget needs this device's latency table: pass latency=table_for(program.space, "
            "program.latency)[0] (spvit_dsl.compact.latency), or run 'spvit-dsl search', which builds it"
        )
    try:
        fastest = table.fastest_ms(program.space)
    except KeyError as exc:
        raise UsageError(
            f"the latency table does not cover this space ({exc.args[0]}); build it for this spec: "
            f"spvit-dsl latency {program.path}"
        ) from None
    assert program.latency is not None  # the caller checked
    for b in program.budgets:
        if b.metric == "latency" and b.absolute < fastest:
            raise UsageError(
                f"budget latency <= {b.limit.text} cannot be met on {program.latency.describe()}: the fastest "
                f"network of this space is predicted at {fastest:.3g} ms; relax the budget or add cheaper choices "
                "(smaller widths, a skip op)"
            )


def _setup(
    program: Program,
    settings: dict[str, Any],
    dev: torch.device,
    rank: int,
    world: int,
    out: str | None,
    resume: bool,
    init_checkpoint: str | None,
    quiet: bool,
    reporter: Reporter | None,
    latency: LatencyTable | None = None,
) -> Run:
    torch.manual_seed(int(settings["seed"]))
    kind = STRATEGIES.get(program.checked.search.strategy).kind
    targets = targets_of(program.budgets, latency)
    data = data_of_settings(settings, program.space.geometry) if kind != "data_free" else None
    net = lower_supernet(program, settings, init_checkpoint or program.checked.weights, dev)
    spe = batches_per_epoch(data.train, int(settings["batch_size"]), world=world) if data is not None else 0
    if data is not None and spe == 0:
        raise UsageError(f"the training set of '{settings['data']}' is empty")
    total = 0
    if kind == "train":
        total = int(settings["epochs"]) * spe if settings["epochs"] else int(settings["steps"])
        total = min(total, int(settings["steps"])) if settings["steps"] else total
    ctx = SearchContext(program, net, targets, settings, dev, data, spe, total, rank, world)
    strategy = IMPLEMENTATIONS.get(program.checked.search.strategy)(ctx)
    if kind == "score":
        ctx.total_steps = strategy.score_batches()
    out_dir = out_dir_for(program, out)
    paths = output_paths(program, out_dir)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    rep = reporter if reporter is not None else (Reporter() if quiet or rank != 0 else RichReporter())
    trainee = Trainee(ctx, strategy)
    loss_fn = data.loss() if data is not None else None
    run = Run(
        ctx,
        strategy,
        trainee,
        trainee,
        loss_fn,
        paths,
        settings,
        rep,
        MetricsLog(paths["metrics"], enabled=rank == 0),
    )
    if resume:
        restore(run)
    run.model = wrap(trainee, dev, world)
    run.metrics.start(run.step if resume else None)
    return run


def _search(run: Run, callback: Callable[[StepInfo], None] | None) -> SearchResult:
    ctx, kind = run.ctx, run.strategy.kind
    if ctx.rank == 0 and run.step == 0:  # not again on a resume
        for line in run.strategy.notices():
            run.reporter.note(line)
    if kind != "data_free":  # a data-free strategy takes no steps: no progress bar to draw
        run.reporter.start(ctx.total_steps, min(run.step, ctx.total_steps), budget_text(ctx.targets))
    try:
        with SigintFlag() as flag:
            if kind == "train":
                assert ctx.data is not None
                train(run, ctx.data, callback, flag)
            elif kind == "score":
                assert ctx.data is not None
                score(run, ctx.data, callback, flag)
    except KeyboardInterrupt:
        save(run)
        run.reporter.stop()
        raise SearchInterrupted(
            f"interrupted at epoch {run.epoch + 1}, step {run.step}; checkpoint saved to "
            f"{run.paths['ckpt']} (continue with --resume)"
        ) from None
    except NonFinite as e:
        run.reporter.stop()
        rates = ", ".join(f"{k} {run.settings[k]:g}" for k in ("lr", "gate_lr") if k in run.settings)
        raise UsageError(
            f"the loss became {e.value} at step {run.step + 1} (learning rate too high? {rates}); "
            + _kept_text(run)
        ) from None
    except torch.OutOfMemoryError:
        run.reporter.stop()
        raise UsageError(
            f"out of memory on {ctx.device} at batch size {run.settings.get('batch_size')}: lower --batch-size; "
            + _kept_text(run)
        ) from None
    except UsageError:
        run.reporter.stop()
        raise
    run.reporter.stop()
    return _finish(run)


def _check_ranks_agree(ctx: SearchContext, arch: FrozenArch) -> None:
    """Every rank must derive the same network (identical masks and all-reduced gradients)."""
    if ctx.world <= 1:
        return
    seen: list[Any] = [None] * ctx.world
    dist.all_gather_object(seen, repr(arch))
    if len(set(seen)) != 1:
        raise RuntimeError("internal error: data-parallel ranks derived different architectures")


def _kept_text(run: Run) -> str:
    if run.saved_any:
        return f"the last good checkpoint is kept at {run.paths['ckpt']}"
    return "no checkpoint was written yet"


def _projection_notice(run: Run, info: Mapping[str, Any]) -> str | None:
    """One line when the budget projection, a safety net for a training strategy, did real work: the point the
    strategy derived had no msa block and the projection put one back (a ViT must attend to classify), or it missed
    the binding budget by more than 2% over or under (data-free and scoring strategies allocate with the projection
    by design: no line)."""
    derived = info.get("derived_cost")
    if run.strategy.kind != "train" or not isinstance(derived, Mapping) or not run.ctx.targets:
        return None
    lines = []
    if info.get("raised_msa"):
        lines.append(
            f"note: the searched network had no msa block (a ViT classifies through attention), so the budget "
            f"projection made {info['raised_msa']} msa and refitted the rest around it: the network it returns was "
            "never trained as it is. Fine-tune it, or search again with a looser budget or longer (--epochs)."
        )
    ratio_line = _ratio_notice(run, info, derived)
    lines += [ratio_line] if ratio_line else []
    return " ".join(lines) or None


def _ratio_notice(run: Run, info: Mapping[str, Any], derived: Mapping[str, Any]) -> str | None:
    ratios = {t.metric: float(derived[t.metric]) / t.limit for t in run.ctx.targets if t.metric in derived}
    if not ratios:
        return None
    metric = max(ratios, key=lambda m: ratios[m])
    ratio = ratios[metric]
    if ratio > 1.02:
        schedule = info.get("schedule")
        if isinstance(schedule, Mapping):  # SPViT: the run stopped before its schedule reached the budget
            done, reach, planned = (int(schedule[k]) for k in ("steps", "reach_step", "planned_steps"))
            fits = float(schedule.get("reach_that_fits", 0.0))
            warm = int(schedule.get("warmup_steps", 0))
            if warm >= planned:  # the gates never moved: no step count or budget_reach can help
                hint = (
                    f"its weight-only warm-up (warmup_epochs) lasts {warm} steps, not fewer than the {planned} "
                    "planned, so the gates never trained: lower warmup_epochs (--warmup-epochs) or raise --epochs"
                )
            else:
                hint = (
                    f"it stopped at step {done}, and its schedule reaches the budget at step {reach} of the {planned} "
                    f"planned (--steps does not shorten the plan; --epochs does): run at least {reach} steps, or set "
                    "--epochs to the run you want"
                    + (f", or --set budget_reach={fits:g}" if fits > 0 else ", or lower warmup_epochs")
                )
        else:
            hint = "train longer (--epochs)"
        hint += " or raise budget_weight" if "budget_weight" in run.settings else ""
        return (
            f"note: the searched network was at {ratio:.0%} of the {metric} budget; the budget projection removed "
            f"{info.get('removed', '?')} level(s) of units or ops to fit it. To have the search meet the budget itself: {hint}."
        )
    if ratio < 0.98:
        largest = float(run.ctx.price(run.ctx.program.space.largest()).get(metric, math.inf))
        if largest < 0.98 * next(t.limit for t in run.ctx.targets if t.metric == metric):
            return None  # the budget is above the largest network: nothing could have used more of it
        hint = "train longer (--epochs)"
        hint += " or raise budget_weight" if "budget_weight" in run.settings else ""
        # the projection added nothing: every op or unit left out costs more than the unused rest
        if info.get("added") == 0:
            return (
                f"note: the searched network used only {ratio:.0%} of the {metric} budget, and no op or unit it left "
                "out fits in the rest. To use more of it: offer finer choices where it cut (more ops, per-neuron FFN "
                f"widths), or {hint}."
            )
        return (
            f"note: the searched network used only {ratio:.0%} of the {metric} budget; the budget projection added "
            f"{info.get('added', '?')} level(s) of units or ops back. To have the search meet the budget itself: {hint}."
        )
    return None


def _finish(run: Run) -> SearchResult:
    ctx = run.ctx
    try:
        with torch.no_grad():
            decisions: Decisions = run.strategy.finalize()
    except ValueError as e:  # e.g. no point of the decided groups meets the budget
        raise UsageError(f"the search could not finish: {e}; {_kept_text(run)}") from None
    decisions.kept = ctx.net.to_original(decisions.kept)  # checkpoints index the dense backbone's units
    arch = decisions.arch
    _check_ranks_agree(ctx, arch)
    facts = {
        "strategy": ctx.program.checked.search.strategy,
        "seed": run.settings["seed"],
        "epochs": run.epoch,
        "steps": run.step,
    }
    for t in ctx.targets:
        if t.table is not None:  # the header records the prediction and where it holds
            facts["latency_predicted"] = f"{t.table.arch_ms(ctx.program.space.geometry, arch):.4g}ms"
    text = frozen_text(ctx.program, arch, facts)
    verify_frozen(text, run.paths["frozen"], ctx.targets, ctx.convention)
    own = decisions.info.get("notice")  # the strategy's own one-line notice (a fallback it had to take)
    notice = _projection_notice(run, decisions.info)
    lines = [str(n) for n in (own, notice) if n]
    if lines:
        decisions.info["notice"] = " ".join(lines)
        if ctx.rank == 0:
            for line in lines:
                run.reporter.note(line)
    analytic = ctx.price(arch)
    budgets = [
        {
            "metric": t.metric,
            "limit": t.limit,
            "text": t.text,
            "achieved": analytic[t.metric],
            "ratio": analytic[t.metric] / t.limit,
        }
        for t in ctx.targets
    ]
    if run.strategy.kind == "data_free":
        run.metrics.add(
            {
                "kind": "result",
                "step": 0,
                "cost": analytic,
                "ratio": {b["metric"]: b["ratio"] for b in budgets},
            }
        )
    val = run.history[-1]["val_acc"] if run.history else None
    if ctx.rank == 0:
        write_text(run.paths["frozen"], text)
        save_checkpoint(run.paths["ckpt"], checkpoint(run, finished=True, kept=decisions.kept))
        run.metrics.flush()
        write_report(run.paths["report"], ctx.program, arch, decisions.kept, run.metrics.read(), ctx.targets)
    barrier(ctx)
    return SearchResult(
        run.paths["frozen"],
        text,
        arch,
        decisions.kept,
        achieved_costs(ctx.program, arch)
        | ({"latency_ms": analytic["latency"]} if "latency" in analytic else {}),
        budgets,
        run.paths["out"],
        run.paths["ckpt"],
        run.paths["metrics"],
        run.paths["report"],
        run.epoch,
        run.step,
        val,
        dict(decisions.info),
    )
