"""torchrun launcher for the protocol tests: registers the toy strategies, then runs one search."""

from __future__ import annotations

import sys

import _toys  # noqa: F401  (registers toy_shrink and toy_score)

from spvit_dsl.compile.program import compile_file
from spvit_dsl.search import run_search

if __name__ == "__main__":
    spec, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run_search(compile_file(spec), steps=steps, batch_size=32, device="cpu", out=out, quiet=True)
