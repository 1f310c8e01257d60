"""Exporting compact networks: ONNX checked against PyTorch in onnxruntime, TorchScript, the export command; for
SPViT points (ops and FFN widths) and for points that cut every dimension (embedding widths, heads, per-head width,
per-layer sparsity)."""

from __future__ import annotations

import pytest
import torch
from _frozen import (
    DISTILLED_BACKBONE,
    SWIN_BACKBONE,
    VIT_BACKBONE,
    every_dimension_text,
    images,
    pattern_arch,
    randomise,
    search_program,
    write_frozen,
)
from typer.testing import CliRunner

from spvit_dsl.cli import app, main
from spvit_dsl.compact import CompactAttention, CompactWindowAttention
from spvit_dsl.compact.build import build, save
from spvit_dsl.compact.export import export_onnx, export_torchscript, onnx_max_error
from spvit_dsl.compile.program import compile_text
from spvit_dsl.space.plan import BlockArch, Density, FrozenArch
from spvit_dsl.supernet import save_supernet
from spvit_dsl.supernet.lower import lower

ort = pytest.importorskip("onnxruntime")
runner = CliRunner()
BACKBONES = {"vit": VIT_BACKBONE, "distilled": DISTILLED_BACKBONE, "swin": SWIN_BACKBONE}


def _every_dimension_model(name, tmp_path):
    """Built from a randomised supernet of a space with every dimension open, at a point that cuts each of them
    (Swin: stage widths (12, 20), not proportional to the dense (16, 32)): sparse layers hold zeros in place."""
    path = tmp_path / "every.vit"
    path.write_text(every_dimension_text(BACKBONES[name]))
    program = compile_text(path.read_text(), str(path))
    g = program.space.geometry
    net = lower(program.space)
    randomise(net, seed=4)
    save_supernet(net, tmp_path / "net.safetensors", program.source)
    ops = ("conv3x3", "msa", "skip", "msa")
    blocks = tuple(
        BlockArch(ops[b.index % 4], b.hidden // 3, max(1, b.heads - 1), 5, Density(0.5, 0.75, 0.5, 0.75))
        for b in g.blocks
    )
    arch = FrozenArch(blocks, (12, 20) if g.family == "swin" else (24,))
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    model = build(str(frozen), weights=str(tmp_path / "net.safetensors")).eval()
    assert model.spvit_arch == arch and arch.sparse
    kind = CompactWindowAttention if g.family == "swin" else CompactAttention
    assert any(isinstance(m, kind) and m.head_dim == 5 for m in model.modules())
    return model


@pytest.fixture(params=["distilled", "swin", "vit-every", "distilled-every", "swin-every"])
def model(request, tmp_path):
    name, _, every = request.param.partition("-")
    if every:
        return _every_dimension_model(name, tmp_path)
    program = search_program(BACKBONES[name], tmp_path / "s.vit")
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
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = images(model.spvit_geometry, batch=2, seed=5)
    (got,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


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
