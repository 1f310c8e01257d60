"""Machine description recorded in every benchmark result (the library's own, plus the Python version)."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from collections.abc import Callable
from typing import Any


def machine(device: str | None = None) -> dict[str, object]:
    """Host, platform, CPU model, cores, torch version and threads, GPU name: see spvit_dsl.compact.speed.machine."""
    import torch

    from spvit_dsl.compact.speed import machine as describe

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return describe(dev) | {"python": platform.python_version()}


def result_path(name: str) -> str:
    """``bench/results/<name>-<host>.json``; the folder is ``$SPVIT_BENCH_RESULTS`` when set (the smoke tests)."""
    here = os.environ.get("SPVIT_BENCH_RESULTS") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"
    )
    os.makedirs(here, exist_ok=True)
    return os.path.join(here, f"{name}-{socket.gethostname()}.json")


def rounds_for(repeats: int, batch: int) -> int:
    """Timed rounds at batch size ``batch`` when ``repeats`` are the rounds at batch 8: as many images per network at
    every batch size (a batch-1 forward is short, and a few of them are noise)."""
    return max(repeats, repeats * 8 // batch)


def run_parts(name: str, parts: list[str], runners: dict[str, Callable[[], dict[str, Any]]]) -> str:
    """Run the named ``parts`` of benchmark ``name`` and merge their results into its JSON (parts not re-run keep
    their last figures; each part records the machine and the day it ran on, the top-level ``machine`` is the last
    run's), written atomically; returns the path. SystemExit: an unknown part."""
    unknown = [p for p in parts if p not in runners]
    if unknown:
        raise SystemExit(f"unknown part {', '.join(unknown)}: expected {', '.join(runners)}")
    path = result_path(name)
    result: dict[str, Any] = {"results": {}}
    if os.path.exists(path):
        with open(path) as fh:
            result = json.load(fh)
    result |= {"benchmark": name, "machine": machine("cpu")}
    for part in parts:
        started = time.time()
        out = runners[part]()
        out["seconds"] = round(time.time() - started, 1)
        out["machine"] = machine("cpu")
        out["measured_at"] = time.strftime("%Y-%m-%d", time.gmtime(started))
        result["results"][part] = out
        print(part, json.dumps(out.get("summary", out), indent=1)[:3000])
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)
    print("written", path)
    return path
