"""Hand-built spaces on tiny real timm backbones for the lowering tests (no parser involved), the dense twin, and
spaces that declare every dimension (embedding widths, heads, per-head widths, FFN, ops, per-layer sparsity)."""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch

from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.plan import BlockPlan, DensityChoice, FfnChoice, Geometry, Space
from spvit_dsl.supernet import Supernet
from spvit_dsl.supernet.lower import lower

ALL_OPS = ("skip", "conv1x1", "conv3x3", "conv5x5", "msa")
PER_NEURON = FfnChoice(group=1)  # SPViT's own FFN gates

TINY_VIT = dict(image=32, patch=8, embed_dim=32, depth=3, heads=2, classes=10)
TINY_SWIN = dict(image=32, patch=2, embed_dim=16, depth=(2, 2), heads=(1, 2), window=4, classes=10)


def make_space(
    geometry: Geometry,
    ops: tuple[str, ...] | Callable[[int], tuple[str, ...]] = ALL_OPS,
    ffn: FfnChoice | Callable[[int, int], FfnChoice] = PER_NEURON,
) -> Space:
    """One plan per block: ``ops(i)`` / ``ffn(i, hidden)`` may vary by block."""
    plans = []
    for b in geometry.blocks:
        block_ops = ops(b.index) if callable(ops) else ops
        choice = ffn(b.index, b.hidden) if callable(ffn) else ffn
        plans.append(BlockPlan(b, tuple(block_ops), choice, (b.heads,), (b.head_dim,)))
    return Space(geometry, tuple(plans), tuple((d,) for d in geometry.dims))


DENSITIES = (0.5, 0.75, 1.0)


def every_dimension(geometry: Geometry, ops: tuple[str, ...] = ALL_OPS) -> Space:
    """Every dimension open: any embedding width per stage (dense only under an attention-pool head, which
    spvit-dsl does not prune), any heads and per-head width, any FFN width (per neuron), every op, densities
    {0.5, 0.75, 1} for each sparsifiable layer."""
    plans = tuple(
        BlockPlan(
            b,
            ops,
            PER_NEURON,
            tuple(range(1, b.heads + 1)),
            tuple(range(1, b.head_dim + 1)),
            DensityChoice(DENSITIES, DENSITIES, DENSITIES, DENSITIES),
        )
        for b in geometry.blocks
    )
    if geometry.global_pool == "map":
        return Space(geometry, plans, tuple((d,) for d in geometry.dims))
    return Space(geometry, plans, tuple(tuple(range(1, d + 1)) for d in geometry.dims))


def tiny_vit_space(ops=ALL_OPS, ffn=PER_NEURON, model="deit_tiny_patch16_224", **overrides) -> Space:
    return make_space(resolve(model, {**TINY_VIT, **overrides}), ops, ffn)


def tiny_distilled_space(ops=ALL_OPS, ffn=PER_NEURON, **overrides) -> Space:
    return tiny_vit_space(ops, ffn, model="deit_tiny_distilled_patch16_224", **overrides)


def tiny_swin_space(ops=ALL_OPS, ffn=PER_NEURON, **overrides) -> Space:
    return make_space(resolve("swin_tiny_patch4_window7_224", {**TINY_SWIN, **overrides}), ops, ffn)


def nested_ffn(i: int, hidden: int) -> FfnChoice:
    return FfnChoice(widths=(hidden // 4, hidden // 2, hidden))


def dense_twin(net: Supernet) -> torch.nn.Module:
    """The untouched timm model with the supernet's weights."""
    g = net.space.geometry
    dense = timm.create_model(g.model, pretrained=False, **g.kwargs())
    result = dense.load_state_dict(net.model.state_dict(), strict=False)
    assert not result.missing_keys  # every timm parameter kept its name
    assert all(".attn.mix" in k or ".attn.bns." in k for k in result.unexpected_keys)
    return dense


def all_on(gates: torch.nn.Module) -> None:
    """Every SPViT gate on in every sample (noise logit(u) is within ±14 after clamping)."""
    with torch.no_grad():
        for p in gates.parameters():
            p.fill_(30.0)


def assert_grads_match(net: Supernet, dense: torch.nn.Module) -> None:
    """Every parameter of ``dense`` has the gradient of the supernet parameter of the same timm name."""
    dense_params = dict(dense.named_parameters())
    compared = 0
    for k, p in net.model.named_parameters():
        if k in dense_params:
            torch.testing.assert_close(p.grad, dense_params[k].grad, atol=1e-6, rtol=1e-5)
            compared += 1
    assert compared == len(dense_params)


# --- lowered spaces shared by the supernet and gate tests (one per process; reset before each use) ---------------

SPACES = {
    "deit": lambda: tiny_vit_space(),
    "deit_distilled_nested": lambda: tiny_distilled_space(ffn=nested_ffn),
    "swin": lambda: tiny_swin_space(),
    "swin_groups": lambda: tiny_swin_space(ffn=FfnChoice(group=8)),
}
_NETS: dict[str, Supernet] = {}


def net_for(name: str) -> Supernet:
    """One lowered supernet per space for the whole module, reset to every unit kept and the top ops."""
    if name not in _NETS:
        torch.manual_seed(0)
        _NETS[name] = lower(SPACES[name]())
    net = _NETS[name]
    net.reset()
    return net


def x_batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def random_logits(gates: torch.nn.Module, seed: int) -> None:
    """Gate logits of both signs (any module whose parameters are logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2)
