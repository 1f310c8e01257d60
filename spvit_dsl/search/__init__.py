"""The search stage: a compiled Program → a searched, budget-respecting frozen spec (SPViT and plug-ins).

``run_search`` (:mod:`.loop`) is the entry point; strategies are plug-ins (:mod:`.strategies`); the budget is a
constraint handled by :mod:`.budget`. Importing this package does not import torch: the names below load lazily,
so the CLI stays instant.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "IMPLEMENTATIONS",
    "SearchContext",
    "SearchResult",
    "Strategy",
    "register_implementation",
    "run_search",
    "load_data",
]

_LAZY = {
    "run_search": "loop",
    "SearchResult": "loop",
    "StepInfo": "loop",
    "SearchInterrupted": "loop",
    "IMPLEMENTATIONS": "protocol",
    "SearchContext": "protocol",
    "Strategy": "protocol",
    "Decisions": "protocol",
    "register_implementation": "protocol",
    "load_data": "data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
