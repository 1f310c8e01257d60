"""The command line: ``spvit-dsl compile | fmt | search | build | finetune | eval | diff | export | bench | latency |
compare``.

User mistakes never show a traceback: a spec error is rendered with its caret on stderr, a bad flag or file is one
plain line, and the exit code is 1 (2 for flags that do not parse). Commands that need torch import it lazily so
``compile``, ``fmt`` and ``diff`` stay instant.
"""

from __future__ import annotations

import sys

import typer

try:  # recent typer vendors click; older ones use it directly
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx  # type: ignore[no-redef]

from ..lang.errors import SpecError, SpvitError
from . import compare as compare_cmds
from . import compile as compile_cmds
from . import frozen as frozen_cmds
from . import latency as latency_cmds
from . import search as search_cmds
from ._common import err

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A declarative architecture-search language and compiler for vision transformers.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        def of(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:  # pragma: no cover
                return "not installed"

        print(f"spvit-dsl {of('spvit-dsl')} (torch {of('torch')}, timm {of('timm')}, lark {of('lark')})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the versions and exit"
    ),
) -> None:
    """A declarative architecture-search language and compiler for vision transformers."""


@app.command("list")
def list_cmd(what: str = typer.Argument(..., help="ops | strategies | backbones")) -> None:
    """What the language knows: attention ops, search strategies (with kind and settings), or timm backbones."""
    from ..compile.strategies import STRATEGIES
    from ..lang.errors import UsageError, did_you_mean
    from ..space.ops import OPS

    if what == "ops":
        for name in OPS.names():
            print(name)
    elif what == "strategies":
        for name in STRATEGIES.names():
            info = STRATEGIES.get(name)
            print(f"{name} ({info.kind}): {info.doc}")
            settings = info.settings()
            shown = {
                k: str(p.default).lower() if isinstance(p.default, bool) else p.default
                for k, p in settings.items()
            }
            print("  settings: " + ", ".join(f"{k} = {shown[k]}" for k in sorted(settings)))
    elif what == "backbones":
        from ..space.backbones import supported_names

        for name in supported_names():
            print(name)
    else:
        hint = did_you_mean(what, ["ops", "strategies", "backbones"])
        raise UsageError(f"list: expected ops, strategies or backbones, found '{what}' ({hint})")


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console entry: run the app, turning user mistakes into rendered errors (exit 1) and flag errors into one line."""
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except SpecError as exc:
        err.print(exc.render(), markup=False)
        sys.exit(1)
    except SpvitError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except _cx.NoArgsIsHelpError:
        sys.exit(0)
    except _cx.UsageError as exc:
        err.print(f"error: {exc.format_message()}", markup=False)
        sys.exit(2)
    except _cx.ClickException as exc:
        err.print(f"error: {exc.format_message()}", markup=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted", markup=False)
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except (
        OSError
    ) as exc:  # the last resort for a file system problem no check foresaw: one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"error: {exc.strerror or exc}{where}", markup=False)
        sys.exit(1)


for _module in (compile_cmds, search_cmds, frozen_cmds, latency_cmds, compare_cmds):
    _module.register(app)
