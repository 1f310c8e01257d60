"""The command line (``spvit-dsl``), one module per command group: :mod:`.compile` (compile, fmt, diff),
:mod:`.search`, :mod:`.frozen` (build, export, bench, finetune, eval); :mod:`.app` holds the app and the entry point.
Commands that need torch import it inside their bodies, so ``compile``, ``fmt`` and ``diff`` stay instant.
"""

from __future__ import annotations

from .app import app, main

__all__ = ["app", "main"]
