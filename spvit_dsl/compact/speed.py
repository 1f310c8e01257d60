"""Measured speed of compact networks beside their dense backbone (build stage, torch).

Input: one or more eval-mode models and an input shape. Output: :class:`Timing` per model (median latency of one
batch, throughput) measured under ``torch.inference_mode`` after warm-up. Models are timed *interleaved* (one forward
of each per round), so a machine whose load drifts during the run slows all of them alike. Used by
``spvit-dsl bench`` and ``bench/frozen_speed.py``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["MAX_ROUNDS_FACTOR", "Timing", "machine", "time_models"]

# a time floor (``min_seconds``) adds rounds up to this many times the repeats asked for
MAX_ROUNDS_FACTOR = 8


def round_cap(warmup: int, repeats: int) -> int:
    """How many rounds (warm-up included) :func:`_rounds` runs at most."""
    return warmup + MAX_ROUNDS_FACTOR * repeats


def _rounds(warmup: int, repeats: int, min_seconds: float = 0.0) -> Iterator[int]:
    """The round indices of an interleaved timing: ``0 … warmup − 1`` untimed, then ``repeats`` timed ones, then
    more while the timed rounds span less than ``min_seconds`` (checked between rounds), at most
    :data:`MAX_ROUNDS_FACTOR` × ``repeats`` timed ones."""
    start = 0.0
    for r in range(round_cap(warmup, repeats)):
        if r == warmup:
            start = time.perf_counter()
        elif r >= warmup + repeats and time.perf_counter() - start >= min_seconds:
            return
        yield r


@dataclass(frozen=True)
class Timing:
    """Median wall time of one forward of ``batch_size`` images, and the spread over the repeats."""

    batch_size: int
    repeats: int
    median_ms: float
    min_ms: float
    max_ms: float

    @property
    def images_per_s(self) -> float:
        return self.batch_size / (self.median_ms / 1000.0)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_models(
    models: dict[str, nn.Module],
    shape: tuple[int, ...],
    *,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    seed: int = 0,
    min_seconds: float = 0.0,
) -> dict[str, Timing]:
    """Time each model's forward on one random batch of ``shape`` (interleaved rounds; median of ``repeats``).

    ``min_seconds`` > 0 adds rounds past ``repeats`` until the timed rounds span that many seconds (at most
    :data:`MAX_ROUNDS_FACTOR` × ``repeats`` rounds): a machine whose speed swings within seconds then shows its
    average, not one moment of it, whatever the networks' size (``Timing.repeats`` says how many rounds ran)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    for m in models.values():
        m.eval().to(device)
    samples: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for step in _rounds(warmup, repeats, min_seconds):
            for name, m in models.items():
                _sync(device)
                t0 = time.perf_counter()
                m(x)
                _sync(device)
                if step >= warmup:
                    samples[name].append((time.perf_counter() - t0) * 1000.0)
    return {
        name: Timing(shape[0], len(s), statistics.median(s), min(s), max(s)) for name, s in samples.items()
    }


def machine(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on: platform, CPU model, cores, threads, torch version, GPU name."""
    info: dict[str, object] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": _cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
