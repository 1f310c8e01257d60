"""``spvit-dsl latency``: build (or read from the cache) this device's latency table for a spec, and print what it
predicts. Imports torch lazily (measuring needs it; the prediction itself is pure Python)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ..lang.errors import UsageError

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
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="measure again even when the table is cached")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Measure this device's latency table for the spec's space (cached) and print its predictions."""
    from ..compile.program import compile_file
    from ..space.units import fmt_ms
    from ._common import latency_table, out

    program = compile_file(spec)  # the compiler's warnings concern the search, not what a table measures
    setting = setting_of(program, device, threads, batch_size, precision)
    table = latency_table(program, setting, quiet=json_out, rebuild=rebuild)
    g = program.space.geometry
    dense = table.arch_ms(g, program.space.dense()) if _dense_in(program) else None
    largest = table.arch_ms(g, program.space.largest())
    limits = [b for b in program.budgets if b.metric == "latency"]
    info = {
        "spec": program.path,
        "setting": setting.as_dict(),
        "dense_measured_ms": round(table.dense_ms, 4),
        "dense_predicted_ms": None if dense is None else round(dense, 4),
        "largest_predicted_ms": round(largest, 4),
        "budget_ms": min((b.absolute for b in limits), default=None),
        "environment": table.environment,
        "units": {"*_ms": f"milliseconds per forward of {setting.batch} images"},
    }
    if json_out:
        print(json.dumps(info, sort_keys=True))
        return
    out.print(f"{g.model} on {setting.describe()}", markup=False)
    out.print(f"  dense network: measured {fmt_ms(table.dense_ms)}", markup=False)
    if dense is not None:
        out.print(f"  dense network: predicted {fmt_ms(dense)}", markup=False)
    what = "this network" if program.frozen else "the largest network of the space"
    out.print(f"  {what}: predicted {fmt_ms(largest)}", markup=False)
    for b in limits:
        out.print(f"  budget latency <= {b.limit.text}: {b.absolute / largest:.0%} of {what}", markup=False)


def _dense_in(program: Any) -> bool:
    """Whether the table measured the dense network's widths (a frozen spec's table measures only its point)."""
    g = program.space.geometry
    return all(g.stage_dim(s) in program.space.embed[s] for s in range(g.stages))


def register(app: typer.Typer) -> None:
    """Add ``latency`` to the CLI."""
    app.command("latency")(latency_cmd)
