"""Output paths and weights files a command cannot use: one ``error:`` line naming the flag, exit 1, before any work
(never a traceback from the last step of a long run); a file that is not a checkpoint says what it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spvit_dsl.cli import main

TINY = (
    "backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; channels = 1; classes = 10; "
    "embed_dim = 32; depth = 2; heads = 2 }\n"
)


def _run(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def spec(tmp_path: Path) -> str:
    (tmp_path / "tiny.vit").write_text(TINY)
    (tmp_path / "afile").write_text("not a folder")
    return str(tmp_path / "tiny.vit")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["build", "{spec}", "--weights", "none", "--out", "{tmp}/afile/x.safetensors"],
            "--out: {tmp}/afile is a file",
        ),
        (
            ["build", "{spec}", "--weights", "none", "--out", "{tmp}/dir.safetensors"],
            "is a folder; expected a file",
        ),
        (["export", "{spec}", "--weights", "none", "--onnx", "{tmp}"], "--onnx: {tmp} is a folder"),
        (
            ["export", "{spec}", "--weights", "none", "--torchscript", "{tmp}/afile/m.pt"],
            "--torchscript: {tmp}/afile",
        ),
        (
            ["finetune", "{spec}", "--weights", "none", "--out", "{tmp}/afile", "--epochs", "1"],
            "is a file, not a folder",
        ),
        (
            ["finetune", "{spec}", "--weights", "none", "--out", "{tmp}/afile/deeper", "--epochs", "1"],
            "is a file",
        ),
    ],
)
def test_unusable_outputs_are_refused_before_any_work(capsys, tmp_path: Path, spec: str, args, words) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    argv = [a.format(spec=spec, tmp=tmp_path) for a in args]
    line = _run(capsys, *argv)
    assert words.format(tmp=tmp_path) in line


def test_a_file_that_is_not_a_checkpoint_says_so(capsys, tmp_path: Path, spec: str) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step"}\n')
    line = _run(
        capsys,
        "build",
        spec,
        "--weights",
        str(tmp_path / "metrics.jsonl"),
        "--out",
        str(tmp_path / "m.safetensors"),
    )
    assert "is not a checkpoint" in line
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "objects.pth")
    line = _run(
        capsys,
        "build",
        spec,
        "--weights",
        str(tmp_path / "objects.pth"),
        "--out",
        str(tmp_path / "m.safetensors"),
    )
    assert "holding Python objects, not a plain state dict" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_finetune_json_is_one_object_with_units(capsys, tmp_path: Path, spec: str) -> None:
    import json

    try:
        main(
            ["finetune", spec, "--weights", "none", "--epochs", "1", "--out", str(tmp_path / "ft"), "--json"]
        )
    except SystemExit as exc:
        assert exc.code in (0, None)
    result = json.loads(capsys.readouterr().out)  # stdout is the object alone: no progress bar
    assert result["epochs"] == 1 and Path(result["model"]).exists()
    assert 0 <= result["best"]["top1"] <= result["best"]["top5"] <= 100
    assert result["units"]["top1"] == "%"
