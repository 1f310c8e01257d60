"""`make demo`: the main job on the embedded default.

Compiles every shipped spec and prints its summary (search space, cost bounds, budgets). The full pipeline on
scikit-learn's digits (dense training, search at 50% FLOPs, build, fine-tune, evaluate, diff) runs when the search
stage is installed; see README.md.
"""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def compile_all() -> None:
    from spvit_dsl.cli import main

    for spec in sorted(glob.glob(os.path.join(ROOT, "specs", "*.vit"))) + [os.path.join(ROOT, "examples", "digits_tiny.vit")]:
        print(f"\n$ spvit-dsl compile {os.path.relpath(spec, ROOT)}")
        try:
            main(["compile", spec])
        except SystemExit as exc:
            if exc.code:
                raise


if __name__ == "__main__":
    compile_all()
