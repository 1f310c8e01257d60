"""Search stage — progress display: a rich progress bar with loss, accuracy, derived cost and budget.

The loop reports to a :class:`Reporter`; :class:`RichReporter` draws the bar (on stderr, so stdout stays clean for
piping), :class:`Reporter` itself draws nothing (``quiet=True`` and every rank but 0 under torchrun) but still
writes notes — one-line notices the user must see, such as a safety net doing the work — to stderr.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Reporter", "RichReporter"]


class Reporter:
    """Silent reporter; subclasses draw."""

    def start(self, total: int, done: int, budget: str) -> None:
        """A search of ``total`` steps begins (``done`` already completed, when resuming)."""

    def step(self, fields: dict[str, Any]) -> None:
        """One optimizer step finished: ``loss``, ``acc``, ``cost`` (text), ``epoch``, ``shown`` (the strategy's numbers); or one proxy
        batch scored: ``epoch`` and ``text`` (shown as is)."""

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch finished (its metrics record)."""

    def note(self, text: str) -> None:
        """A one-line notice the user must see even when quiet (a safety net did the work), on stderr."""
        print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        """The search ended (normally or not)."""


class RichReporter(Reporter):
    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.progress: Any = None
        self.task: Any = None

    def start(self, total: int, done: int, budget: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]search[/] {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "search",
            total=total,
            completed=done,
            epoch="",
            info="",
        )
        self.budget = budget

    def step(self, fields: dict[str, Any]) -> None:
        if self.progress is None:
            return
        if "text" in fields:  # a scoring strategy: its own line (units scored per second, ...)
            info = str(fields["text"])
        else:
            info = (
                f"loss {fields['loss']:.3f}  acc {fields['acc']:.1%}  cost {fields['cost']} / budget {self.budget}"
                f"  {fields.get('shown', '')}"
            )
        label = "score" if "text" in fields else f"ep {fields['epoch']}"
        self.progress.update(self.task, advance=1, epoch=label, info=info)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.progress is None:
            return
        val = record.get("val_acc")
        val_text = f", val acc {val:.1%}" if val is not None else ""
        self.progress.console.print(
            f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, "
            f"train acc {record['train_acc']:.1%}{val_text}, derived cost {record['cost_text']}"
            + (f", {record['shown']}" if record.get("shown") else ""),
            markup=False,
        )

    def note(self, text: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(text, markup=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
