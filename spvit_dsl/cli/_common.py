"""Shared pieces of the command modules: consoles, flag parsing, compiling a spec with its warnings printed.

Every command module imports from here (never from another command module), so the command groups stay independent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.console import Console

from ..lang.errors import UsageError
from ..space.units import Limit, UnitError, parse_budget_flag

if TYPE_CHECKING:
    from ..space.geometry import Convention

__all__ = [
    "BudgetOpt",
    "ConventionOpt",
    "err",
    "latency_table",
    "limits",
    "load_program",
    "out",
    "parse_convention",
    "warn",
]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConventionOpt = Annotated[
    str | None, typer.Option("--convention", help="paper | exact (default: the spec's, else paper)")
]
BudgetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--budget",
        help="e.g. 3.3GFLOPs, 16Mparams, 70%, 8ms, 60%latency (repeatable; replaces the spec's budget of that metric)",
    ),
]


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="torch CPU threads (default: torch's, one per core; fewer when other jobs share the machine, which "
        "otherwise slows small networks many times over)",
    ),
]


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (1..1024) to torch; a one-line error otherwise; nothing when not given."""
    if threads is None:
        return
    if not 1 <= threads <= 1024:
        raise UsageError(f"--threads: expected a whole number in 1..1024, found {threads}")
    import torch

    torch.set_num_threads(threads)


DATA_HELP = "digits | synthetic | an image folder | torch/NAME, hfds/NAME, wds/NAME with --data-dir (default: the spec's)"
DATA_DIR_HELP = (
    "the root of a torch/, hfds/ or wds/ dataset (timm's --data-dir; default: the spec's data_dir)"
)


def limits(budgets: list[str] | None) -> list[Limit]:
    try:
        return [parse_budget_flag(b) for b in budgets or []]
    except UnitError as exc:
        raise UsageError(f"--budget: {exc}" + (f" ({exc.hint})" if exc.hint else "")) from None


def parse_convention(value: str | None) -> Convention | None:
    if value not in (None, "paper", "exact"):
        raise UsageError(f"--convention: expected 'paper' or 'exact', found '{value}'")
    return cast("Convention | None", value)  # checked just above


def warn(program: Any) -> None:
    for w in program.warnings:
        err.print(w.render(), markup=False)


def load_program(spec: str, convention: str | None = None, budgets: list[str] | None = None) -> Any:
    from ..compile.program import compile_file

    program = compile_file(spec, convention=parse_convention(convention), budgets=limits(budgets))
    warn(program)
    return program


def frozen_price(
    program: Any,
    path: str,
    setting: Any,
    price: Callable[[Any], float],
    *,
    quiet: bool = False,
    rebuild: bool = False,
    recalibrate: bool = False,
) -> tuple[Any, float, str, str]:
    """Price a frozen spec's network (``price(table)``, milliseconds) as its search priced it: with the table of the
    space it was searched in (:func:`source_of`). When that spec is gone or no longer compiles, its space cannot be
    tabled, or the network left its widths (``--round auto``), with the frozen network's own table instead. Returns
    ``(table, ms, source, note)``: ``source`` is the spec whose table priced it ("" for its own), ``note`` the one
    line saying why its own table did ("" otherwise); ``latency`` and ``bench --predict`` print it."""
    flags = {"quiet": quiet, "rebuild": rebuild, "recalibrate": recalibrate}
    searched, found = (program.checked.frozen or {}).get("source") if program.frozen else None, ""
    note = ""
    if searched:
        space_program, found = source_of(program, path)
        if not found:
            note = (
                f"the spec this network was searched from ({searched}) was not found or does not compile (looked "
                f"for as written and beside {path})"
            )
        else:
            try:
                table = latency_table(space_program, setting, **flags)
                return table, price(table), found, ""
            except (KeyError, UsageError) as exc:
                # KeyError: widths outside that space (--round auto); UsageError: a space it cannot table (a Swin
                # space with more than 16 stage-width combinations)
                note = f"the table of {found} cannot price this network ({exc.args[0]})"
        note += ": priced with the frozen network's own table, which may differ from the one its search used"
    table = latency_table(program, setting, **flags)
    return table, price(table), "", note


def source_of(program: Any, path: str) -> tuple[Any, str]:
    """A frozen spec's searched space: the program of its ``source`` (absolute since searches record it so; a
    relative one beside ``path`` first, then from the working folder; else that file name beside ``path``) and the file
    found; ``(program, "")`` when the spec is not frozen, names no source, or the source is gone
    or no longer compiles."""
    import os

    from ..compile.program import compile_file
    from ..lang.errors import SpvitError

    source = str((program.checked.frozen or {}).get("source", "")) if program.frozen else ""
    if source:
        beside = os.path.dirname(path)
        # (an absolute source joins to itself: each file is tried once)
        for candidate in dict.fromkeys(
            (os.path.join(beside, source), source, os.path.join(beside, os.path.basename(source)))
        ):
            if os.path.isfile(candidate):
                try:
                    return compile_file(candidate), candidate
                except SpvitError:
                    continue
    return program, ""


