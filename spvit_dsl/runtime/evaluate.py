"""The evaluation loop (runtime, torch): top-1 / top-5 accuracy and mean cross-entropy of a model on a dataset.

The one loop used by the search's per-epoch validation, ``spvit-dsl finetune`` and ``spvit-dsl eval``. Under
torchrun each process evaluates its shard (``DistributedSampler`` without padding duplicates) and the counts are
summed across processes, so every rank returns the same figures for the whole set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..lang.errors import UsageError
from .data import make_loader

__all__ = ["Metrics", "autocast", "evaluate"]


@dataclass
class Metrics:
    """Accuracies in percent, the mean cross-entropy and how many images were seen."""

    top1: float
    top5: float
    loss: float
    images: int

    def as_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "images": self.images}


PRECISIONS = ("auto", "fp32", "bf16")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[Any]:
    """The mixed precision of every loop: ``auto`` is bf16 autocast on CUDA and nothing (fp32) on CPU; ``fp32``
    never autocasts; ``bf16`` autocasts on any device (CPU bf16 kernels are slower on many CPUs, but the numbers
    match a GPU run's more closely). fp16 is not offered: it needs loss scaling, which bf16 does not.

    Raises ``ValueError`` for any other ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    precision: str = "auto",
) -> Metrics:
    """Metrics of ``model`` (put in eval mode; its mode is restored) over ``dataset``; sharded when ``world > 1``.

    Raises :class:`UsageError` for an empty dataset.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = make_loader(
        dataset,
        batch_size,
        train=False,
        seed=0,
        rank=rank,
        world=world,
        workers=workers,
        pin=device.type == "cuda",
    )
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    with autocast(device, precision):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            sums += torch.stack(
                [
                    F.cross_entropy(logits, y, reduction="sum").double(),
                    (top[:, 0] == y).sum().double(),
                    (top == y[:, None]).any(dim=-1).sum().double(),
                    torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                ]
            )
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        raise UsageError("the validation set is empty")
    return Metrics(100.0 * c1 / n, 100.0 * c5 / n, loss / n, int(n))
