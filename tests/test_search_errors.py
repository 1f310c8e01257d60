"""Bad input to the search: one clear line, exit code 1, no traceback, the last good checkpoint kept."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _search_specs import SMALL, write_spec
from PIL import Image

from spvit_dsl.cli import main
from spvit_dsl.compile.program import compile_file
from spvit_dsl.lang.errors import UsageError
from spvit_dsl.search import run_search
from spvit_dsl.search.checkpoint import read_state


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["search", *args, "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    return exc.value.code, captured.err


def _one_line_error(code, err):
    assert code == 1, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _image_folder(root, *, bad=False, empty=False):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            if empty:
                continue
            for k in range(2):
                Image.new("L", (12, 12), color=40 * k + (cls == "b") * 100).save(
                    os.path.join(folder, f"{k}.png")
                )
    if bad:
        with open(os.path.join(root, "train", "a", "broken.png"), "wb") as fh:
            fh.write(b"this is not an image")
    return str(root)


def test_missing_data_folder(tmp_path, capsys):
    spec = write_spec(tmp_path)
    line = _one_line_error(
        *_cli(capsys, spec, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    )
    assert "data folder not found" in line and "nowhere" in line


def test_empty_data_folder(tmp_path, capsys):
    spec = write_spec(tmp_path)
    data = _image_folder(tmp_path / "data", empty=True)
    line = _one_line_error(*_cli(capsys, spec, "--data", data, "--out", str(tmp_path / "o")))
    assert "is empty" in line


def test_unreadable_image(tmp_path, capsys):
    spec = write_spec(tmp_path)
    data = _image_folder(tmp_path / "data", bad=True)
    line = _one_line_error(
        *_cli(capsys, spec, "--data", data, "--batch-size", "5", "--steps", "2", "--out", str(tmp_path / "o"))
    )
    assert "cannot read image" in line and "broken.png" in line


def test_valid_image_folder_trains(tmp_path):
    program = compile_file(write_spec(tmp_path))
    data = _image_folder(tmp_path / "data")
    res = run_search(
        program, data=data, batch_size=4, steps=2, device="cpu", out=str(tmp_path / "o"), quiet=True
    )
    assert res.steps == 2 and res.budgets[0]["ratio"] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_but_absent(tmp_path, capsys):
    spec = write_spec(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["search", spec, "--device", "cuda", "--out", str(tmp_path / "o"), "--quiet"])
    line = _one_line_error(exc.value.code, capsys.readouterr().err)
    assert "CUDA is not available" in line


def test_budget_below_the_cheapest_network(tmp_path, capsys):
    spec = write_spec(tmp_path)
    line = _one_line_error(*_cli(capsys, spec, "--budget", "0.01%", "--out", str(tmp_path / "o")))
    assert "cannot be met" in line and "cheapest network" in line
    assert not os.path.exists(tmp_path / "o")  # nothing was trained or written


def test_unsupported_decisions_refused_before_training(tmp_path, capsys):
    text = SMALL.replace("ffn: per neuron", "ffn: per neuron\n  heads: one of {1, 2}")
    spec = write_spec(tmp_path, text)
    line = _one_line_error(*_cli(capsys, spec, "--out", str(tmp_path / "o")))
    assert "strategy 'spvit' cannot search heads" in line
    assert not os.path.exists(tmp_path / "o")


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
    program = compile_file(write_spec(tmp_path))
    out = tmp_path / "o"

    def poison(info):
        if info.step == 12:  # after the first epoch's checkpoint (11 steps)
            with torch.no_grad():
                info.net.model.head.weight.fill_(math.nan)

    with pytest.raises(UsageError) as exc:
        run_search(program, device="cpu", out=str(out), quiet=True, callback=poison)
    msg = str(exc.value)
    assert "loss became nan" in msg and "last good checkpoint is kept" in msg and "\n" not in msg
    state = read_state(str(out / "search.ckpt"))
    assert state["epoch"] == 1 and state["step"] == 11 and state["finished"] is False
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 11


def test_ctrl_c_in_the_cli_exits_130_with_the_checkpoint_named(tmp_path, capsys, monkeypatch):
    from spvit_dsl.search import loop

    def interrupted(*args, **kwargs):
        raise loop.SearchInterrupted("interrupted at epoch 1, step 3; checkpoint saved to X/search.ckpt")

    monkeypatch.setattr(loop, "run_search", interrupted)
    spec = write_spec(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["search", spec, "--device", "cpu", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 130
    assert "checkpoint saved to X/search.ckpt" in err and "Traceback" not in err


def test_a_search_never_overwrites_another_silently(tmp_path, capsys):
    """An OUT holding search.ckpt needs --resume or --force; --out naming a file is refused; both flags together too."""
    spec = write_spec(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "search.ckpt").write_bytes(b"a finished search")
    line = _one_line_error(*_cli(capsys, spec, "--out", str(out), "--steps", "1"))
    assert "already holds a search" in line and "--resume" in line and "--force" in line
    assert (out / "search.ckpt").read_bytes() == b"a finished search"  # untouched
    line = _one_line_error(*_cli(capsys, spec, "--out", str(out), "--resume", "--force"))
    assert "pass one of them" in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in _one_line_error(*_cli(capsys, spec, "--out", str(afile)))


def test_version_and_list(capsys):
    for args, want in (
        (["--version"], "spvit-dsl 0.1.0 (torch"),
        (["list", "strategies"], "upvit (score)"),
        (["list", "ops"], "conv3x3"),
        (["list", "backbones"], "deit_small_patch16_224"),
    ):
        code = 0
        try:
            main(args)
        except SystemExit as exc:  # --version exits; commands return
            code = exc.code or 0
        assert code == 0 and want in capsys.readouterr().out, args
    with pytest.raises(SystemExit) as exc:
        main(["list", "op"])
    assert "did you mean 'ops'" in _one_line_error(exc.value.code, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--lr", "nan"], "--lr nan: 'lr' takes float values"),
        (["--lr", "-1"], "--lr -1:"),
        (["--weight-decay", "1e400"], "finite"),
        (["--workers", "2.5"], "'workers' takes int values"),
        (["--set", "arch_lr=0.1"], "unknown setting 'arch_lr' for strategy 'spvit'"),
        (["--set", "gate_lr"], "expected KEY=VALUE"),
        (["--set", "gate_lrr=0.1"], "did you mean 'gate_lr'"),
        (["--precision", "fp16"], "'precision' takes one of auto, fp32, bf16"),
        (["--threads", "0"], "--threads: expected a whole number in 1..1024, found 0"),
    ],
)
def test_setting_flags_are_checked_like_the_spec(capsys, tmp_path, flags, words):
    """`--lr`, `--weight-decay`, `--workers`, `--gate-lr`, `--warmup-epochs`, `--precision` and `--set` go through the
    checks a `search` block gets (type, range, finiteness, did-you-mean): one line naming the flag."""
    spec = write_spec(tmp_path)
    line = _one_line_error(*_cli(capsys, spec, *flags, "--out", str(tmp_path / "o")))
    assert words in line and line.count(flags[0]) == 1


def test_setting_flags_override_the_spec(tmp_path, capsys):
    import torch

    spec = write_spec(tmp_path)
    out = tmp_path / "o"
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    try:
        main(
            [
                "search",
                spec,
                "--threads",
                str(want),
                "--steps",
                "1",
                "--lr",
                "3e-4",
                "--set",
                "gate_lr=0.07",
                "--precision",
                "bf16",
                "--out",
                str(out),
                "--quiet",
            ]
        )
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    finally:
        threads, _ = torch.get_num_threads(), torch.set_num_threads(before)
    assert threads == want  # --threads set torch's CPU threads for the search
    settings = read_state(str(out / "search.ckpt"))["settings"]
    assert settings["lr"] == 3e-4 and settings["gate_lr"] == 0.07 and settings["precision"] == "bf16"


def test_precision_selects_the_autocast_of_the_forward():
    import torch

    from spvit_dsl.runtime.evaluate import autocast

    cpu, layer, x = torch.device("cpu"), torch.nn.Linear(4, 4), torch.randn(2, 4)
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast(cpu, precision):
            assert layer(x).dtype == dtype, precision
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        autocast(cpu, "fp16")


def test_search_json_prints_one_object_with_units(tmp_path, capsys):
    spec = write_spec(tmp_path)
    try:
        main(["search", spec, "--steps", "1", "--json", "--device", "cpu", "--out", str(tmp_path / "o")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    result = json.loads(out)  # the whole of stdout is one JSON object: no tables, no progress
    assert os.path.exists(result["frozen_spec"]) and os.path.exists(result["checkpoint"])
    (budget,) = result["budgets"]
    assert budget["achieved"] <= budget["limit"] and math.isclose(
        budget["ratio"], budget["achieved"] / budget["limit"]
    )
    assert result["costs"]["flops_paper"] == budget["achieved"]
    assert set(result["units"]) >= {"costs", "budgets", "val_top1"}
