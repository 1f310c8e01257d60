"""The ViT families beyond plain ViT/DeiT (DeiT-III, CLIP, SigLIP with average pooling, DINOv2 with registers,
register/average-pooling ViTs, so150m, a global_pool override, SigLIP's attention pool, DINOv2-g's packed SwiGLU
FFN), one small configuration each, on real tensors:
the supernet with every unit kept is timm's dense model, a search → freeze → build round trip runs, and the
convolution ops treat register tokens like the class token. (Every compact point equals the masked supernet:
tests/test_build_dims.py, whose SPECS include these families; every timm name: tests/test_backbones.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _frozen import FAMILY_BACKBONES, images, search_and_build
from _spaces import dense_twin, every_dimension

from spvit_dsl.compact.build import build
from spvit_dsl.compile.program import compile_text
from spvit_dsl.search import run_search
from spvit_dsl.supernet.lower import lower

SEARCH = "blocks all { attention: one of {skip, conv3x3, msa}; ffn: groups of 8; heads: 1..2 }\nembed: 16..32 step 8\n"


def _program(name: str, tail: str = ""):
    return compile_text(f"{FAMILY_BACKBONES[name]}\n{tail}", f"/nowhere/{name}.vit")


@pytest.mark.parametrize("name", sorted(FAMILY_BACKBONES))
def test_the_supernet_with_every_unit_kept_is_the_dense_timm_model(name: str) -> None:
    torch.manual_seed(0)
    geometry = _program(name).space.geometry
    net = lower(every_dimension(geometry)).eval()
    for p in net.model.parameters():  # trained-looking weights: no zero biases, no unit layer scales
        torch.nn.init.normal_(p, std=0.2)
    dense = dense_twin(net).eval()
    x = images(geometry)
    with torch.no_grad():
        torch.testing.assert_close(net(x), dense(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["reg_gap", "dinov2_reg", "clip", "siglip_map", "swiglu"])
def test_a_search_freezes_and_builds_at_the_priced_cost(name: str, tmp_path: Path) -> None:
    space = SEARCH if name != "siglip_map" else SEARCH.split("embed:")[0]  # a MAP head keeps its width
    program = _program(name, space + "budget { flops <= 60% }\nsearch magnitude { }\n")
    search_and_build(program, tmp_path)


def test_register_tokens_pass_a_convolution_op_like_the_class_token() -> None:
    """A conv branch computes on the patch map; the class and register tokens (the prefix) see the block's norm1
    output added to them, as SPViT does for the class token (PREFIX_PASSTHROUGH)."""
    program = _program("dinov2_reg", "blocks all { attention: one of {conv3x3} }\n")
    geometry = program.space.geometry
    assert geometry.prefix_tokens == 5  # class + 4 registers
    net = lower(program.space).eval()
    block = net.model.blocks[0]
    x = torch.randn(2, geometry.blocks[0].tokens, geometry.embed_dim)
    with torch.no_grad():
        out = block.attn(block.norm1(x))
    torch.testing.assert_close(out[:, :5], block.norm1(x)[:, :5])
    assert not torch.allclose(out[:, 5:], block.norm1(x)[:, 5:])


def test_average_pooling_reads_the_patch_tokens_only() -> None:
    """With average pooling and no class token, the classifier reads the mean of the patch tokens (timm's
    global_pool='avg' leaves the register tokens out): changing a register token's input changes nothing when no
    block mixes tokens."""
    program = _program("reg_gap", "blocks all { attention: one of {skip} }\n")
    net = lower(program.space).eval()
    g = program.space.geometry
    assert not g.class_token and g.reg_tokens == 4 and g.global_pool == "avg" and g.fc_norm
    x = images(g)
    with torch.no_grad():
        before = net(x)
        net.model.reg_token.add_(1.0)
        after = net(x)
    torch.testing.assert_close(before, after)


def test_a_family_network_exports_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra (onnx, onnxruntime)")
    from spvit_dsl.compact.export import export_onnx, onnx_max_error

    program = _program("dinov2_reg", SEARCH + "budget { flops <= 60% }\nsearch magnitude { }\n")
    result = run_search(program, out=str(tmp_path / "run"), quiet=True)
    model = build(result.frozen_path, weights=result.checkpoint_path).eval()
    export_onnx(model, str(tmp_path / "m.onnx"))
    assert onnx_max_error(model, str(tmp_path / "m.onnx")) < 1e-4


PRETRAINED = "backbone {model} {{ weights = pretrained{extra} }}\n"


@pytest.mark.parametrize(
    "model, extra, warning",
    [
        ("vit_small_patch14_dinov2", "", "have no classifier head; a fresh 1000-class head is created"),
        (
            "vit_base_patch16_224.augreg_in21k",
            "; classes = 10",
            "have a 21843-class head; a fresh 10-class head",
        ),
        ("deit_tiny_patch16_224", "; embed_dim = 96; heads = 2", "embed_dim changes the shapes"),
        ("deit_tiny_patch16_224", "; image = 32", None),  # timm resamples the position embedding
    ],
)
def test_pretrained_weights_say_what_they_cannot_do(model: str, extra: str, warning: str | None) -> None:
    program = compile_text(PRETRAINED.format(model=model, extra=extra), "p.vit")
    said = [w.message for w in program.warnings if "pretrained weights" in w.message]
    if warning is None:
        assert not said
    else:
        assert len(said) == 1 and warning in said[0]
