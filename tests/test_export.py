"""Exporting compact networks: ONNX checked against PyTorch in onnxruntime, TorchScript, the export command."""

from __future__ import annotations

import pytest
import torch
from _frozen import DISTILLED_BACKBONE, SWIN_BACKBONE, images, pattern_arch, search_program, write_frozen
from typer.testing import CliRunner

from spvit_dsl.cli import app, main
from spvit_dsl.compact.build import build, save
from spvit_dsl.compact.export import export_onnx, export_torchscript, onnx_max_error

ort = pytest.importorskip("onnxruntime")
runner = CliRunner()


@pytest.fixture(params=["distilled", "swin"])
def model(request, tmp_path):
    backbone = {"distilled": DISTILLED_BACKBONE, "swin": SWIN_BACKBONE}[request.param]
    program = search_program(backbone, tmp_path / "s.vit")
    m = build(str(write_frozen(program, pattern_arch(program), tmp_path / "f.vit")), weights="none").eval()
    with torch.no_grad():  # BN statistics away from the identity, so a dropped BN would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    return m


def test_onnx_matches_pytorch_at_another_batch_size(model, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(model, str(path))
    x = images(model.spvit_geometry, batch=5, seed=3)  # exported with batch 2: the batch axis is dynamic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert got.shape == (5, 10)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
    assert onnx_max_error(model, str(path)) < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_matches_pytorch(model, tmp_path):
    path = tmp_path / "m.pt"
    export_torchscript(model, str(path))
    loaded = torch.jit.load(str(path))
    x = images(model.spvit_geometry, batch=3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_cli_export_from_a_built_model(model, tmp_path):
    built = tmp_path / "m.safetensors"
    save(model, str(built))
    onnx_path, ts_path = tmp_path / "out.onnx", tmp_path / "out.pt"
    result = runner.invoke(
        app, ["export", str(built), "--onnx", str(onnx_path), "--torchscript", str(ts_path)]
    )
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs PyTorch: max |difference|" in result.output
    assert onnx_path.stat().st_size > 0 and ts_path.stat().st_size > 0


def test_cli_export_failures(tmp_path, capsys):
    program = search_program(SWIN_BACKBONE, tmp_path / "s.vit")
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    for argv, message in (
        (["export", str(frozen), "--weights", "none"], "nothing to export"),
        (["export", str(tmp_path / "missing.vit"), "--onnx", str(tmp_path / "x.onnx")], "file not found"),
        (["export", str(frozen), "--weights", "none", "--round", "-8", "--onnx", "x.onnx"], "--round"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 1 and message in err and "Traceback" not in err
