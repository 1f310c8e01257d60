"""The ``spvit-dsl search`` command (CLI of the search stage); torch is imported only inside the command body.

``spvit-dsl search SPEC [--budget ...] [--data ...] [--epochs N] [--steps N] [--batch-size N] [--device ...]
[--out DIR] [--resume] [--seed N] [--init-checkpoint FILE] [--quiet]``: flags override the spec's search settings,
``--budget`` replaces the spec's budget of the same metric. Under ``torchrun`` every process runs this command;
only rank 0 prints and writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

import typer

from ._common import DATA_DIR_HELP, DATA_HELP, ThreadsOpt, set_threads

__all__ = ["register", "summary_tables"]


def summary_tables(result: Any, program: Any) -> list[Any]:
    """The final summary: per-block choices (a column for every dimension the space decides), then the achieved
    cost against every budget."""
    from rich.table import Table

    from ..space.plan import LAYERS
    from ..space.units import fmt_macs, fmt_metric, fmt_params

    space, arch = program.space, result.arch
    decided = {d.kind for d in program.graph.decisions()}
    g = space.geometry
    widths = ", ".join(
        f"{w}/{d}" if g.stages == 1 else f"stage {s}: {w}/{d}"
        for s, (w, d) in enumerate(zip(arch.embed, g.dims, strict=True))
    )
    blocks = Table(title=f"searched architecture (embedding width {widths})", title_justify="left")
    columns = ["block", "attention"]
    cut = {
        k
        for k in ("heads", "head_dim")
        if any(getattr(b, k) < getattr(p.geom, k) for p, b in zip(space.plans, arch.blocks, strict=True))
    }
    columns += [k for k in ("heads", "head_dim") if k in decided or k in cut]
    columns += ["ffn kept", "of"] + (["sparsity (zeros)"] if "weights" in decided else [])
    for col in columns:
        blocks.add_column(col, justify="left" if col in ("attention", "sparsity (zeros)") else "right")
    for p, b in zip(space.plans, arch.blocks, strict=True):
        row = {
            "block": str(p.geom.index),
            "attention": b.op,
            "ffn kept": str(b.ffn),
            "of": str(p.geom.hidden),
        }
        row["heads"] = f"{b.heads}/{p.geom.heads}"
        row["head_dim"] = f"{b.head_dim}/{p.geom.head_dim}"
        by_value: dict[str, list[str]] = {}  # layers with the same sparsity (to 0.1%) share one entry
        for layer in LAYERS:
            if b.density.of(layer) < 1:
                by_value.setdefault(f"{1 - b.density.of(layer):.1%}", []).append(layer)
        row["sparsity (zeros)"] = " ".join(f"{','.join(ls)} {v}" for v, ls in by_value.items()) or "-"
        blocks.add_row(*(row[c] for c in columns))
    costs = Table(
        title=f"cost ({program.convention} convention for budgets; FLOPs are multiply-adds"
        + ("; sparse layers count non-zero weights)" if arch.sparse else ")"),
        title_justify="left",
    )
    for col in ("metric", "achieved", "budget", "ratio"):
        costs.add_column(col, justify="right")
    for b in result.budgets:
        fmt: Callable[[float], str] = partial(fmt_metric, b["metric"])
        label = "latency (predicted)" if b["metric"] == "latency" else b["metric"]
        limit = fmt(b["limit"]) + ("" if b["metric"] == "latency" else f" ({b['text']})")
        costs.add_row(label, fmt(b["achieved"]), limit, f"{b['ratio']:.2%}")
    budgeted = {b["metric"] for b in result.budgets}
    for key, label, fmt in (
        ("flops_paper", "flops (paper)", fmt_macs),
        ("flops_exact", "flops (exact)", fmt_macs),
        ("params", "params", fmt_params),
    ):
        metric = "flops" if key.startswith("flops") else "params"
        if metric in budgeted and (metric == "params" or key == f"flops_{program.convention}"):
            continue  # already in a budget row
        costs.add_row(label, fmt(result.costs[key]), "", "")
    return [blocks, costs]


def _check_out(program, out: str | None, resume: bool, force: bool) -> None:  # noqa: ANN001 (Program)
    """Never overwrite a search silently: an OUT holding ``search.ckpt`` needs --resume or --force."""
    from ..lang.errors import UsageError
    from ..search.setup import out_dir_for

    if resume and force:
        raise UsageError("--resume continues the search in OUT, --force starts it over: pass one of them")
    from .._io import output_problem

    folder = out_dir_for(program, out)
    problem = output_problem(folder, folder=True)
    if problem is not None:
        raise UsageError(f"--out: {problem}")
    if not resume and not force and os.path.exists(os.path.join(folder, "search.ckpt")):
        raise UsageError(
            f"{folder} already holds a search (search.ckpt): pass --resume to continue it, --force to start over, "
            "or --out elsewhere"
        )


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        spec: Annotated[str, typer.Argument(help="the .vit spec to search")],
        budget: Annotated[
            list[str] | None,
            typer.Option("--budget", help="e.g. 3.3GFLOPs, 16Mparams, 70%, 8ms, 60%latency (repeatable)"),
        ] = None,
        data: Annotated[str | None, typer.Option("--data", help=DATA_HELP)] = None,
        data_dir: Annotated[str | None, typer.Option("--data-dir", help=DATA_DIR_HELP)] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", help="passes over the training data")] = None,
        steps: Annotated[
            int | None, typer.Option("--steps", help="stop after this many optimizer steps (0: no limit)")
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option("--batch-size", help="images per step (per process)")
        ] = None,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
        out: Annotated[
            str | None, typer.Option("--out", help="output folder (default runs/<spec-stem>)")
        ] = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/search.ckpt")] = False,
        force: Annotated[
            bool,
            typer.Option("--force", help="start over in an OUT that already holds a search (overwrites it)"),
        ] = False,
        seed: Annotated[
            int | None, typer.Option("--seed", help="seed of data order, gate noise and init")
        ] = None,
        init_checkpoint: Annotated[
            str | None, typer.Option("--init-checkpoint", help="dense timm state dict to start from")
        ] = None,
        convention: Annotated[str | None, typer.Option("--convention", help="paper | exact")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
        json_out: Annotated[
            bool,
            typer.Option("--json", help="print one JSON object with the result (no progress bar or tables)"),
        ] = False,
        lr: Annotated[
            str | None, typer.Option("--lr", help="learning rate of the weights (setting lr)")
        ] = None,
        weight_decay: Annotated[
            str | None, typer.Option("--weight-decay", help="AdamW weight decay (setting weight_decay)")
        ] = None,
        workers: Annotated[
            str | None, typer.Option("--workers", help="data-loader worker processes (setting workers)")
        ] = None,
        gate_lr: Annotated[str | None, typer.Option("--gate-lr", help="spvit: gate learning rate")] = None,
        precision: Annotated[
            str | None,
            typer.Option(
                "--precision", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (setting precision)"
            ),
        ] = None,
        warmup_epochs: Annotated[
            str | None,
            typer.Option("--warmup-epochs", help="spvit: weight-only epochs before the gates learn"),
        ] = None,
        threads: ThreadsOpt = None,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="any setting of the spec's strategy, KEY=VALUE (repeatable), e.g. --set arch_lr=0.1",
            ),
        ] = None,
    ) -> None:
        """Search the spec's space for its budget and write the frozen spec, checkpoint, metrics and report."""
        from ..search.loop import SearchInterrupted, check_latency_space, run_search
        from ..search.setup import check_searchable, parse_setting
        from ._common import err, latency_table, warn
        from ._common import out as console

        rank0 = int(os.environ.get("RANK", "0")) == 0
        set_threads(threads)
        program = _quiet_program(spec, convention, budget)
        check_searchable(program)  # refuse before the compiler's warnings repeat the same point
        _check_out(program, out, resume, force)
        named = {"lr": lr, "weight_decay": weight_decay, "workers": workers, "gate_lr": gate_lr}
        named |= {"warmup_epochs": warmup_epochs, "precision": precision}
        texts = [(f"--{k.replace('_', '-')}", f"{k}={v}") for k, v in named.items() if v is not None]
        texts += [("--data-dir", f'data_dir="{data_dir}"')] if data_dir is not None else []
        texts += [("--set", t) for t in set_ or []]
        settings = dict(parse_setting(program, text, flag) for flag, text in texts)
        if rank0:
            warn(program)
        check_latency_space(program)  # before measuring a table it would not use
        table = latency_table(program, quiet=quiet or json_out or not rank0)
        program = program.with_latency(table)  # a share of the dense latency becomes milliseconds here
        if table is not None and rank0:
            top = table.arch_ms(program.space.geometry, program.space.largest())
            for b in program.budgets:
                if b.metric == "latency" and b.absolute >= top:
                    err.print(
                        f"warning: budget latency <= {b.limit.text} is at or above the largest network's predicted "
                        f"{top:.3g} ms on {program.latency.describe()}: every network of the space meets it",
                        markup=False,
                    )
        try:
            result = run_search(
                program,
                data=data,
                epochs=epochs,
                steps=steps,
                batch_size=batch_size,
                device=device,
                out=out,
                resume=resume,
                seed=seed,
                init_checkpoint=init_checkpoint,
                quiet=quiet or json_out or not rank0,
                settings=settings,
                latency=table,
            )
        except SearchInterrupted as exc:
            if rank0:
                err.print(str(exc), markup=False)
            raise typer.Exit(130) from None
        if not rank0:
            return
        if json_out:
            print(json.dumps(result_json(result), sort_keys=True))
            return
        for table in summary_tables(result, program):
            console.print(table)
        thresholds = result.info.get("thresholds")
        if isinstance(thresholds, dict) and thresholds:  # dimap: what the bisection ended at
            shown = ", ".join(f"{k} {v:.3g}" for k, v in thresholds.items() if isinstance(v, float))
            console.print(
                f"every module keeps {float(result.info.get('kept_fraction', 0)):.1%} of its weights; "
                f"LAMP thresholds: {shown}",
                markup=False,
            )
        console.print(f"frozen spec: {result.frozen_path}")
        if program.latency is not None:  # the budget was a prediction: how to measure it
            where = program.latency
            flags = f" --threads {where.threads}" if where.threads else ""
            console.print(
                f"measure it: spvit-dsl bench {result.frozen_path} --predict --device {where.device}{flags} "
                f"--batch-size {where.batch}",
                markup=False,
            )
        console.print(
            f"checkpoint: {result.checkpoint_path}; metrics: {result.metrics_path}; report: {result.report_path}"
        )


