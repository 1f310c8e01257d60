"""``spvit-dsl latency``: build (or read from the cache) this device's latency table for a spec, and print what it
predicts. Imports torch lazily (measuring needs it; the prediction itself is pure Python)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ..lang.errors import UsageError
from ._common import BudgetOpt

DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda (default: the spec's, else cpu)")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="CPU threads (default: the spec's, else torch's)")
]
BatchOpt = Annotated[
    int | None, typer.Option("--batch-size", help="images per forward (default: the spec's, else 8)")
]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="fp32 | bf16 (default: the spec's, else fp32)")
]


def setting_of(
    program: Any, device: str | None, threads: int | None, batch_size: int | None, precision: str | None
) -> Any:
    """The spec's latency setting (defaults without one) with the flags applied; one-line errors for bad flags."""
    import dataclasses

    from ..space.latency import DEVICES, PRECISIONS, LatencySetting

    base = program.latency or LatencySetting()
    if device is not None and device not in DEVICES:
        raise UsageError(f"--device: expected {' or '.join(DEVICES)}, found '{device}'")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"--precision: expected {' or '.join(PRECISIONS)}, found '{precision}'")
    for flag, value, top in (("--threads", threads, 1024), ("--batch-size", batch_size, 4096)):
        if value is not None and not 1 <= value <= top:
            raise UsageError(f"{flag}: expected a whole number in 1..{top}, found {value}")
    changes = {"device": device, "threads": threads, "batch": batch_size, "precision": precision}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def latency_cmd(
    spec: Annotated[str, typer.Argument(help="a .vit spec (a space or a frozen spec)")],
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
    precision: PrecisionOpt = None,
    budget: BudgetOpt = None,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="measure again even when the table is cached")
    ] = False,
    recalibrate: Annotated[
        bool,
        typer.Option(
            "--recalibrate",
            help="time the cached table's calibration networks again (a fraction of --rebuild's time): the machine's speed now, the "
            "blocks' entries kept",
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Measure this device's latency table for the spec's space (cached) and print its predictions, and whether each
    latency budget (the spec's, or --budget's, as search would take it) can be met."""
    from ..compile.program import compile_file
    from ..space.latency import UNSTEADY
    from ..space.units import fmt_ms
    from ._common import err, frozen_price, out
    from ._common import limits as flag_limits

    if rebuild and recalibrate:
        raise UsageError(
            "--rebuild measures the whole table, calibration included: give one of --rebuild, --recalibrate"
        )
    # the compiler's warnings concern the search, not what a table measures
    flagged = flag_limits(budget)
    for typed, limit in zip(budget or [], flagged, strict=True):
        if limit.metric != "latency":  # e.g. a bare 50%: a FLOPs budget, which no latency table checks
            raise UsageError(
                f"--budget {typed}: a {limit.metric} budget; `latency` checks latency budgets only: write "
                "milliseconds (--budget 8ms) or a share of the dense network's latency (--budget 60%latency)"
            )
    program = compile_file(spec, budgets=flagged)
    setting = setting_of(program, device, threads, batch_size, precision)
    # a frozen network is priced by its searched space's table, as its search and `bench --predict` price it
    table, largest, source, note = frozen_price(
        program,
        spec,
        setting,
        lambda t: t.arch_ms(program.space.geometry, program.space.largest()),
        quiet=json_out,
        rebuild=rebuild,
        recalibrate=recalibrate,
    )
    if note and not json_out:
        err.print(f"note: {note}", markup=False)
    program = program.with_latency(table)
    g = program.space.geometry
    fastest = table.fastest_ms(program.space)
    limits = [b for b in program.budgets if b.metric == "latency"]
    info = {
        "spec": program.path,
        "table_of": source or program.path,
        "setting": setting.as_dict(),
        "dense_measured_ms": round(table.dense_ms, 4) if table.dense_ms > 0 else None,
        "largest_predicted_ms": round(largest, 4),
        "fastest_predicted_ms": round(fastest, 4),
        "budget_ms": min((b.absolute for b in limits), default=None),
        "budget_feasible": all(b.absolute >= (largest if program.frozen else fastest) for b in limits),
        "unsteady": table.spread > UNSTEADY,
        "environment": table.environment,
        "units": {"*_ms": f"milliseconds per forward of {setting.batch} images"},
    }
    if json_out:
        print(json.dumps(info, sort_keys=True))
        return
    when, again = table.environment.get("measured_at"), table.environment.get("calibrated_at")
    stamp = (f" (table measured {when}" + (f", calibrated {again}" if again else "") + ")") if when else ""
    out.print(f"{g.model} on {setting.describe()}{stamp}", markup=False)
    if source:
        out.print(f"  priced with the table of {source}, the spec it was searched from", markup=False)
    if table.dense_ms > 0:
        out.print(
            f"  dense network: measured {fmt_ms(table.dense_ms)} (the table is calibrated on it)",
            markup=False,
        )
    else:  # a frozen spec with a narrower embedding: the table times its own widths only
        out.print(
            "  dense network: not measured (this table times the spec's embedding widths only; run latency on the "
            "searched space's spec for the dense network)",
            markup=False,
        )
    if program.frozen:
        out.print(f"  this network: predicted {fmt_ms(largest)}", markup=False)
    else:
        out.print(
            f"  the space: predicted {fmt_ms(fastest)} (fastest network) to {fmt_ms(largest)} (largest)",
            markup=False,
        )
    for b in limits:
        if program.frozen:  # one network: its own prediction decides
            verdict = (
                f"met ({largest / b.absolute:.0%} of it)"
                if largest <= b.absolute
                else f"not met: this network is predicted at {fmt_ms(largest)}"
            )
        elif b.absolute < fastest:
            verdict = f"cannot be met: below the fastest network's {fmt_ms(fastest)}"
        elif b.absolute >= largest:
            verdict = "at or above the largest network: every network meets it"
        else:
            verdict = f"{b.absolute / largest:.0%} of the largest network"
        out.print(f"  budget {b.describe()}: {verdict}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``latency`` to the CLI."""
    app.command("latency")(latency_cmd)
