"""Commands on frozen networks: ``spvit-dsl build | export | bench`` (registered into :mod:`spvit_dsl.cli.app`).

Each command takes a frozen ``.vit`` spec (or, for ``export`` and ``bench``, a model file written by ``build``) and
imports torch only inside its body, so ``spvit-dsl compile`` stays instant. User mistakes raise
:class:`~spvit_dsl.lang.errors.UsageError` (``error: ...``, exit 1). Later commands on frozen networks (fine-tune,
evaluation) belong here too: one section each, their work in library modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from .._io import input_problem
from ..lang.errors import UsageError
from ..space.units import fmt_macs, fmt_params
from ._common import DATA_DIR_HELP, DATA_HELP, ThreadsOpt, err, out, set_threads

__all__ = ["register"]


FrozenArg = Annotated[
    str, typer.Argument(help="a frozen .vit spec (or a model .safetensors written by 'build')")
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="search.ckpt (or a supernet .safetensors) | pretrained | a dense checkpoint | none "
        "(default: the spec's weights)",
    ),
]
RoundOpt = Annotated[
    str | None,
    typer.Option(
        "--round",
        help="N: round every FFN width to the nearest multiple of N (never above the dense width); auto: to the "
        "widths this device runs fastest for their FLOPs (measures a latency table, cached)",
    ),
]


# ---------------------------------------------------------------- shared helpers


def _model(frozen: str, weights: str | None, round_to: int | str | None, masks: str | None = None):
    """A compact model from a frozen .vit (built) or a built .safetensors (loaded)."""
    from ..compact.build import build, frozen_program, load

    problem = input_problem(frozen)
    if problem:
        raise UsageError(problem)
    if frozen.endswith(".safetensors"):
        if round_to is not None or masks is not None:
            raise UsageError(
                "--round and --masks apply when building from a frozen .vit, not to a built model"
            )
        return load(frozen, weights)
    if (
        round_to == "auto"
    ):  # measure (or read) the table of the widths in reach first: its progress and one line
        _rounding_table(frozen_program(frozen), quiet=False)
    return build(frozen, weights=weights, masks=masks, round_to=round_to)  # type: ignore[arg-type]


def _rounding_table(program: Any, *, quiet: bool) -> Any:
    """The latency table ``--round auto`` chooses widths from for a frozen program (measured once, then cached)."""
    from ..compact.build import latency_setting_of
    from ..compile.freeze import arch_of
    from ..space.latency import rounding_space
    from ._common import latency_table

    space = rounding_space(program.space, arch_of(program.checked))
    return latency_table(program, latency_setting_of(program), quiet=quiet, space=space)


def _check_round(round_to: str | None) -> int | str | None:
    """``--round``'s value: ``auto``, a positive integer, or ``None``; one-line error otherwise."""
    if round_to is None or round_to == "auto":
        return round_to
    try:
        n = int(round_to)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--round: expected a positive integer or auto, found '{round_to}'")
    return n


def _costs(model) -> dict[str, Any]:
    from ..space import cost

    g, a = model.spvit_geometry, model.spvit_arch
    dense = cost.dense_arch(g)
    return {
        conv: {"flops": cost.arch_cost(g, a, conv).macs, "dense_flops": cost.arch_cost(g, dense, conv).macs}
        for conv in ("paper", "exact")
    } | {
        "params": cost.arch_cost(g, a, "exact").params,
        "dense_params": cost.arch_cost(g, dense, "exact").params,
    }


