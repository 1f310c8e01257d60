"""spvit-dsl: a declarative architecture-search language and compiler for vision transformers.

The pipeline, one module per stage (torch is imported only from lowering on):

    text --parse--> Spec --check--> Program (Space + SearchGraph + budgets) --lower--> Supernet
         --search--> FrozenArch --freeze--> Spec (frozen) --emit--> .vit text --build--> nn.Module
"""

from __future__ import annotations

__version__ = "0.1.0"

from .compile.program import Program, compile_file, compile_text
from .lang.ast import Spec
from .lang.errors import SpecError, SpecWarning, SpvitError, UsageError

# Stage modules (spvit_dsl.lang.parse, spvit_dsl.compile.check, ...) are not shadowed by functions of the same name here.
__all__ = [
    "Program",
    "Spec",
    "SpecError",
    "SpecWarning",
    "SpvitError",
    "UsageError",
    "__version__",
    "compile_file",
    "compile_text",
    "load",
]


def __getattr__(name: str) -> object:
    # `spvit_dsl.load(path)` builds a compact model; it needs torch, so it is imported on first use only.
    if name == "load":
        from .compact.build import load

        return load
    raise AttributeError(f"module 'spvit_dsl' has no attribute {name!r}")
