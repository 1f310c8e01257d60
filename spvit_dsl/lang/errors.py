"""Errors of every stage, and the one renderer that points at the spec.

Every user mistake in a spec becomes a :class:`SpecError` carrying a :class:`Span`; the CLI renders it as
``file.vit:LINE:COL: error: message``, the source line, a caret under the span and an optional hint.
Mistakes in flags or files that are not spec text raise :class:`UsageError` (one plain line).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class Span(BaseModel):
    """A region of a source file; lines and columns are 1-based, ``end_column`` is exclusive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = "<string>"
    line: int = 1
    column: int = 1
    end_line: int = 1
    end_column: int = 2

    def __repr__(self) -> str:  # short, so AST dumps stay readable
        return f"Span({self.path}:{self.line}:{self.column})"


class SpvitError(Exception):
    """Base of every error the tool reports to a user without a traceback."""

    def render(self) -> str:
        return f"error: {self}"


class UsageError(SpvitError):
    """A bad flag, a missing file, unusable data: reported as one plain line."""


@dataclass
class _Source:
    path: str
    text: str


class SpecError(SpvitError):
    """A mistake located in a spec file."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        hint: str | None = None,
        source: str | None = None,
        severity: str = "error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.source = source  # the file's text, filled in by whoever knows it
        self.severity = severity

    def with_source(self, text: str) -> SpecError:
        if self.source is None:
            self.source = text
        return self

    def render(self) -> str:
        source = self.source
        if self.span is not None and (
            source is None or self.span.path != getattr(self, "source_path", self.span.path)
        ):
            source = _read(self.span.path) if source is None else source
        return render(self.message, self.span, source, hint=self.hint, severity=self.severity)


class SpecWarning(SpecError):
    """A located remark that does not stop compilation (e.g. a budget at or above the dense cost)."""

    def __init__(self, message: str, span: Span | None = None, *, hint: str | None = None) -> None:
        super().__init__(message, span, hint=hint, severity="warning")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


_SHOWN = 100  # characters of a source line shown under an error


def render(
    message: str,
    span: Span | None,
    source: str | None,
    *,
    hint: str | None = None,
    severity: str = "error",
) -> str:
    """``path:LINE:COL: severity: message``, the offending line, a caret under the span, then the hint."""
    if span is None:
        out = [f"{severity}: {message}"]
    else:
        out = [f"{span.path}:{span.line}:{span.column}: {severity}: {message}"]
        lines = source.split("\n") if source is not None else []  # lines as the parser counts them: "\n" only
        if 1 <= span.line <= len(lines):
            text = "".join(c if c.isprintable() else " " for c in lines[span.line - 1].expandtabs(1))
            column = span.column
            width = (
                span.end_column - span.column if span.end_line == span.line else len(text) - span.column + 1
            )
            width = max(1, min(width, max(1, len(text) - span.column + 1)))
            if len(text) > _SHOWN:  # a very long line: the part around the caret
                start = max(0, min(column - 1 - _SHOWN // 2, len(text) - _SHOWN))
                text = (
                    ("…" if start else "")
                    + text[start : start + _SHOWN]
                    + ("…" if start + _SHOWN < len(text) else "")
                )
                column = column - start + (1 if start else 0)
                width = max(1, min(width, len(text) - column + 1))
            gutter = f"{span.line:>4} | "
            out.append(gutter + text)
            out.append(" " * (len(gutter) - 2) + "| " + " " * (column - 1) + "^" * width)
    if hint:
        out.append(f"hint: {hint}")
    return "\n".join(out)


def did_you_mean(word: str, options: Iterable[str], *, limit: int = 3, cutoff: float = 0.6) -> str:
    """A hint naming the closest options (or listing them all when few and none is close)."""
    options = sorted(set(options))
    close = difflib.get_close_matches(word, options, n=limit, cutoff=cutoff)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    if len(options) <= 12:
        return "expected one of: " + ", ".join(options)
    return ""
