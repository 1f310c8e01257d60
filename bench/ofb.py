"""OFB's search step against a dense training step of the same backbone, before and after progressive shrinking.

The OFB step is the loop's own (``spvit_dsl.search.train.train_step``): bi-masks on every searched group, masked
image modelling (mask token and pixel decoder), the budget, one-hot and L1 terms, three AdamW optimizers. The dense
step is forward + cross-entropy + backward + AdamW of the timm model. Both run on the same batch, interleaved step by
step (medians, with process CPU time beside wall time, which a busy machine disturbs less). "after shrink": every
searched group is cut physically to the middle of its candidates (the loop's shrink: tensors and moments sliced), as
progressive shrinking does during a search.

``quality`` — per seed: train the dense tiny ViT of the demo (digits, 40 epochs), then from the same dense weights
search OFB's default grids at 50% of the dense FLOPs with ``ofb`` (10 search epochs, then 30 of fine-tuning: 40
training epochs after the dense start, like the others), ``ofb`` without masked image modelling, ``magnitude`` and
``random`` (40 epochs of fine-tuning each, the same recipe). Best validation top-1.

    python bench/ofb.py [--parts step quality] [--model deit_small_patch16_224] [--batch 8] [--steps 5]
                        [--seeds 0 1 2] [--epochs 40] [--search-epochs 10] [--resume]

Writes bench/results/ofb-<host>.json (parts not re-run keep their last figures).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._cells import finished_cell, run_cell, summarise  # noqa: E402
from bench._machine import run_parts  # noqa: E402
from bench.supernet_step import make_step, timed  # noqa: E402


def _ofb_run(model: str, batch: int, folder: str):
    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.search.loop import _setup, resolve_settings

    text = (
        f"backbone {model} {{ weights = none; classes = 10 }}\nbudget {{ flops <= 50% }}\n"
        f"search ofb {{ data = synthetic; batch_size = {batch}; epochs = 100; warmup_fraction = 0.2 }}\n"
    )
    program = compile_text(text, os.path.join(folder, "bench.vit"))
    settings = resolve_settings(program, {})
    return _setup(program, settings, torch.device("cpu"), 0, 1, folder, False, None, True, None)


def _pair(ofb_step, dense_step, steps: int) -> dict[str, float]:
    for _ in range(2):  # warm-up
        ofb_step()
        dense_step()
    o, d = [], []
    for _ in range(steps):
        o.append(timed(ofb_step, torch.device("cpu")))
        d.append(timed(dense_step, torch.device("cpu")))
    ow, dw = statistics.median(t for t, _ in o), statistics.median(t for t, _ in d)
    oc, dc = statistics.median(c for _, c in o), statistics.median(c for _, c in d)
    return {"ofb_s": ow, "dense_s": dw, "ratio": ow / dw, "ratio_cpu": oc / dc}


def step_part(model: str, batch: int, steps: int) -> dict[str, object]:
    import timm

    from spvit_dsl.search.train import train_step

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        run = _ofb_run(model, batch, folder)
        geo = run.ctx.net.geometry
        x = torch.randn(batch, geo.in_chans, geo.img_size, geo.img_size)
        y = torch.randint(0, 10, (batch,))
        dense = timm.create_model(model, pretrained=False, num_classes=10)
        dense.train()
        opt = torch.optim.AdamW(dense.parameters(), lr=1e-4)
        dense_step = make_step(dense, opt, x, y, None)
        run.trainee.train()
        strategy = run.strategy
        strategy.before_step(0.0)

        def ofb_step() -> None:
            train_step(run, x, y, None)

        run.epoch, run.batch = 0, 0  # before the first check: nothing is shrunk
        before = _pair(ofb_step, dense_step, steps)
        before["mim_ratio"] = strategy.ratio
        for ch in strategy.choices:  # keep the lower half of the candidates, as a run of shrinks would
            n = len(ch.values)
            ordered = sorted(range(n), key=lambda c: ch.values[c])
            strategy.active[ch.name] = [c in ordered[: max(1, (n + 1) // 2)] for c in range(n)]
        cuts = strategy.check()
        for cut in cuts:
            run.ctx.net.shrink(cut.path, cut.keep, strategy.optimizers().values())
        after = _pair(ofb_step, dense_step, steps)
        return {
            "model": model,
            "batch": batch,
            "steps": steps,
            "before_shrink": before,
            "after_shrink": after,
            "groups_cut": len(cuts),
            "summary": {"before_shrink_ratio": before["ratio"], "after_shrink_ratio": after["ratio"]},
        }


GRID = (
    "embed: 48..96 step 3\n"
    "blocks all { heads x head_dim: {2, 3} x 8..32 step 4; ffn: widths {96, 144, 192, 240, 288, 336, 384} }\n"
)  # OFB's default grids for this backbone, written out so magnitude and random search the same space
BACKBONE = (
    "backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; channels = 1; classes = 10; "
    "embed_dim = 96; depth = 6; heads = 3 }\n"
)


def quality_seed(seed: int, epochs: int, search_epochs: int, out: str, resume: bool) -> dict[str, object]:

    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.train import recipe
    from spvit_dsl.train.finetune import FinetuneSettings

    torch.manual_seed(seed)
    out = os.path.join(out, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    budget = "budget { flops <= 50% }\n"
    base = compile_text(BACKBONE + GRID + budget + "search random { }\n", os.path.join(out, "base.vit"))
    dense = recipe.train_dense(
        base, os.path.join(out, "dense"), FinetuneSettings(epochs=epochs, lr=2e-3, warmup_epochs=2, seed=seed),
        reuse=resume,
    )  # fmt: skip
    data = recipe.data_of(base)
    ofb = f"search ofb {{ seed = {seed}; epochs = {search_epochs}; batch_size = 64; lr = 1e-3"
    runs = {
        "ofb": (BACKBONE + budget + ofb + " }\n", epochs - search_epochs),
        "ofb_no_mim": (BACKBONE + budget + ofb + "; mim = false }\n", epochs - search_epochs),
        "magnitude": (BACKBONE + GRID + budget + f"search magnitude {{ seed = {seed} }}\n", epochs),
        "random": (BACKBONE + GRID + budget + f"search random {{ seed = {seed} }}\n", epochs),
    }
    rows: dict[str, object] = {"dense": {"top1": dense.metrics.top1, "flops": base.bounds().macs.dense}}
    for name, (text, tune_epochs) in runs.items():
        done = finished_cell(out, name) if resume else None
        tune = FinetuneSettings(epochs=tune_epochs, lr=1e-3, warmup_epochs=1, seed=seed)
        rows[name] = done or run_cell(text, out, name, init=dense.timm_state, seed=seed, tune=tune, data=data)
        print(seed, name, rows[name]["top1"], flush=True)  # type: ignore[index]
    return rows


def quality(seeds: list[int], epochs: int, search_epochs: int, out: str, resume: bool) -> dict[str, object]:
    per_seed = {s: quality_seed(s, epochs, search_epochs, out, resume) for s in seeds}
    summary = summarise(per_seed)
    return {
        "epochs": epochs,
        "search_epochs": search_epochs,
        "seeds": seeds,
        "per_seed": per_seed,
        "summary": summary,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["step"])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--search-epochs", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_ofb"))
    ap.add_argument(
        "--resume", action="store_true", help="quality: reuse the finished cells found under --out"
    )
    a = ap.parse_args()
    run_parts(
        "ofb",
        a.parts,
        {
            "step": lambda: step_part(a.model, a.batch, a.steps),
            "quality": lambda: quality(a.seeds, a.epochs, a.search_epochs, a.out, a.resume),
        },
    )


if __name__ == "__main__":
    main()