def result_json(result: Any) -> dict[str, Any]:
    """``search --json``: the outputs' paths, the frozen point's costs and every budget, with their units."""
    notice = result.info.get("notice")
    return {
        "frozen_spec": result.frozen_path,
        "checkpoint": result.checkpoint_path,
        "metrics": result.metrics_path,
        "report": result.report_path,
        "epochs": result.epochs,
        "steps": result.steps,
        "val_top1": None if result.val_accuracy is None else 100.0 * result.val_accuracy,
        "costs": dict(result.costs),
        "budgets": [
            {k: b[k] for k in ("metric", "text", "limit", "achieved", "ratio")} for b in result.budgets
        ],
        "notice": notice if isinstance(notice, str) else None,
        "units": {
            "costs": "flops_*: multiply-adds; params: parameters; latency_ms: predicted milliseconds per batch",
            "budgets": "limit and achieved in the metric's unit (multiply-adds, parameters or milliseconds); "
            "ratio achieved/limit",
            "val_top1": "%",
        },
    }


def _quiet_program(spec: str, convention: str | None, budget: list[str] | None) -> Any:
    """Ranks other than 0 compile without printing the warnings again."""
    from ..compile.program import compile_file
    from ._common import limits, parse_convention

    return compile_file(spec, convention=parse_convention(convention), budgets=limits(budget))
