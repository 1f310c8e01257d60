"""Devices and processes (runtime, torch): the one device resolver and the torchrun process group.

Every command that runs a network (search, build, fine-tune, eval, bench, export) resolves ``--device`` here, so
the same words mean the same thing everywhere: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or
``cuda:N``; under torchrun ``cuda`` means the process's local GPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..lang.errors import UsageError

__all__ = ["init_distributed", "pick_device", "world_info"]


def pick_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device for ``--device``; :class:`UsageError` for an unknown word or a missing GPU."""
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, found '{requested}'")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", world_info()[2] if local_rank is None else local_rank)


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device, world: int) -> bool:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); False when not needed or already joined."""
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True
