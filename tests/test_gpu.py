"""Checks that need a CUDA device; on a machine without one they are skipped with that reason (see conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _spaces import all_on, dense_twin, tiny_swin_space, tiny_vit_space

from spvit_dsl.supernet.lower import lower

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("make", [tiny_vit_space, tiny_swin_space], ids=["vit", "swin"])
def test_supernet_matches_dense_on_cuda_and_trains_under_bf16(make) -> None:
    net = lower(make(), device="cuda").eval()
    all_on(net)
    dense = dense_twin(net).cuda().eval()
    g = net.space.geometry
    x = torch.randn(4, g.in_chans, g.img_size, g.img_size, device="cuda")
    with torch.no_grad():
        assert (net(x) - dense(x)).abs().max().item() <= 1e-4
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = net(x).float().logsumexp(-1).mean() + net.expected_cost() / 1e12
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in net.gate_parameters())


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
