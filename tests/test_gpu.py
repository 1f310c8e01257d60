"""Checks that need a CUDA device; on a machine without one they are skipped with that reason (see conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _spaces import all_on, dense_twin, every_dimension, tiny_swin_space, tiny_vit_space

from spvit_dsl.search.methods.spvit_gates import SpvitGates
from spvit_dsl.supernet.lower import lower

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("make", [tiny_vit_space, tiny_swin_space], ids=["vit", "swin"])
def test_supernet_matches_dense_on_cuda_and_trains_under_bf16(make) -> None:
    net = lower(make(), device="cuda").eval()
    gates = SpvitGates(net)
    all_on(gates)
    gates.draw(net, training=False)
    dense = dense_twin(net).cuda().eval()
    g = net.space.geometry
    x = torch.randn(4, g.in_chans, g.img_size, g.img_size, device="cuda")
    with torch.no_grad():
        assert (net(x) - dense(x)).abs().max().item() <= 1e-4
    net.train()
    opt = torch.optim.AdamW([*net.parameters(), *gates.parameters()], lr=1e-4)
    gates.draw(net, training=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = net(x).float().logsumexp(-1).mean() + net.cost(gates.counts(net)).float() / 1e12
    loss.backward()
    opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gates.parameters())


@pytest.mark.parametrize("geometry", ["vit", "swin"])
def test_per_sample_masks_on_cuda_equal_batch_masks(geometry) -> None:
    space = (tiny_vit_space if geometry == "vit" else tiny_swin_space)()
    net = lower(every_dimension(space.geometry), device="cuda").eval()
    g = net.space.geometry
    x = torch.randn(3, g.in_chans, g.img_size, g.img_size, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    masks = {
        p: (torch.rand(3, net.size(p), device="cuda", generator=gen) < 0.7).float()
        for p in net.groups
        if net.groups[p].structured
    }
    for m in masks.values():
        m[:, 0] = 1  # one unit kept at least
    with torch.no_grad():
        net.set_masks(masks)
        per_sample = net(x)
        for b in range(3):
            net.set_masks({p: m[b] for p, m in masks.items()})
            assert (net(x)[b] - per_sample[b]).abs().max().item() <= 1e-4


def test_search_on_cuda_meets_the_budget(tmp_path: Path) -> None:
    from spvit_dsl.compile.program import compile_file
    from spvit_dsl.search import run_search

    program = compile_file(str(ROOT / "examples/digits_tiny.vit"))
    result = run_search(program, steps=4, device="cuda", out=str(tmp_path), quiet=True)
    for b in result.budgets:
        assert 0.99 <= b["ratio"] <= 1.0


def test_compact_model_on_cuda_equals_cpu(tmp_path: Path) -> None:
    from spvit_dsl.compact.build import build

    model = build(str(ROOT / "examples/deit_s_frozen.vit"), weights="none").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    assert (cpu - gpu).abs().max().item() <= 1e-3


def test_two_of_four_layers_run_on_sparse_kernels(tmp_path: Path) -> None:
    """DIMAP's 2:4 extension: the searched layers convert to semi-structured sparse tensors and give the same output."""
    from spvit_dsl.compact.build import build
    from spvit_dsl.compact.semi import semi_structured_layers, to_semi_structured
    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.search import run_search

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 sparse kernels need an Ampere or newer GPU")
    text = """backbone vit_tiny_patch16_224 { weights = none; image = 64; patch = 8; classes = 10
      embed_dim = 128; depth = 2; heads = 2 }
    blocks all { sparsity: {0, 0.5} }
    budget { flops <= 80% }
    search dimap { semi_structured = true }
    """
    res = run_search(compile_text(text, "semi.vit"), out=str(tmp_path / "run"), quiet=True)
    model = build(res.frozen_path, weights=res.checkpoint_path).cuda().half().eval()
    assert semi_structured_layers(model)
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        before = model(x).float()
        report = to_semi_structured(model)
        after = model(x).float()
    assert "converted" in report.values(), report
    assert (before - after).abs().max().item() <= 2e-2 * before.abs().max().item()


def test_a_latency_table_on_cuda_in_bf16_predicts_its_calibration_point(tmp_path: Path) -> None:
    from spvit_dsl.compact.latency import table_for
    from spvit_dsl.space.latency import LatencySetting

    space = tiny_vit_space()
    table, _, measured = table_for(space, LatencySetting("cuda", None, 16, "bf16"), cache=tmp_path)
    assert measured and table.environment.get("gpu")
    assert table.arch_ms(space.geometry, space.dense()) == pytest.approx(table.dense_ms)
    assert table.fastest_ms(space) <= table.dense_ms
