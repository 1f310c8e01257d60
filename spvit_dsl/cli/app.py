"""The command line: ``spvit-dsl compile | fmt | search | build | finetune | eval | diff | export | bench``.

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
from . import compile as compile_cmds
from . import frozen as frozen_cmds
from . import search as search_cmds
from ._common import err

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A declarative architecture-search language and compiler for vision transformers.",
)


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


for _module in (compile_cmds, search_cmds, frozen_cmds):
    _module.register(app)