def _rounding_rows(program: Any, model, table: Any = None) -> list[tuple[str, str, str]] | None:
    """Before/after rows of a rounded build: FLOPs (paper, exact), params, and with ``--round auto`` (``table``: its
    rounding table) the predicted latency."""
    from ..compile.freeze import arch_of
    from ..space import cost

    g, before, after = program.space.geometry, arch_of(program.checked), model.spvit_arch
    rows = []
    for conv in ("paper", "exact"):
        b, a = cost.arch_cost(g, before, conv).macs, cost.arch_cost(g, after, conv).macs
        rows.append((f"FLOPs ({conv})", fmt_macs(b), f"{fmt_macs(a)} ({(a - b) / b:+.2%})"))
    b, a = cost.arch_cost(g, before, "exact").params, cost.arch_cost(g, after, "exact").params
    rows.append(("params", fmt_params(b), f"{fmt_params(a)} ({(a - b) / b:+.2%})"))
    if table is not None:  # the prediction the widths were chosen by
        b, a = table.arch_ms(g, before), table.arch_ms(g, after)
        rows.append(("latency (predicted)", f"{b:.3g} ms", f"{a:.3g} ms ({(a - b) / b:+.2%})"))
    return rows


# ---------------------------------------------------------------- build
def build_cmd(
    frozen: Annotated[str, typer.Argument(help="the frozen .vit spec")],
    out_path: Annotated[str, typer.Option("--out", "-o", help="where to write the model (.safetensors)")],
    weights: WeightsOpt = None,
    masks: Annotated[
        str | None,
        typer.Option(
            "--masks",
            help="with dense --weights: take the kept units of every group from this search checkpoint",
        ),
    ] = None,
    round_to: RoundOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Build the compact network of a frozen spec and save it (safetensors + the frozen spec in its metadata)."""
    from ..compact.build import save

    rounding = _check_round(round_to)
    if not out_path.endswith(".safetensors"):
        raise UsageError(f"--out: expected a .safetensors path, found '{out_path}'")
    _check_output("--out", out_path)
    if frozen.endswith(".safetensors"):
        raise UsageError(f"{frozen} is already a built model; 'build' takes a frozen .vit spec")
    model = _model(frozen, weights, rounding, masks)  # refuses a missing or unfrozen spec in one line first
    from ..compact.build import frozen_program
    from ._common import warn

    program = frozen_program(frozen)
    warn(program)  # e.g. a ViT whose class token never reads the image (no msa block)
    save(model, out_path)
    counted = sum(p.numel() for p in model.parameters())
    info = {
        "model": out_path,
        "spec": frozen,
        "weights": model.spvit_weights,
        "round": rounding,
        "params_counted": counted,
        **_costs(model),
        "embed": list(model.spvit_arch.embed),
        "sparse": model.spvit_arch.sparse,
        "blocks": [
            {"op": b.op, "ffn": b.ffn, "heads": b.heads, "head_dim": b.head_dim, "density": vars(b.density)}
            for b in model.spvit_arch.blocks
        ],
        "units": {
            "flops": "multiply-adds",
            "params": "parameters",
            "density": "kept fraction of a layer's weights",
        },
    }
    table = _rounding_table(program, quiet=True) if rounding == "auto" else None  # read from the cache
    if rounding:
        _warn_rounding_over_budget(program, model, rounding, table)
    if json_out:
        print(json.dumps(info))
        return
    _print_build(info, _rounding_rows(program, model, table) if rounding else None)


def _warn_rounding_over_budget(program: Any, model: Any, round_to: int | str, table: Any = None) -> None:
    """One line on stderr per budget of the frozen spec that rounding the widths up pushed the network over
    (``table``: the rounding table of ``--round auto``)."""
    from ..compile.freeze import arch_of
    from ..space import cost

    c = cost.arch_cost(program.space.geometry, model.spvit_arch, program.convention)
    for b in program.budgets:
        if b.limit.metric == "latency":
            if table is not None:  # kept by construction on the rounding table, unless it starts over
                g = program.space.geometry
                after, before = table.arch_ms(g, model.spvit_arch), table.arch_ms(g, arch_of(program.checked))
                if after > b.absolute:
                    err.print(
                        f"warning: --round auto: the rounded network is predicted at {after:.3g} ms, over the budget "
                        f"latency <= {b.limit.text}, by the table rounding measured (the unrounded network: "
                        f"{before:.3g} ms on it); the search's table, measured at another time, had it within the "
                        "budget: rebuild both on an idle machine ('spvit-dsl latency SPEC --rebuild')",
                        markup=False,
                    )
            continue  # --round N is not priced in time
        value = c.macs if b.limit.metric == "flops" else c.params
        if value > b.absolute:
            err.print(
                f"warning: --round {round_to} puts {b.limit.metric} at {value / b.absolute:.1%} of the budget "
                f"{b.limit.metric} <= {b.limit.text}; build without --round, or round a search run with a "
                "tighter budget",
                markup=False,
            )


def _print_build(info: dict[str, Any], rounding: list[tuple[str, str, str]] | None) -> None:
    out.print(f"built [bold]{info['spec']}[/] → [cyan]{info['model']}[/] (weights: {info['weights']})")
    out.print(f"attention: {' '.join(b['op'] for b in info['blocks'])}")
    out.print(f"ffn widths: {' '.join(str(b['ffn']) for b in info['blocks'])}")
    table = Table(title="cost (FLOPs are multiply-adds)", title_justify="left")
    for col in ("", "compact", "dense", "ratio"):
        table.add_column(col, justify="right")
    sparse = info["params_counted"] != info["params"]
    for conv in ("paper", "exact"):
        c = info[conv]
        table.add_row(
            f"FLOPs ({conv}{', non-zero weights' if sparse else ''})",
            fmt_macs(c["flops"]),
            fmt_macs(c["dense_flops"]),
            f"{c['flops'] / c['dense_flops']:.1%}",
        )
    table.add_row(
        "params (non-zero)" if sparse else "params",
        fmt_params(info["params"]),
        fmt_params(info["dense_params"]),
        f"{info['params'] / info['dense_params']:.1%}",
    )
    if sparse:  # sparse layers are stored dense with their zeros in place
        table.add_row(
            "params (stored)",
            fmt_params(info["params_counted"]),
            fmt_params(info["dense_params"]),
            f"{info['params_counted'] / info['dense_params']:.1%}",
        )
    out.print(table)
    if rounding:
        t = Table(
            title=f"--round {info['round']}: FFN widths "
            + (
                "moved to the fastest measured widths"
                if info["round"] == "auto"
                else "rounded to the nearest multiple"
            ),
            title_justify="left",
        )
        for col in ("", "before", "after"):
            t.add_column(col, justify="right")
        for row in rounding:
            t.add_row(*row)
        out.print(t)


# ---------------------------------------------------------------- export
def export_cmd(
    frozen: FrozenArg,
    weights: WeightsOpt = None,
    onnx: Annotated[str | None, typer.Option("--onnx", help="write an ONNX model here")] = None,
    torchscript: Annotated[
        str | None, typer.Option("--torchscript", help="write a traced TorchScript module here")
    ] = None,
    round_to: RoundOpt = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version")] = 17,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="compare the ONNX model with PyTorch in onnxruntime")
    ] = True,
) -> None:
    """Export a compact network to ONNX (batch size dynamic) and/or TorchScript."""
    from ..compact.export import export_onnx, export_torchscript, onnx_max_error

    rounding = _check_round(round_to)
    if not onnx and not torchscript:
        raise UsageError("nothing to export: give --onnx PATH and/or --torchscript PATH")
    for flag, target in (("--onnx", onnx), ("--torchscript", torchscript)):
        if target:
            _check_output(flag, target)
    model = _model(frozen, weights, rounding).eval()
    if onnx:
        export_onnx(model, onnx, opset=opset)
        out.print(f"ONNX written to {onnx}")
        if check:
            max_err = onnx_max_error(model, onnx)
            out.print(
                f"onnxruntime vs PyTorch: max |difference| {max_err:.2e}"
                if max_err is not None
                else "onnxruntime is not installed: output not checked"
            )
    if torchscript:
        export_torchscript(model, torchscript)
        out.print(f"TorchScript written to {torchscript}")


# ---------------------------------------------------------------- bench
def bench_cmd(
    frozen: FrozenArg,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", help="weights to build with (default: none; speed does not depend on them)"
        ),
    ] = None,
    vs_dense: Annotated[
        bool, typer.Option("--vs-dense/--no-vs-dense", help="time the dense backbone too")
    ] = True,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto")] = "auto",
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="images per forward (default: the spec's latency budget's, else 8)"
        ),
    ] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="timed forwards (the median is reported)")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed forwards first")] = 3,
    min_seconds: Annotated[
        float,
        typer.Option(
            "--min-seconds",
            help="keep timing past --repeats until the timed rounds span this many seconds, at most "
            "8x --repeats rounds (a machine whose speed swings within seconds then shows its "
            "average); 0: exactly --repeats",
        ),
    ] = 10.0,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="torch CPU threads (0: torch's default; default: the spec's latency budget's, else 0)",
        ),
    ] = None,
    round_to: RoundOpt = None,
    predict: Annotated[
        bool,
        typer.Option(
            "--predict",
            help="also predict the latency from this device's latency table (the searched space's when the frozen "
            "spec's source is found, else its own; measured once, cached)",
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Measure latency and throughput of the compact network beside the dense backbone and its FLOPs ratio."""
    rounding = _check_round(round_to)
    where = _latency_setting(frozen)  # a latency budget says where the network is meant to run
    batch_size = batch_size if batch_size is not None else (where.batch if where else 8)
    threads = threads if threads is not None else ((where.threads or 0) if where else 0)
    for name, value in (("--batch-size", batch_size), ("--repeats", repeats)):
        if value < 1:
            raise UsageError(f"{name}: expected a positive integer, found {value}")
    if warmup < 0:
        raise UsageError(f"--warmup: expected 0 or more, found {warmup}")
    if not 0 <= min_seconds <= 86400:  # (also refuses nan and inf)
        raise UsageError(f"--min-seconds: expected 0 to 86400, found {min_seconds}")
    if not 0 <= threads <= 1024:  # (torch crashes far above the cores it has)
        raise UsageError(f"--threads: expected 0 (torch's default) to 1024, found {threads}")
    dev = _device(device)
    set_threads(threads or None)  # 0: torch's default
    model = _model(
        frozen, weights if weights is not None else ("none" if frozen.endswith(".vit") else None), rounding
    )
    report = _bench(model, dev, batch_size, repeats, warmup, vs_dense, min_seconds)
    report["spec"] = frozen
    if predict:
        report["predicted"] = _predicted(frozen, model, dev.type, threads, batch_size, quiet=json_out)
        measured = report["timings"]["compact"]["median_ms"]
        report["predicted"]["error"] = round(report["predicted"]["ms"] / measured - 1, 4)
    report["units"] = {
        "*_ms": "milliseconds per batch",
        "images_per_s": "images per second",
        "flops": "multiply-adds",
    }
    if json_out:
        print(json.dumps(report))
        return
    _print_bench(report)


def _frozen_of(frozen: str) -> Any:
    """The frozen program of a frozen .vit or of a built model (its embedded spec); ``None`` when unreadable."""
    from ..compact.io import read_metadata
    from ..compile.program import compile_file, compile_text
    from ..lang.errors import SpvitError

    try:
        if frozen.endswith(".safetensors"):
            return compile_text(read_metadata(frozen)["spvit_dsl.spec"], frozen)
        return compile_file(frozen)
    except (SpvitError, OSError, KeyError, ValueError):
        return None


def _latency_setting(frozen: str) -> Any:
    program = _frozen_of(frozen)
    return None if program is None else program.latency


def _predicted(
    frozen: str, model: Any, device: str, threads: int, batch: int, *, quiet: bool
) -> dict[str, Any]:
    """The latency table's prediction for the built network, on what ``bench`` measures (device, threads, batch,
    fp32): from the table of the space the frozen spec was searched in when its ``source`` compiles, else of the
    frozen point itself."""
    from ..space.latency import UNSTEADY, LatencySetting
    from ._common import frozen_price

    program = _frozen_of(frozen)
    if program is None:
        raise UsageError(f"--predict: cannot read the frozen spec of {frozen}")
    setting = LatencySetting(device, threads or None, batch, "fp32")
    table, ms, which, note = frozen_price(
        program, frozen, setting, lambda t: t.arch_ms(model.spvit_geometry, model.spvit_arch), quiet=quiet
    )
    which = which or "the frozen network"
    if note:
        err.print(f"--predict: {note}", markup=False)
    # `unsteady`: the table was measured on a busy machine (the warning line `latency` prints; --json prints none)
    facts = {"table_spread": round(table.spread, 4), "unsteady": table.spread > UNSTEADY}
    return {"ms": round(ms, 4), "table_of": which, "setting": setting.as_dict(), **facts} | (
        {"note": note} if note else {}
    )


def _bench(
    model, device, batch_size: int, repeats: int, warmup: int, vs_dense: bool, min_seconds: float = 0.0
) -> dict[str, Any]:
    from ..compact.skeleton import create_dense
    from ..compact.speed import machine, time_models

    g = model.spvit_geometry
    models = {"compact": model}
    if vs_dense:
        models["dense"] = create_dense(g)
    timings = time_models(
        models,
        (batch_size, g.in_chans, g.img_size, g.img_size),
        device=device,
        warmup=warmup,
        repeats=repeats,
        min_seconds=min_seconds,
    )
    costs = _costs(model)
    report: dict[str, Any] = {
        "machine": machine(device),
        "batch_size": batch_size,
        "timings": {k: t.as_dict() for k, t in timings.items()},
        "costs": costs,
    }
    if vs_dense:
        speedup = timings["dense"].median_ms / timings["compact"].median_ms
        ideal = costs["exact"]["dense_flops"] / costs["exact"]["flops"]
        report["speedup"] = round(speedup, 4)
        report["flops_speedup"] = round(ideal, 4)
        report["efficiency"] = round(speedup / ideal, 4)  # measured speed-up over the one the FLOPs promise
        # the other ratio the literature quotes: (1 - t_compact / t_dense) / (1 - F_compact / F_dense)
        report["latency_cut"] = round(1 - 1 / speedup, 4)
        report["flops_cut"] = round(1 - 1 / ideal, 4)
    return report


def _print_bench(r: dict[str, Any]) -> None:
    m = r["machine"]
    out.print(
        f"[bold]{r['spec']}[/] on {m['device']} ({m.get('gpu') or m['cpu']}, {m['torch_threads']} thread(s), "
        f"torch {m['torch']}), batch {r['batch_size']}, median of {next(iter(r['timings'].values()))['repeats']} "
        "interleaved rounds"
    )
    table = Table(title_justify="left")
    for col in ("", "latency (median)", "throughput", "FLOPs (exact)", "params"):
        table.add_column(col, justify="right")
    c = r["costs"]
    sizes = {
        "compact": (c["exact"]["flops"], c["params"]),
        "dense": (c["exact"]["dense_flops"], c["dense_params"]),
    }
    for name, t in r["timings"].items():
        flops, params = sizes[name]
        table.add_row(
            name,
            f"{t['median_ms']:.2f} ms",
            f"{t['images_per_s']:.1f} img/s",
            fmt_macs(flops),
            fmt_params(params),
        )
    out.print(table)
    if "speedup" in r:
        slower = (
            "; the compact network runs slower than the dense one" if round(r["speedup"], 2) < 1 else ""
        )  # as printed
        out.print(
            f"speed-up {r['speedup']:.2f}x measured vs {r['flops_speedup']:.2f}x by FLOPs: efficiency "
            f"{r['efficiency']:.0%} (measured ÷ promised speed-up); latency cut {r['latency_cut']:.0%} for a FLOPs "
            f"cut of {r['flops_cut']:.0%}{slower}"
        )
    if "predicted" in r:
        p = r["predicted"]
        out.print(
            f"predicted {p['ms']:.2f} ms by the latency table of {p['table_of']}: {p['error']:+.1%} against the "
            "measured median",
            markup=False,
        )


# ---------------------------------------------------------------- finetune / eval
def _device(name: str):
    from ..runtime.device import pick_device

    return pick_device(name)


@contextmanager
def _progress(title: str) -> Iterator[Any]:
    """A rich progress bar fed by ``update(step, total, loss)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=out, transient=False) as bar:
        task = bar.add_task(title, total=None)

        def update(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, description=f"{title}  loss {loss:.3f}")

        yield update


def finetune_cmd(
    frozen: FrozenArg,
    data: Annotated[str | None, typer.Option("--data", help=DATA_HELP)] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help=DATA_DIR_HELP)] = None,
    recipe: Annotated[
        str, typer.Option("--recipe", help="spvit | dimap: preset schedule; the flags below override it")
    ] = "spvit",
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="passes over the training data (spvit, dimap: 30)")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=0, help="stop after N steps (0: no limit)")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="peak AdamW learning rate (cosine schedule) (spvit: 5e-4, dimap: 2e-5)"),
    ] = None,
    min_lr: Annotated[
        float | None, typer.Option("--min-lr", help="end of the cosine (spvit: 1e-5, dimap: 2e-7)")
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(
            "--warmup-epochs",
            help="linear warm-up epochs (spvit: 1, dimap: 15; scaled with --epochs when not given)",
        ),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="AdamW weight decay (spvit: 0.05, dimap: 1e-8)")
    ] = None,
    init: Annotated[
        str, typer.Option("--init", help="search | pretrained | none: where the weights start")
    ] = "search",
    weights: WeightsOpt = None,
    masks: Annotated[
        str | None,
        typer.Option("--masks", help="search.ckpt whose kept units (every group) --init pretrained gathers"),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="a timm model name or a built .safetensors")
    ] = None,
    distill: Annotated[str, typer.Option("--distill", help="hard | soft | none")] = "none",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    out_dir: Annotated[
        str | None, typer.Option("--out", help="output folder (default runs/<name>-finetune)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/finetune.ckpt")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: ThreadsOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="print one JSON object with the result (no progress bar)")
    ] = False,
) -> None:
    """Fine-tune a frozen network; keeps the best-by-validation model as OUT/best.safetensors."""
    set_threads(threads)
    from ..compile.strategies import with_data
    from ..runtime.data import data_of_settings
    from ..train.finetune import finetune, load_teacher, recipe_settings

    if distill not in ("hard", "soft", "none"):
        raise UsageError(f"--distill: expected hard, soft or none, found '{distill}'")
    for flag, value in (("--lr", lr), ("--min-lr", min_lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive finite number, found {value}")
    for flag, value in (("--warmup-epochs", warmup_epochs), ("--weight-decay", weight_decay)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a finite number of at least 0, found {value}")
    settings = recipe_settings(
        recipe,
        epochs=epochs,
        lr=lr,
        min_lr=min_lr,
        warmup_epochs=warmup_epochs,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        steps=steps,
        distill=distill,
    )
    if init not in ("search", "pretrained", "none"):
        raise UsageError(f"--init: expected search, pretrained or none, found '{init}'")
    built = frozen.endswith(".safetensors")  # a built model holds its own weights: it starts from them
    if init == "search" and weights is None and not built:
        raise UsageError("--init search needs --weights search.ckpt (or use --init pretrained / none)")
    if built and (weights is not None or init != "search"):
        raise UsageError(
            f"{frozen} is a built model and starts from its own weights: drop --weights and --init"
        )
    source = (
        None if built else {"search": weights, "pretrained": weights or "pretrained", "none": "none"}[init]
    )
    dev = _device(device)
    model = _model(frozen, source, None, masks if init == "pretrained" else None).to(dev)
    program = _program_of(frozen, model)
    dataset = data_of_settings(with_data(program.checked.search.values, data, data_dir), model.spvit_geometry)
    g = model.spvit_geometry
    image = (g.in_chans, g.img_size, g.img_size)
    teacher_model = load_teacher(teacher, dev, g.num_classes, image) if teacher else None
    if teacher and distill == "none":
        err.print(
            "note: --teacher is used only with --distill hard or soft; this fine-tune ignores it",
            markup=False,
        )
    out_dir = out_dir or os.path.join("runs", os.path.basename(frozen).split(".")[0] + "-finetune")
    _check_output("--out", out_dir, folder=True)
    bar = contextlib.nullcontext(None) if json_out else _progress(f"fine-tune {os.path.basename(frozen)}")
    with bar as progress:
        result = finetune(
            model,
            dataset,
            settings,
            out=out_dir,
            device=dev,
            resume=resume,
            teacher=teacher_model,
            progress=progress,
        )
    if json_out:
        summary = {
            "best": result.best.as_dict(),
            "last": result.last.as_dict(),
            "epochs": result.epochs,
            "model": result.best_path,
            "out": out_dir,
            "units": {"top1": "%", "top5": "%", "loss": "cross-entropy, nats"},
        }
        print(json.dumps(summary, sort_keys=True))
        return
    out.print(
        f"best top-1 {result.best.top1:.2f}% (top-5 {result.best.top5:.2f}%), last {result.last.top1:.2f}%; "
        f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}; model {result.best_path}"
    )


def _program_of(frozen: str, model):
    from ..compact.build import frozen_program
    from ..compile.program import compile_text

    if frozen.endswith(".safetensors"):
        return frozen_program(compile_text(model.spvit_spec, f"{frozen}:spec"))
    return frozen_program(frozen)


def eval_cmd(
    frozen: FrozenArg,
    weights: WeightsOpt = None,
    data: Annotated[str | None, typer.Option("--data", help=DATA_HELP)] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help=DATA_DIR_HELP)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Top-1 / top-5 accuracy of a frozen network on the validation set, and its cost."""
    from ..compile.strategies import with_data
    from ..runtime.data import data_of_settings
    from ..runtime.evaluate import evaluate

    set_threads(threads)
    dev = _device(device)
    model = _model(frozen, weights, None).to(dev)
    program = _program_of(frozen, model)
    settings = with_data(program.checked.search.values, data, data_dir)
    source = str(settings.get("data", "digits"))
    dataset = data_of_settings(settings, model.spvit_geometry)
    metrics = evaluate(model, dataset.val, batch_size=batch_size, device=dev)
    costs = _costs(model)
    result = metrics.as_dict() | {
        "data": source,
        "flops_paper": costs["paper"]["flops"] / 1e9,
        "flops_exact": costs["exact"]["flops"] / 1e9,
        "params": costs["params"] / 1e6,
        "units": {
            "top1": "%",
            "top5": "%",
            "loss": "cross-entropy, nats",
            "flops_paper": "G multiply-adds",
            "flops_exact": "G multiply-adds",
            "params": "M parameters",
        },
    }
    if json_out:
        print(json.dumps(result, sort_keys=True))
        return
    out.print(
        f"top-1 {metrics.top1:.2f}%  top-5 {metrics.top5:.2f}%  loss {metrics.loss:.4f}  on {metrics.images} "
        f"validation images of '{source}'"
        + (
            ""
            if data
            else " (the spec's data; --data to change)"
            if "data" in program.checked.search.spans  # written in the spec, not a default filled in
            else " (the default: the frozen spec names no data; --data and --data-dir to change)"
        )
    )
    out.print(
        f"cost: FLOPs (multiply-adds) {fmt_macs(costs['paper']['flops'])} (paper) / "
        f"{fmt_macs(costs['exact']['flops'])} (exact), params {fmt_params(costs['params'])}"
    )


# ---------------------------------------------------------------- registration
def register(app: typer.Typer) -> None:
    """Add ``build``, ``export``, ``bench``, ``finetune`` and ``eval`` to the CLI."""
    app.command("build")(build_cmd)
    app.command("export")(export_cmd)
    app.command("bench")(bench_cmd)
    app.command("finetune")(finetune_cmd)
    app.command("eval")(eval_cmd)


def _check_output(flag: str, path: str, *, folder: bool = False) -> None:
    """Refuse an output path that cannot be written, in one line, before any work."""
    from .._io import output_problem  # noqa: PLC0415

    problem = output_problem(path, folder=folder)
    if problem is not None:
        raise UsageError(f"{flag}: {problem}")