def latency_table(
    program: Any,
    setting: Any = None,
    *,
    quiet: bool = False,
    rebuild: bool = False,
    space: Any = None,
    recalibrate: bool = False,
) -> Any:
    """The device's latency table for ``program``'s space (or ``space``; ``setting``: default the spec's), from the
    cache or measured with a progress bar on stderr; one line says which, and one more when its timings were
    unsteady. ``recalibrate``: a cached table's calibration is timed again (a fraction of a rebuild) and the line says how far the
    machine's speed moved. ``None`` when there is nothing to price."""
    setting = setting or program.latency
    if setting is None:
        return None
    space = space if space is not None else program.space
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..compact.latency import table_for

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank would measure at once
            if recalibrate or rebuild:
                raise UsageError(
                    "latency table: under torchrun the ranks only read the cache; rebuild or recalibrate it first: "
                    f"spvit-dsl latency {program.path}"
                )
            try:
                table, _, _ = table_for(space, setting, cached_only=True)
            except RuntimeError as exc:
                raise UsageError(
                    f"latency table: {exc}; under torchrun, build it first: spvit-dsl latency {program.path}"
                ) from None
            return table
        if quiet:
            table, path, measured = table_for(space, setting, rebuild=rebuild, recalibrate_cached=recalibrate)
        else:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rounds"),
                TimeRemainingColumn(),
                console=err,
                transient=True,
                disable=not err.is_terminal,  # a transient bar leaves only a blank line in a log
            ) as bar:
                task = bar.add_task(f"latency table ({setting.describe()})", total=None)

                def show(done: int, total: int, what: str) -> None:  # what: a block kind, or "calibration"
                    bar.update(
                        task,
                        completed=done,
                        total=total,
                        description=f"latency table ({setting.describe()}): {what}",
                    )

                table, path, measured = table_for(
                    space, setting, rebuild=rebuild, progress=show, recalibrate_cached=recalibrate
                )
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"latency table: {exc}") from None
    if not quiet:
        _say_where(table, setting, path, measured, recalibrate and not rebuild)
        warn_unsteady(table)
    return table


def _say_where(table: Any, setting: Any, path: Any, measured: bool, recalibrated: bool) -> None:
    """The line that says where a latency table came from; after a recalibration, one more: how far it moved."""
    from ..space.units import fmt_ms

    when = table.environment.get("measured_at")
    if measured:
        verb = (
            "no readable table was cached to recalibrate: measured whole and cached at"
            if recalibrated
            else "measured and cached at"
        )
    elif recalibrated:
        verb = f"from the cache (measured {when}), calibrated again now,"
    else:
        verb = f"from the cache (measured {when})," if when else "from the cache,"
    err.print(f"latency table for {setting.describe()}: {verb} {path}", markup=False)
    before = table.environment.get("dense_ms_before_recalibration") or 0.0
    if recalibrated and not measured and before > 0 and table.dense_ms > 0:
        moved = table.dense_ms / before - 1
        how = _moved(moved)
        err.print(
            f"the dense network now takes {fmt_ms(table.dense_ms)}, {how} at the last calibration "
            f"({fmt_ms(before)}); the predictions follow the new factors",
            markup=False,
        )


def _moved(moved: float) -> str:
    """How a time changed (``moved``: new / old − 1) in words no one reads two ways ("66% faster" could mean 1.66×
    the speed or two thirds of the time)."""
    if abs(moved) < 0.005:
        return "as long as"
    if moved > 0:
        return f"{moved:.0%} longer than"
    return f"{-moved:.0%} less time ({1 / (1 + moved):.2g}x the speed) than"


def _others(n: float) -> str:
    """``n`` other process(es), in words."""
    return f"{n:g} other process" + ("" if n == 1 else "es")


def warn_unsteady(table: Any) -> None:
    """One line when a latency table was measured on a busy machine (its rounds spread widely)."""
    from ..space.latency import UNSTEADY

    others = table.environment.get("others_running")
    again = table.environment.get("calibration_others_running")
    if others is None and again is not None:
        err.print(
            f"warning: the latency table was recalibrated on a busy machine ({_others(again)} running on "
            f"{table.environment.get('cores', '?')} cores): recalibrate it again on an idle machine with "
            "'spvit-dsl latency SPEC --recalibrate'",
            markup=False,
        )
    elif others is not None:
        err.print(
            f"warning: the latency table was measured on a busy machine ({_others(others)} running on "
            f"{table.environment.get('cores', '?')} cores): its milliseconds may be many times the idle ones; "
            "measure it again on an idle machine with 'spvit-dsl latency SPEC --rebuild' (fewer --threads than free "
            "cores also helps)",
            markup=False,
        )
    elif table.spread > UNSTEADY:
        err.print(
            f"warning: the latency table's timings were unsteady (rounds spread {table.spread:.0%} around their "
            "median): something else was using the cores; measure it again on an idle machine with "
            "'spvit-dsl latency SPEC --rebuild' (fewer --threads than cores also steadies it)",
            markup=False,
        )
