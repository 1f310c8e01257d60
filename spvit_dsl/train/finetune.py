"""Stage — fine-tune and evaluate: a compact network (from :mod:`spvit_dsl.compact.build`) + data → trained weights.

Implements SPViT's fine-tuning recipe (He et al., TPAMI 2024, §4): AdamW (no decay on 1-D parameters and biases),
cosine learning rate with linear warm-up, optional distillation from a teacher (hard: the teacher's argmax as a
second label, weight 0.5; soft: KL at temperature τ). Every epoch is validated; ``finetune.ckpt`` (the whole state,
safetensors, no pickle) is written atomically each epoch so ``--resume`` continues, and ``best.safetensors`` holds
the best-by-validation model in :func:`spvit_dsl.compact.build.save`'s format (loadable with ``spvit_dsl.load``).
A sparse network stays sparse: the zeros of its sparse layers are put back after every optimizer step, so the
fine-tuned network has the non-zero count its frozen spec prices.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import write_text
from ..lang.errors import UsageError
from ..runtime.evaluate import Metrics, evaluate
from ..runtime.optim import adamw, param_groups

FORMAT = "finetune-ckpt/1"


@dataclass
class FinetuneSettings:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    steps: int = 0  # stop after this many steps (0: no limit)
    distill: str = "none"  # none | hard | soft
    distill_weight: float = 0.5
    tau: float = 1.0


RECIPES: dict[str, dict[str, float | int]] = {
    # SPViT's fine-tuning schedule at digits scale (the CLI's historical defaults)
    "spvit": {"epochs": 30, "lr": 5e-4, "min_lr": 1e-5, "warmup_epochs": 1.0, "weight_decay": 0.05},
    # DIMAP (arXiv 2404.13648, §4): 30 epochs, AdamW, lr 2e-5 cosine to 2e-7, 15 warm-up epochs, weight decay 1e-8
    "dimap": {"epochs": 30, "lr": 2e-5, "min_lr": 2e-7, "warmup_epochs": 15.0, "weight_decay": 1e-8},
}


def recipe_settings(name: str, **overrides: float | int | str | None) -> FinetuneSettings:
    """A named recipe of :data:`RECIPES` with the given (non-None) settings on top; ``epochs`` without
    ``warmup_epochs`` scales the warm-up with it (DIMAP warms up for half its schedule). UsageError: unknown name."""
    if name not in RECIPES:
        raise UsageError(f"--recipe: expected one of {', '.join(RECIPES)}, found '{name}'")
    values: dict[str, Any] = dict(RECIPES[name])
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "warmup_epochs" not in given:  # keep the recipe's warm-up share of the schedule
        values["warmup_epochs"] = (
            float(values["warmup_epochs"]) * int(given["epochs"]) / int(values["epochs"])
        )
    values.update(given)
    return FinetuneSettings(**values)


@dataclass
class FinetuneResult:
    out: str
    best: Metrics
    last: Metrics
    best_path: str
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- training pieces
def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr``, then cosine down to ``min_lr`` at ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def distill_loss(
    student: Tensor, teacher: Tensor, target: Tensor, base: Tensor, s: FinetuneSettings
) -> Tensor:
    """Combine the label loss ``base`` with the teacher's signal (hard: its argmax; soft: KL at temperature τ)."""
    if s.distill == "hard":
        return (1 - s.distill_weight) * base + s.distill_weight * F.cross_entropy(student, teacher.argmax(-1))
    if s.distill == "soft":
        kl = (
            F.kl_div(
                F.log_softmax(student / s.tau, -1),
                F.log_softmax(teacher / s.tau, -1),
                reduction="batchmean",
                log_target=True,
            )
            * s.tau**2
        )
        return (1 - s.distill_weight) * base + s.distill_weight * kl
    return base


def load_teacher(
    spec: str, device: torch.device | str, num_classes: int, image: tuple[int, int, int] | None = None
) -> nn.Module:
    """A teacher from a built model file (``.safetensors`` written by build/finetune) or a timm model name
    (pretrained weights from timm's hub). ``image``: the student's (channels, height, width), checked with one
    forward. UsageError: not a built model, or a teacher whose input or classes differ from the student's."""
    if os.path.exists(spec):
        from ..compact.build import load

        if not spec.endswith(".safetensors"):
            raise UsageError(
                f"--teacher {spec}: expected a built model (.safetensors from build or finetune)"
            )
        teacher = load(spec, device=device)
    else:
        import timm

        if spec not in timm.list_models():
            raise UsageError(f"--teacher: '{spec}' is neither a file nor a timm model name")
        try:
            teacher = timm.create_model(spec, pretrained=True, num_classes=num_classes).to(device)
        except Exception as exc:  # the hub is unreachable, or the weights do not fit
            raise UsageError(
                f"--teacher: cannot load pretrained '{spec}': {' '.join(str(exc).split())[:200]}"
            ) from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    if image is not None:
        try:
            with torch.no_grad():
                out = teacher(torch.zeros(1, *image, device=device))
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise UsageError(
                f"--teacher {spec} does not take the student's {image[0]}x{image[1]}x{image[2]} images: "
                f"{' '.join(str(exc).split())[:160]}"
            ) from None
        if out.shape[-1] != num_classes:
            raise UsageError(f"--teacher {spec} predicts {out.shape[-1]} classes, the student {num_classes}")
    return teacher


