"""Exporting compact networks (build stage, torch): nn.Module → ONNX / TorchScript files.

Input: an eval-mode compact model (:mod:`spvit_dsl.compact`); output: an ONNX graph with a dynamic batch axis
(``image`` → ``logits``) or a traced TorchScript module. ONNX uses PyTorch's TorchScript-based exporter
(``dynamo=False``): it needs no extra packages and works offline, while the dynamo exporter (torch ≥ 2.9's default)
depends on ``onnxscript``. Both files are written atomically.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._io import write_atomic
from ..lang.errors import UsageError
from ..space.geometry import Geometry

__all__ = ["export_onnx", "export_torchscript", "onnx_max_error", "sample_input"]


def sample_input(model: nn.Module, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """A random image batch of the model's input shape (from ``spvit_geometry``)."""
    g = model.spvit_geometry
    assert isinstance(g, Geometry)  # set by create_compact
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, g.in_chans, g.img_size, g.img_size, generator=gen)
    return x.to(next(model.parameters()).device)


def export_onnx(model: nn.Module, path: str, *, opset: int = 17) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis."""
    model = model.eval()
    x = sample_input(model, 2)

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
            torch.onnx.export(
                model,
                (x,),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )

    try:
        write_atomic(path, write)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        raise UsageError(f"ONNX export failed: {' '.join(str(e).split())[:300]}") from e


def export_torchscript(model: nn.Module, path: str) -> None:
    """Write ``model`` as a traced TorchScript module (fixed control flow, any batch size)."""
    model = model.eval()
    x = sample_input(model, 2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 steers towards torch.export
            torch.jit.save(traced, tmp)

    write_atomic(path, write)


def onnx_max_error(model: nn.Module, path: str, batch_size: int = 3) -> float | None:
    """Largest absolute difference between onnxruntime and PyTorch on a random batch (None without onnxruntime).

    The batch size differs from the one exported with, so the dynamic batch axis is checked too.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = sample_input(model, batch_size, seed=1)
    with torch.no_grad():
        expected = model.eval()(x).cpu()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.cpu().numpy()})
    return float((torch.from_numpy(got) - expected).abs().max())
