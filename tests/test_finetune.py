"""Fine-tuning and evaluation of frozen networks: outputs, resume, distillation, the weights a fine-tune starts
from (search checkpoint, dense weights + kept units), sparse networks, CLI and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _frozen import randomise
from typer.testing import CliRunner

from spvit_dsl.cli import app
from spvit_dsl.compact.build import build, load
from spvit_dsl.compile.freeze import arch_of
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.runtime.data import load_data
from spvit_dsl.search.checkpoint import Checkpoint, save_checkpoint, spec_hash
from spvit_dsl.space.plan import BlockArch, Density, FrozenArch
from spvit_dsl.supernet import save_supernet
from spvit_dsl.supernet.lower import lower
from spvit_dsl.train import recipe
from spvit_dsl.train.finetune import FinetuneSettings, distill_loss, evaluate, finetune, lr_at, param_groups

ROOT = Path(__file__).parent.parent
runner = CliRunner()
TINY = """backbone vit_tiny_patch16_224 { weights = none; image = 16; patch = 8; channels = 1; classes = 10
  embed_dim = 32; depth = 2; heads = 2 }
blocks all { attention: one of {skip, conv1x1, msa}; ffn: per neuron }
budget { flops <= 60% }
search spvit { data = digits }
"""


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ft")
    (folder / "space.vit").write_text(TINY)
    program = compile_file(str(folder / "space.vit"))
    arch = program.space.dense().with_block(0, op="conv1x1", ffn=40).with_block(1, ffn=20)
    return Path(recipe.write_frozen(program, arch, str(folder / "net.vit"), {"seed": 0}, budget=True))


def _digits(model: torch.nn.Module):
    return load_data("digits", model.spvit_geometry)


def test_finetune_writes_best_model_metrics_and_checkpoint(frozen: Path, tmp_path: Path) -> None:
    model = build(str(frozen), weights="none")
    before = evaluate(model, _digits(model).val)
    result = finetune(
        model, _digits(model), FinetuneSettings(epochs=3, lr=3e-3, warmup_epochs=0), out=str(tmp_path)
    )
    assert sorted(os.listdir(tmp_path)) == [
        "best.safetensors",
        "finetune.ckpt",
        "finetune.json",
        "metrics.jsonl",
    ]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert result.best.top1 == max(r["val_top1"] for r in rows) > before.top1
    best = load(result.best_path)
    assert evaluate(best, _digits(best).val).top1 == pytest.approx(result.best.top1)
    assert arch_of(compile_text(best.spvit_spec).checked) == best.spvit_arch


def test_resume_matches_an_uninterrupted_run(frozen: Path, tmp_path: Path) -> None:
    settings = FinetuneSettings(epochs=2, lr=2e-3, warmup_epochs=0)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build(str(frozen), weights="none")

    straight = fresh()
    finetune(straight, _digits(straight), settings, out=str(tmp_path / "a"))

    def stop(row: dict) -> None:
        raise KeyboardInterrupt  # after epoch 1's checkpoint is written

    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, _digits(interrupted), settings, out=str(tmp_path / "b"), on_epoch=stop)
    resumed = fresh()
    result = finetune(resumed, _digits(resumed), settings, out=str(tmp_path / "b"), resume=True)
    assert result.epochs == 2
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()


def test_hard_and_soft_distillation() -> None:
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0]])
    y, base = torch.tensor([0]), torch.tensor(1.0)
    s = FinetuneSettings(distill="hard", distill_weight=0.5)
    hard = distill_loss(student, teacher, y, base, s)
    assert hard == pytest.approx(
        0.5 + 0.5 * torch.nn.functional.cross_entropy(student, torch.tensor([1])).item()
    )
    soft = distill_loss(teacher, teacher, y, base, FinetuneSettings(distill="soft", distill_weight=0.5))
    assert soft == pytest.approx(0.5)  # KL of a distribution with itself is zero


def test_schedule_and_weight_decay_groups(frozen: Path) -> None:
    assert lr_at(0, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-4)
    assert lr_at(10, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert lr_at(100, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)
    decay, no_decay = param_groups(build(str(frozen), weights="none"), 0.05)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(
        p.ndim <= 1 or p.shape[0] == 1 for p in no_decay["params"]
    )


def test_uniform_arch_is_the_widest_that_fits() -> None:
    program = compile_file(str(ROOT / "examples/digits_tiny.vit"))
    arch = recipe.uniform_arch(program, "msa")
    budget = program.budgets[0].absolute
    assert program.graph.cost(arch, "paper").macs <= budget
    wider = arch
    for i in range(len(arch.blocks)):
        wider = wider.with_block(i, ffn=arch.blocks[0].ffn + 1)
    assert program.graph.cost(wider, "paper").macs > budget
    assert len({(b.op, b.ffn) for b in arch.blocks}) == 1


def _search_ckpt(frozen: Path, path: Path) -> dict[str, torch.Tensor]:
    """A finished search.ckpt of the frozen spec's space (random weights, random kept FFN neurons of the frozen
    widths, the spec text embedded)."""
    program = compile_file(str(frozen.parent / "space.vit"))
    net = lower(program.space)
    randomise(net, seed=3)
    arch = arch_of(compile_file(str(frozen)).checked)
    gen = torch.Generator().manual_seed(0)
    kept = {
        f"blocks.{i}.ffn": torch.randperm(row.hidden, generator=gen)[: b.ffn].sort().values
        for i, (row, b) in enumerate(zip(net.rows, arch.blocks, strict=True))
    }
    state = {"settings": {"alpha": 0.0, "seed": 0}, "spec_hash": spec_hash(program.source), "finished": True}
    save_checkpoint(
        str(path),
        Checkpoint(net.state_dict(), {}, {}, state, kept, spec=program.source, spec_path=program.path),
    )
    return kept


def _same_weights(model: torch.nn.Module, other: torch.nn.Module) -> None:
    """Equal parameters up to the 1e-30 steps of a learning rate of 1e-30 (Adam's steps are about the rate: they
    vanish next to any non-zero float32 value and leave exact zeros at most 1e-29 away). BatchNorm running
    statistics are buffers, not compared: they move in training mode at any rate."""
    theirs = dict(other.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=0, atol=1e-25, msg=name)


def test_cli_finetune_starts_from_the_built_network(frozen: Path, tmp_path: Path) -> None:
    """--init search starts from the folded search checkpoint, --init pretrained --masks from the dense weights of the
    units the search kept (at a learning rate of 1e-30 the best model is the start, parameter for parameter; a rate
    of 0 is refused)."""
    import timm
    from safetensors.torch import save_file

    from spvit_dsl.compact.build import read_metadata

    ckpt = tmp_path / "search.ckpt"
    kept = _search_ckpt(frozen, ckpt)
    g = compile_file(str(frozen)).space.geometry
    torch.manual_seed(5)
    dense = timm.create_model(g.model, pretrained=False, **g.kwargs())
    dense_path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_path))
    fast = ["--steps", "2", "--epochs", "1", "--lr", "1e-30", "--min-lr", "1e-30", "--device", "cpu"]
    for args, start in (
        (["--init", "search", "--weights", str(ckpt)], build(str(frozen), weights=str(ckpt))),
        (
            ["--init", "pretrained", "--weights", str(dense_path), "--masks", str(ckpt)],
            build(str(frozen), weights=str(dense_path), masks=str(ckpt)),
        ),
    ):
        out = tmp_path / args[1]
        result = runner.invoke(app, ["finetune", str(frozen), *args, *fast, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert read_metadata(str(out / "best.safetensors"))["spvit_dsl.weights"] == start.spvit_weights
        _same_weights(load(str(out / "best.safetensors")), start)
    index = kept["blocks.1.ffn"]
    torch.testing.assert_close(start.blocks[1].mlp.fc1.weight, dense.blocks[1].mlp.fc1.weight[index])


SPARSE = """backbone vit_tiny_patch16_224 { weights = none; image = 16; patch = 8; channels = 1; classes = 10
  embed_dim = 32; depth = 2; heads = 2 }
