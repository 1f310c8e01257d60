"""Compile time of every shipped spec: parse → check → graph → bounds in both conventions (in process), and the
wall time of a cold `spvit-dsl compile --json` (a fresh interpreter, imports included).

    python bench/compile.py [--repeats 20]

Writes bench/results/compile-<host>.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._machine import machine, result_path  # noqa: E402
from spvit_dsl.compile.program import compile_file  # noqa: E402


def in_process(path: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        p = compile_file(path)
        p.bounds("paper"), p.bounds("exact"), p.summary()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cold(path: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "spvit_dsl", "compile", path, "--json"], check=True, capture_output=True
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for path in sorted(
        glob.glob(os.path.join(root, "specs", "*.vit")) + glob.glob(os.path.join(root, "examples", "*.vit"))
    ):
        rel = os.path.relpath(path, root)
        row = {
            "spec": rel,
            "compile_ms": round(1e3 * in_process(path, args.repeats), 2),
            "cold_cli_ms": round(1e3 * cold(path), 1),
        }
        rows.append(row)
        print(f"{rel:34s} compile {row['compile_ms']:8.2f} ms   cold CLI {row['cold_cli_ms']:8.1f} ms")
    out = {"benchmark": "compile", "machine": machine(), "repeats": args.repeats, "results": rows}
    with open(result_path("compile"), "w") as fh:
        json.dump(out, fh, indent=1)
    print("written", result_path("compile"))


if __name__ == "__main__":
    main()
