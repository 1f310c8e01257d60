"""The ``spvit-dsl search`` command (CLI of the search stage); torch is imported only inside the command body.

``spvit-dsl search SPEC [--budget ...] [--data ...] [--epochs N] [--steps N] [--batch-size N] [--device ...]
[--out DIR] [--resume] [--seed N] [--init-checkpoint FILE] [--quiet]``: flags override the spec's search settings,
``--budget`` replaces the spec's budget of the same metric. Under ``torchrun`` every process runs this command;
only rank 0 prints and writes.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

__all__ = ["register", "summary_tables"]


def summary_tables(result: Any, program: Any) -> list[Any]:
    """The final summary: per-block choices, then achieved cost against every budget."""
    from rich.table import Table

    from ..space.units import fmt_macs, fmt_params

    blocks = Table(title="searched architecture", title_justify="left")
    for col in ("block", "attention", "ffn kept", "of"):
        blocks.add_column(col, justify="right" if col != "attention" else "left")
    for p, b in zip(program.space.plans, result.arch.blocks, strict=True):
        blocks.add_row(str(p.geom.index), b.op, str(b.ffn), str(p.geom.hidden))
    costs = Table(
        title=f"cost ({program.convention} convention for budgets; FLOPs are multiply-adds)",
        title_justify="left",
    )
    for col in ("metric", "achieved", "budget", "ratio"):
        costs.add_column(col, justify="right")
    for b in result.budgets:
        fmt = fmt_macs if b["metric"] == "flops" else fmt_params
        costs.add_row(
            b["metric"], fmt(b["achieved"]), f"{fmt(b['limit'])} ({b['text']})", f"{b['ratio']:.2%}"
        )
    costs.add_row("flops (paper)", fmt_macs(result.costs["flops_paper"]), "", "")
    costs.add_row("flops (exact)", fmt_macs(result.costs["flops_exact"]), "", "")
    costs.add_row("params", fmt_params(result.costs["params"]), "", "")
    return [blocks, costs]


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        spec: Annotated[str, typer.Argument(help="the .vit spec to search")],
        budget: Annotated[
            list[str] | None, typer.Option("--budget", help="e.g. 3.3GFLOPs, 16Mparams, 70% (repeatable)")
        ] = None,
        data: Annotated[
            str | None, typer.Option("--data", help="digits | synthetic | a folder with train/ and val/")
        ] = None,
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
        seed: Annotated[
            int | None, typer.Option("--seed", help="seed of data order, gate noise and init")
        ] = None,
        init_checkpoint: Annotated[
            str | None, typer.Option("--init-checkpoint", help="dense timm state dict to start from")
        ] = None,
        convention: Annotated[str | None, typer.Option("--convention", help="paper | exact")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    ) -> None:
        """Search the spec's space for its budget and write the frozen spec, checkpoint, metrics and report."""
        from ..search.loop import SearchInterrupted, run_search
        from ..search.setup import check_searchable
        from ._common import err, warn
        from ._common import out as console

        rank0 = int(os.environ.get("RANK", "0")) == 0
        program = _quiet_program(spec, convention, budget)
        check_searchable(program)  # refuse before the compiler's warnings repeat the same point
        if rank0:
            warn(program)
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
                quiet=quiet or not rank0,
            )
        except SearchInterrupted as exc:
            if rank0:
                err.print(str(exc), markup=False)
            raise typer.Exit(130) from None
        if not rank0:
            return
        for table in summary_tables(result, program):
            console.print(table)
        console.print(f"frozen spec: {result.frozen_path}")
        console.print(
            f"checkpoint: {result.checkpoint_path}; metrics: {result.metrics_path}; report: {result.report_path}"
        )


def _quiet_program(spec: str, convention: str | None, budget: list[str] | None) -> Any:
    """Ranks other than 0 compile without printing the warnings again."""
    from ..compile.program import compile_file
    from ._common import limits, parse_convention

    return compile_file(spec, convention=parse_convention(convention), budgets=limits(budget))