def _zero_masks(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(weight, keep mask) of every sparse layer: fine-tuning trains the kept weights only."""
    if not hasattr(model, "spvit_arch"):
        return []
    from ..compact.skeleton import sparse_layers

    return [(layer.weight, layer.weight.detach() != 0) for layer, _d in sparse_layers(model).values()]


@torch.no_grad()
def _keep_zeros(zeros: list[tuple[Tensor, Tensor]]) -> None:
    for weight, keep in zeros:
        weight.mul_(keep.to(weight.dtype))


# ---------------------------------------------------------------- checkpoints
def _save_state(path: str, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from ..search.checkpoint import Checkpoint, save_checkpoint

    ckpt = Checkpoint(
        dict(model.state_dict()), {"weights": opt.state_dict()}, {"torch": torch.get_rng_state()}, state
    )
    save_checkpoint(path, ckpt, fmt=FORMAT)


def _load_state(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from ..search.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, fmt=FORMAT)
    model.load_state_dict(ckpt.net)
    opt.load_state_dict(ckpt.optimizers["weights"])
    torch.set_rng_state(ckpt.rng["torch"])
    return ckpt.state


# ---------------------------------------------------------------- the loop
def finetune(
    model: nn.Module,
    data: Any,
    settings: FinetuneSettings,
    *,
    out: str,
    device: torch.device | str = "cpu",
    resume: bool = False,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = None,
) -> FinetuneResult:
    """Train ``model`` (a built compact network carrying ``spvit_spec``) and keep the best by validation top-1."""
    from ..compact.build import save
    from ..runtime.data import batches_per_epoch, make_loader

    os.makedirs(out, exist_ok=True)
    ckpt_path, best_path = os.path.join(out, "finetune.ckpt"), os.path.join(out, "best.safetensors")
    metrics_path = os.path.join(out, "metrics.jsonl")
    s = settings
    if s.distill != "none" and teacher is None:
        raise UsageError(f"--distill {s.distill} needs --teacher")
    torch.manual_seed(s.seed)
    model.to(device)
    opt = adamw(param_groups(model, s.weight_decay), lr=s.lr)
    per_epoch = max(1, batches_per_epoch(data.train, s.batch_size))
    total = per_epoch * s.epochs if not s.steps else min(s.steps, per_epoch * s.epochs)
    warmup = int(s.warmup_epochs * per_epoch)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_top1": -1.0, "history": []}
    if resume:
        if not os.path.isfile(ckpt_path):
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
        state = _load_state(ckpt_path, model, opt)
    elif os.path.exists(metrics_path):
        os.unlink(metrics_path)
    loss_fn = data.loss()
    zeros = _zero_masks(model)
    last = None
    while state["epoch"] < s.epochs and (not s.steps or state["step"] < s.steps):
        model.train()
        seen, correct, running = 0, 0, 0.0
        for x, y in make_loader(data.train, s.batch_size, train=True, seed=s.seed, epoch=state["epoch"]):
            if s.steps and state["step"] >= s.steps:
                break
            x, y = x.to(device), y.to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], total, warmup, s.lr, s.min_lr)
            target = y
            if data.mixup is not None:
                x, target = data.mixup(x, y)
            logits = model(x)
            loss = loss_fn(logits, target)
            if teacher is not None and s.distill != "none":
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = distill_loss(logits, t_logits, y, loss, s)
            if not torch.isfinite(loss):
                raise UsageError(
                    f"the loss became {loss.item()} at step {state['step']}; lower --lr "
                    f"(the last good checkpoint is {ckpt_path})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _keep_zeros(zeros)
            state["step"] += 1
            seen += len(y)
            running += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            if progress is not None:
                progress(state["step"], total, loss.item())
        last = evaluate(model, data.val, batch_size=max(64, s.batch_size), device=device)
        state["epoch"] += 1
        row = {
            "epoch": state["epoch"],
            "step": state["step"],
            "train_loss": running / max(1, seen),
            "train_top1": 100.0 * correct / max(1, seen),
            "val_top1": last.top1,
            "val_top5": last.top5,
            "val_loss": last.loss,
            "lr": opt.param_groups[0]["lr"],
        }
        state["history"].append(row)
        if last.top1 > state["best_top1"]:
            state["best_top1"] = last.top1
            state["best"] = last.as_dict()
            save(model, best_path)
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        _save_state(ckpt_path, model, opt, state)
        if on_epoch is not None:
            on_epoch(row)
    if last is None:  # resumed a finished run
        last = evaluate(model, data.val, batch_size=max(64, s.batch_size), device=device)
    best = Metrics(**state["best"]) if "best" in state else last
    write_text(
        os.path.join(out, "finetune.json"),
        json.dumps({"best": best.as_dict(), "last": last.as_dict(), "epochs": state["epoch"]}, indent=1)
        + "\n",
    )
    return FinetuneResult(out, best, last, best_path, state["epoch"], state["history"])
