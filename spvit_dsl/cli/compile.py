"""``spvit-dsl compile | fmt | diff``: the commands of the torch-free front end (compile stage).

``compile`` checks a spec and prints its space, costs and budgets (``--supernet`` lowers it, importing torch then);
``fmt`` rewrites specs canonically; ``diff`` compares two specs block by block.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from ..lang.errors import SpecError, SpvitError, UsageError
from ..space.geometry import Geometry
from ..space.units import fmt_macs, fmt_params
from ._common import BudgetOpt, ConventionOpt, err, load_program, out, parse_convention

__all__ = ["print_summary", "register"]


# ---------------------------------------------------------------- compile
def compile_cmd(
    spec: Annotated[str, typer.Argument(help="the .vit spec")],
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    graph: Annotated[
        str | None, typer.Option("--graph", help="write the search graph (.json, .graphml, .dot)")
    ] = None,
    convention: ConventionOpt = None,
    budget: BudgetOpt = None,
    supernet: Annotated[
        str | None, typer.Option("--supernet", help="materialise the supernet to a .safetensors file")
    ] = None,
) -> None:
    """Check a spec and summarise its search space, costs and budgets."""
    program = load_program(spec, convention, budget)
    if graph:
        try:
            program.graph.write(graph)
        except (ValueError, OSError) as exc:
            raise UsageError(f"--graph: {exc}") from None
    if supernet:
        _save_supernet(program, supernet)
    if json_out:
        print(json.dumps(program.summary(), sort_keys=False))
        return
    print_summary(program)
    if graph:
        out.print(f"graph written to {graph}")
    if supernet:
        out.print(f"supernet written to {supernet}")


def _save_supernet(program, path: str) -> None:
    from ..supernet import save_supernet
    from ..supernet.lower import lower

    net = lower(program.space, weights=program.checked.weights, convention=program.convention)
    save_supernet(net, path, program.source)


def _family(g: Geometry) -> str:
    """The summary's family label: ``vit``, ``swin``, ``swinv2`` or ``swinv2_cr`` (timm's SwinV2-CR); a ViT with timm's
    packed SwiGLU FFN adds ``SwiGLU FFN`` (its widths count neurons, each two rows of fc1)."""
    if g.blocks[0].ffn_glu:
        return f"{g.family}, SwiGLU FFN"
    return "swinv2_cr" if g.swin_v2_cr else "swinv2" if g.swin_v2 else g.family


def print_summary(program) -> None:
    s = program.summary()
    g = program.space.geometry
    b = program.bounds()
    conv = program.convention
    weights = program.checked.weights
    loads = (
        f", weights {g.model}.{g.tag}" if weights == "pretrained" else ""
    )  # which checkpoint pretrained loads
    out.print(
        f"[bold]{s['spec']}[/]  backbone [cyan]{g.model}[/] ({_family(g)}, {g.depth} blocks, "
        f"{g.img_size}px, {g.num_classes} classes{loads})"
    )
    kind = (
        "frozen network (no decisions left)"
        if s["frozen"]
        else f"{s['decisions']} decisions, 10^{s['space_size_log10']:.1f} networks"
    )
    out.print(f"search space: {kind}")
    if any(len(w) > 1 for w in program.space.embed):
        widths = [fmt_set(w) for w in program.space.embed]
        out.print(
            "embedding widths: "
            + (widths[0] if g.stages == 1 else "; ".join(f"stage {s}: {w}" for s, w in enumerate(widths)))
        )
    table = Table(title=f"cost ({conv} convention; FLOPs are multiply-adds)", title_justify="left")
    for col in ("", "min", "max", "dense"):
        table.add_column(col, justify="right")
    table.add_row("FLOPs", *(fmt_macs(getattr(b.macs, k)) for k in ("min", "max", "dense")))
    table.add_row("params", *(fmt_params(getattr(b.params, k)) for k in ("min", "max", "dense")))
    out.print(table)
    for bud in program.budgets:
        if bud.metric == "latency":
            assert program.latency is not None  # set whenever a budget is a latency
            out.print(
                f"budget {bud.describe()}: to be measured on {program.latency.describe()}, by this device's "
                f"latency table at search time (spvit-dsl latency {program.path} builds it and checks the budget)"
            )
            continue
        ratio = bud.absolute / b.of(bud.metric).dense
        where = (
            f"; checked in the spec's {bud.checked_in} convention, where it was searched"
            if bud.checked_in
            else ""
        )
        out.print(f"budget {bud.describe()}: [green]feasible[/] ({ratio:.0%} of dense{where})")
    if not program.budgets:
        out.print("no budget declared")
    out.print(_blocks_table(program))


def fmt_set(values) -> str:
    """Candidates as the language writes them: ``4``, ``{2, 3}``, ``48..96 step 3`` (an even run of 3 or more)."""
    v = list(values)
    if len(v) == 1:
        return str(v[0])
    steps = {b - a for a, b in zip(v, v[1:], strict=False)}
    if len(v) >= 3 and len(steps) == 1:
        step = steps.pop()
        return f"{v[0]}..{v[-1]}" + (f" step {step}" if step != 1 else "")
    return "{" + ", ".join(map(str, v)) + "}"


def _blocks_table(program) -> Table:
    table = Table(title="blocks", title_justify="left")
    plans = program.space.plans
    # heads and per-head width are listed when some block searches them: `H; D` searched separately, `H × D` jointly
    attn = any(len(p.heads) > 1 or len(p.head_dim) > 1 for p in plans)
    for col in ("block", "stage", "dim", "attention", *(["heads; head_dim"] if attn else []), "ffn widths"):
        table.add_column(col)
    if attn and any(p.joint for p in plans):
        table.caption, table.caption_justify = (
            "H × D: heads and head_dim searched as one joint choice",
            "left",
        )
    for p in plans:
        w = p.ffn.candidates(p.geom.hidden)
        ffn = (
            (
                f"per neuron 0..{p.geom.hidden}"
                if p.ffn.group == 1
                else f"groups of {p.ffn.group} 0..{p.geom.hidden}"
            )
            if p.ffn.granular
            else (str(w[0]) if len(w) == 1 else f"{len(w)} widths {w[0]}..{w[-1]}")
        )
        shape = [f"{fmt_set(p.heads)}{' ×' if p.joint else ';'} {fmt_set(p.head_dim)}"] if attn else []
        table.add_row(
            str(p.geom.index), str(p.geom.stage), str(p.geom.dim), " ".join(p.attention), *shape, ffn
        )
    return table


# ---------------------------------------------------------------- fmt
def fmt_cmd(
    specs: Annotated[list[str], typer.Argument(help=".vit files to format in place")],
    check: Annotated[
        bool, typer.Option("--check", help="only report files that are not formatted; exit 1 if any")
    ] = False,
    stdout: Annotated[
        bool, typer.Option("--stdout", help="print the formatted text instead of rewriting (git textconv)")
    ] = False,
) -> None:
    """Rewrite specs in the canonical format (comments are kept)."""
    from .._io import write_text
    from ..compile.check import read_file
    from ..lang.emit import emit
    from ..lang.parse import parse

    changed = []
    for path in specs:
        try:
            text = read_file(path)
        except OSError as exc:
            raise UsageError(f"cannot read spec '{path}': {exc.strerror or exc}") from None
        formatted = emit(parse(text, path))
        if stdout:
            sys.stdout.write(formatted)
            continue
        if formatted != text:
            changed.append(path)
            if not check:
                write_text(path, formatted)
    for path in changed:
        out.print(f"{'would reformat' if check else 'reformatted'} {path}")
    if check and changed:
        raise typer.Exit(1)


# ---------------------------------------------------------------- diff
def diff_cmd(
    a: Annotated[str, typer.Argument(help="a spec or frozen spec")],
    b: Annotated[str, typer.Argument(help="another spec or frozen spec")],
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    markdown_out: Annotated[bool, typer.Option("--markdown", help="print a Markdown report")] = False,
    convention: ConventionOpt = None,
) -> None:
    """Per-block differences and costs of two specs; exit 0 identical, 1 different, 2 on error."""
    from ..compile.diff import cost_cell, delta_cell, diff, markdown

    try:
        result = diff(
            load_program(a, convention), load_program(b, convention), convention=parse_convention(convention)
        )
    except SpvitError as exc:
        err.print(exc.render() if isinstance(exc, SpecError) else f"error: {exc}", markup=False)
        raise typer.Exit(2) from None
    if json_out:
        print(json.dumps(result.to_json(), sort_keys=True))
    elif markdown_out:
        print(markdown(result), end="")
    else:
        _print_diff(result, cost_cell, delta_cell)
    raise typer.Exit(0 if result.identical else 1)


def _print_diff(d, cost_cell, delta_cell) -> None:
    out.print(f"[bold]{d.a}[/] vs [bold]{d.b}[/] ({d.kind}, {d.convention} convention)")
    if d.identical:
        out.print("identical")
    else:
        table = Table()
        for col in ("block", "stage", "field", "A", "B", "note"):
            table.add_column(col)
        for r in d.rows:
            table.add_row(
                "" if r.block is None else str(r.block),
                "" if r.stage is None else str(r.stage),
                r.field,
                r.a,
                r.b,
                f"[red]{r.note}[/]" if r.note else "",
            )
        out.print(table)
    costs = Table(title="cost", title_justify="left")
    for col in ("", "A", "B", "delta"):
        costs.add_column(col, justify="right")
    costs.add_row(
        "FLOPs", cost_cell(d.cost["a"], "flops"), cost_cell(d.cost["b"], "flops"), delta_cell(d, "flops")
    )
    costs.add_row(
        "params",
        cost_cell(d.cost["a"], "params"),
        cost_cell(d.cost["b"], "params"),
        delta_cell(d, "params"),
    )
    out.print(costs)
    for r in d.breaks:
        if r.block is None:
            out.print(f"[red]{r.note}[/]: {r.a}, the frozen network costs {r.b}")
    if d.member is not None:
        out.print(
            "frozen network is "
            + ("[green]a member[/] of the space" if d.member else "[red]NOT a member[/] of the space")
        )


def register(app: typer.Typer) -> None:
    """Add ``compile``, ``fmt`` and ``diff``."""
    app.command("compile")(compile_cmd)
    app.command("fmt")(fmt_cmd)
    app.command("diff")(diff_cmd)
