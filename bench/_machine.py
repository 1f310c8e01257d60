"""Machine description recorded in every benchmark result (the library's own, plus the Python version)."""

from __future__ import annotations

import os
import platform
import socket


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