embed: 1..32
blocks all { attention: one of {skip, conv1x1, msa}; ffn: per neuron; heads: 1..2; head_dim: 1..16
  sparsity: {0, 0.5} }
"""


def test_finetune_keeps_a_sparse_network_sparse(tmp_path: Path) -> None:
    """A point with unstructured sparsity is stored dense with zeros in place; fine-tuning must keep those zeros
    (the frozen spec and its cost count non-zero weights), in memory and in best.safetensors."""
    (tmp_path / "space.vit").write_text(SPARSE)
    program = compile_file(str(tmp_path / "space.vit"))
    net = lower(program.space)
    randomise(net, seed=1)
    save_supernet(net, tmp_path / "net.safetensors", program.source)
    arch = FrozenArch(
        (
            BlockArch("msa", 40, 1, 12, Density(0.5, 0.5, 0.5, 0.5)),
            BlockArch("conv1x1", 30, 2, 8, Density(fc1=0.5)),
        ),
        (24,),
    )
    frozen = recipe.write_frozen(program, arch, str(tmp_path / "f.vit"), {"seed": 0}, budget=False)
    model = build(frozen, weights=str(tmp_path / "net.safetensors"))
    layers = [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
    ]
    zeros = {name: model.get_submodule(name).weight == 0 for name in layers}
    assert all(z.float().mean() == pytest.approx(0.5, abs=0.01) for z in zeros.values())
    result = finetune(
        model,
        _digits(model),
        FinetuneSettings(epochs=1, steps=3, lr=1e-3, warmup_epochs=0),
        out=str(tmp_path / "o"),
    )
    assert result.epochs == 1
    for trained in (model, load(result.best_path)):
        for name, zero in zeros.items():
            weight = trained.get_submodule(name).weight
            assert torch.equal(weight == 0, zero), f"{name}: the pruned weights were trained back"


def test_cli_finetune_then_eval(frozen: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["finetune", str(frozen), "--init", "none", "--epochs", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "best top-1" in result.stdout
    result = runner.invoke(app, ["eval", str(out / "best.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 <= data["top1"] <= data["top5"] <= 100 and data["images"] == 360 and data["flops_paper"] > 0
    text = runner.invoke(app, ["eval", str(out / "best.safetensors")])
    # a frozen spec records no data: eval's is the default, and it says so
    assert "data" not in frozen.read_text()
    assert "(the default: the frozen spec names no data" in " ".join(text.stdout.split())


def test_cli_finetune_with_a_teacher(frozen: Path, tmp_path: Path) -> None:
    runner.invoke(
        app, ["finetune", str(frozen), "--init", "none", "--epochs", "1", "--out", str(tmp_path / "t")]
    )
    result = runner.invoke(
        app,
        [
            "finetune",
            str(frozen),
            "--init",
            "none",
            "--steps",
            "3",
            "--teacher",
            str(tmp_path / "t" / "best.safetensors"),
            "--distill",
            "hard",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init", "search"], "--init search needs --weights"),
        (["--init", "none", "--distill", "medium"], "--distill: expected hard, soft or none"),
        (["--init", "none", "--distill", "hard"], "--distill hard needs --teacher"),
        (["--init", "none", "--teacher", "no_such_model_xyz"], "neither a file nor a timm model name"),
        (["--init", "none", "--data", "/no/such/folder"], "/no/such/folder"),
        (["--init", "none", "--device", "cuda"], "--device cuda: CUDA is not available"),
        (["--init", "none", "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, found 'tpu'"),
        (["--init", "none", "--recipe", "dimapp"], "--recipe: expected one of spvit, dimap, found 'dimapp'"),
        (["--init", "none", "--lr", "nan"], "--lr must be a positive finite number, found nan"),
        (["--init", "none", "--lr", "0"], "--lr must be a positive finite number"),
        (["--init", "none", "--min-lr", "-1"], "--min-lr must be a positive finite number"),
        (["--init", "none", "--weight-decay", "inf"], "--weight-decay must be a finite number of at least 0"),
        (
            ["--init", "none", "--warmup-epochs", "-2"],
            "--warmup-epochs must be a finite number of at least 0",
        ),
    ],
)
def test_cli_finetune_errors_are_one_line(
    frozen: Path, tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from spvit_dsl.cli import main

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as info:
        main(["finetune", str(frozen), "--epochs", "1", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert info.value.code == 1 and message in err and "Traceback" not in err


def test_recipes_are_presets_that_flags_override() -> None:
    from spvit_dsl.lang.errors import UsageError
    from spvit_dsl.train.finetune import RECIPES, recipe_settings

    dimap = recipe_settings("dimap")
    # DIMAP's schedule (arXiv 2404.13648): lr 2e-5 cosine to 2e-7, 15 warm-up epochs, weight decay 1e-8, 30 epochs
    assert (dimap.lr, dimap.min_lr, dimap.warmup_epochs, dimap.weight_decay, dimap.epochs) == (
        2e-5,
        2e-7,
        15.0,
        1e-8,
        30,
    )
    tuned = recipe_settings("dimap", epochs=3, lr=None, seed=4)
    assert (tuned.epochs, tuned.lr, tuned.seed) == (3, 2e-5, 4)  # None leaves the preset's value
    assert recipe_settings("spvit").lr == RECIPES["spvit"]["lr"] != dimap.lr
    with pytest.raises(UsageError, match="expected one of"):
        recipe_settings("ofb")


def test_cli_finetune_recipe_sets_the_schedule(frozen: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    result = runner.invoke(
        app,
        ["finetune", str(frozen), "--init", "none", "--recipe", "dimap", "--epochs", "2", "--steps", "3"]
        + ["--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # warm-up of 15 epochs: after a few steps the rate is still a small fraction of the peak 2e-5
    assert 0 < rows[-1]["lr"] < 2e-5 * 0.2


def test_recipe_warmup_scales_with_the_epochs_given() -> None:
    from spvit_dsl.train.finetune import recipe_settings

    assert recipe_settings("dimap", epochs=6).warmup_epochs == 3.0  # DIMAP warms up for half of its schedule
    assert recipe_settings("dimap", epochs=6, warmup_epochs=1).warmup_epochs == 1.0  # given: kept


def test_cli_finetune_starts_a_built_model_from_its_own_weights(frozen: Path, tmp_path: Path) -> None:
    built = tmp_path / "net.safetensors"
    assert runner.invoke(app, ["build", str(frozen), "--weights", "none", "--out", str(built)]).exit_code == 0
    result = runner.invoke(app, ["finetune", str(built), "--steps", "2", "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ft" / "best.safetensors").exists()
    refused = runner.invoke(app, ["finetune", str(built), "--init", "none", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "starts from its own weights" in str(refused.exception)


def test_cli_finetune_refuses_a_teacher_that_does_not_fit(frozen: Path, tmp_path: Path) -> None:
    """A teacher of other classes or another image size is one line before any training; a search checkpoint
    as teacher is named as such; --teacher without --distill is a note."""
    other = tmp_path / "other.vit"
    other.write_text(TINY.replace("classes = 10", "classes = 7").split("blocks")[0])
    teacher = tmp_path / "teacher.safetensors"
    assert (
        runner.invoke(app, ["build", str(other), "--weights", "none", "--out", str(teacher)]).exit_code == 0
    )
    base = ["finetune", str(frozen), "--init", "none", "--steps", "1", "--out", str(tmp_path / "ft")]
    result = runner.invoke(app, [*base, "--teacher", str(teacher), "--distill", "soft"])
    assert result.exit_code != 0 and "predicts 7 classes, the student 10" in str(result.exception)
    ckpt = tmp_path / "search.ckpt"
    ckpt.write_bytes(b"x")
    result = runner.invoke(app, [*base, "--teacher", str(ckpt), "--distill", "soft"])
    assert result.exit_code != 0 and "expected a built model" in str(result.exception)


def test_threads_flag_of_finetune_and_eval(frozen: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    try:
        out = tmp_path / "run"
        args = [
            "finetune",
            str(frozen),
            "--init",
            "none",
            "--steps",
            "1",
            "--threads",
            str(want),
            "--out",
            str(out),
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == want
        torch.set_num_threads(before)
        result = runner.invoke(app, ["eval", str(out / "best.safetensors"), "--threads", str(want), "--json"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    for command in (["finetune", str(frozen)], ["eval", str(out / "best.safetensors")]):
        bad = runner.invoke(app, [*command, "--threads", "0"])
        assert "--threads: expected a whole number in 1..1024, found 0" in str(
            bad.exception
        )  # main() prints it
