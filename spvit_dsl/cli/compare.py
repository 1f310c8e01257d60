"""``spvit-dsl compare``: several strategies on one spec, budget, dense start and fine-tuning recipe; one table."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        spec: Annotated[str, typer.Argument(help="the .vit spec whose space every strategy searches")],
        strategies: Annotated[
            str,
            typer.Option(
                "--strategies", help="comma-separated strategies (spvit,upvit,ofb,dimap,magnitude,random)"
            ),
        ] = "spvit,upvit,ofb,dimap,magnitude,random",
        budget: Annotated[
            list[str] | None, typer.Option("--budget", help="e.g. 50%, 3.3GFLOPs, 16Mparams (repeatable)")
        ] = None,
        seeds: Annotated[int, typer.Option("--seeds", help="seeds per strategy (N: seeds 0..N-1)")] = 3,
        finetune_epochs: Annotated[
            int, typer.Option("--finetune-epochs", help="epochs of the shared fine-tuning recipe")
        ] = 40,
        finetune_lr: Annotated[float, typer.Option("--finetune-lr", help="its peak learning rate")] = 5e-4,
        dense_epochs: Annotated[
            int,
            typer.Option(
                "--dense-epochs", help="epochs of the dense start (0: start from the spec's weights)"
            ),
        ] = 40,
        search_epochs: Annotated[
            int | None,
            typer.Option(
                "--search-epochs", help="epochs of training strategies' searches (default: the spec's)"
            ),
        ] = None,
        search_steps: Annotated[
            int, typer.Option("--search-steps", help="stop each training search after N steps (0: no limit)")
        ] = 0,
        finetune_steps: Annotated[
            int, typer.Option("--finetune-steps", help="stop each fine-tuning after N steps (0: no limit)")
        ] = 0,
        latency_batch: Annotated[
            int, typer.Option("--latency-batch", help="batch size the latency is timed at")
        ] = 64,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
        out: Annotated[
            str | None, typer.Option("--out", help="output folder (default runs/<spec-stem>-compare)")
        ] = None,
        dimap: Annotated[
            str,
            typer.Option(
                "--dimap",
                help="sparse: DIMAP as in the paper (single weights, a sparse row); structured: on the spec's space",
            ),
        ] = "sparse",
        json_out: Annotated[
            bool, typer.Option("--json", help="print the whole of compare.json as one JSON object")
        ] = False,
    ) -> None:
        """Search (or score) the spec's space with every strategy under the same budget from the same dense start,
        fine-tune with the same recipe, evaluate and time; print one table and write compare.json, compare.md and
        compare.png. Re-running the same command continues an interrupted comparison (finished cells are kept)."""
        from rich.table import Table

        from ..compare import run_compare
        from ..compile.program import compile_file
        from ..lang.errors import UsageError
        from ..search.loop import SearchInterrupted
        from ._common import err, limits, warn
        from ._common import out as console

        for flag, value, least in (
            ("--latency-batch", latency_batch, 1),
            ("--search-steps", search_steps, 0),
            ("--finetune-steps", finetune_steps, 0),
        ):
            if value < least:
                raise UsageError(f"{flag} must be at least {least}, not {value}")
        if not 0 < finetune_lr < 1:
            raise UsageError(f"--finetune-lr must be a learning rate between 0 and 1, not {finetune_lr}")
        if search_epochs is not None and search_epochs < 1:
            raise UsageError(f"--search-epochs must be at least 1, not {search_epochs}")
        program = compile_file(spec, budgets=limits(budget))
        if program.latency is not None:
            raise UsageError(
                "compare budgets FLOPs or parameters; a latency budget is not supported by compare yet (every cell is "
                "timed side by side anyway): give --budget 50% or a FLOPs budget"
            )
        if not json_out and int(os.environ.get("RANK", "0")) == 0:
            warn(program)

        def say(line: str) -> None:
            if not json_out:
                err.print(line, markup=False)

        try:
            result = run_compare(
                program,
                strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                budgets=limits(budget),
                seeds=seeds,
                out=out,
                finetune_epochs=finetune_epochs,
                finetune_lr=finetune_lr,
                dense_epochs=dense_epochs,
                search_epochs=search_epochs,
                search_steps=search_steps,
                finetune_steps=finetune_steps,
                latency_batch=latency_batch,
                device=device,
                dimap=dimap,
                say=say,
            )
        except (KeyboardInterrupt, SearchInterrupted):
            err.print(
                "interrupted: finished cells are kept; run the same command again to continue", markup=False
            )
            raise typer.Exit(130) from None
        if not result.json_path:  # a rank other than 0 under torchrun: rank 0 reports
            return
        if json_out:
            with open(result.json_path, encoding="utf-8") as fh:
                print(json.dumps(json.load(fh), sort_keys=True))
            return
        from ..compare.report import HEADERS, table_rows

        table = Table(title=result.title)
        for h in HEADERS:
            table.add_column(h, justify="left" if h in ("method", "structure") else "right")
        for cells in table_rows(result.rows, result.dense, reasons=False):
            table.add_row(*cells)
        console.print(table)
        for row in result.rows:
            if row["status"] != "ok":
                console.print(f"{row['strategy']}: cannot search this space: {row['reason']}", markup=False)
        console.print(
            f"{result.computed} cell(s) computed"
            + (f", {result.cells - result.computed} read back" if result.cells > result.computed else "")
            + "; "
            f"table: {result.markdown_path}; data: {result.json_path}; picture: {result.plot_path}"
        )
