"""The unit-group core's laws, on tiny DeiT (with and without a distillation token) and tiny Swin backbones whose
spaces declare every dimension (embedding widths, heads, per-head widths, FFN, ops, per-layer sparsity):

* with every unit kept, the supernet is the dense timm model;
* at any point with any kept units, the compact network equals the supernet under the same masks (eval, ≤ 1e-5);
* its parameter count is the analytic count exactly (non-zero weights for sparse layers);
* FlopCounterMode ÷ 2 is the analytic ``exact`` multiply-add count of the dense-equivalent point, and the analytic
  sparse count is that minus the zeros times the tokens that use them;
* the differentiable cost of expected counts equals the analytic cost at integer counts, and its gradient matches
  central finite differences.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import timm
import torch
from _spaces import TINY_SWIN, TINY_VIT, every_dimension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spvit_dsl.compact.build import fold
from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.cost import BlockCounts, Counts, arch_cost, breakdown, counts_of, tally
from spvit_dsl.space.groups import value_of
from spvit_dsl.space.plan import BlockArch, Density, FrozenArch, Space
from spvit_dsl.supernet import Supernet
from spvit_dsl.supernet.flops import count_macs
from spvit_dsl.supernet.lower import lower

BACKBONES = {
    "deit": ("deit_tiny_patch16_224", TINY_VIT),
    "distilled": ("deit_tiny_distilled_patch16_224", TINY_VIT),
    "swin": ("swin_tiny_patch4_window7_224", TINY_SWIN),
}
_NETS: dict[str, Supernet] = {}


def supernet(name: str) -> Supernet:
    """One lowered supernet per backbone, with random non-trivial BatchNorm statistics (built once)."""
    if name not in _NETS:
        model, overrides = BACKBONES[name]
        torch.manual_seed(0)
        net = lower(every_dimension(resolve(model, overrides)), convention="exact").eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            for row in net.rows:
                row.attn.mix.copy_(torch.randn(row.attn.mix.shape, generator=gen))
        _NETS[name] = net
    return _NETS[name]


def random_point(space: Space, rng: random.Random) -> FrozenArch:
    g = space.geometry
    embed = tuple(rng.randint(1, d) for d in g.dims)
    blocks = []
    for p in space.plans:
        b = p.geom
        density = Density(*(rng.choice(p.density.of(layer)) for layer in ("qkv", "proj", "fc1", "fc2")))
        op = rng.choice(p.attention)
        blocks.append(
            BlockArch(
                op, rng.randint(0, b.hidden), rng.randint(1, b.heads), rng.randint(1, b.head_dim), density
            )
        )
    return FrozenArch(tuple(blocks), embed).canonical()


def random_kept(net: Supernet, arch: FrozenArch, rng: random.Random) -> dict[str, torch.Tensor]:
    """Any kept units (not the largest ones), in any order: a random ordered subset of the right size per
    structured group (the compact network's unit k is the group's unit ``kept[k]``)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    kept = {}
    for path, group in net.groups.items():
        if group.structured:
            count = int(value_of(arch, group))
            kept[path] = torch.randperm(group.size, generator=gen)[:count]
    return kept


def images(net: Supernet, batch: int = 3) -> torch.Tensor:
    g = net.geometry
    return torch.randn(batch, g.in_chans, g.img_size, g.img_size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_unit_kept_is_the_dense_timm_model(name: str) -> None:
    net = supernet(name)
    net.reset()
    g = net.geometry
    dense = timm.create_model(g.model, pretrained=False, **g.kwargs()).eval()
    missing, _unexpected = dense.load_state_dict(net.model.state_dict(), strict=False)
    assert not missing
    x = images(net)
    with torch.no_grad():
        assert torch.allclose(net(x), dense(x), atol=1e-6, rtol=0)


def _nonzero_params(model: torch.nn.Module) -> int:
    sparse = {
        id(m.weight)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    }
    return sum(int((p != 0).sum()) if id(p) in sparse else p.numel() for p in model.parameters())


def _zeros_times_uses(model: torch.nn.Module, arch: FrozenArch, net: Supernet) -> int:
    """Σ over sparse layers of (weights − non-zero weights) × the tokens each weight multiplies."""
    total = 0
    names = [b.module for b in net.geometry.blocks]
    for module, b in zip(names, net.geometry.blocks, strict=True):
        for suffix in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            try:
                layer = model.get_submodule(f"{module}.{suffix}")
            except AttributeError:
                continue
            if isinstance(layer, torch.nn.Linear):
                total += (layer.weight.numel() - int((layer.weight != 0).sum())) * b.tokens
    return total


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(BACKBONES)), seed=st.integers(0, 10_000))
def test_compact_network_equals_the_masked_supernet_and_the_cost_model(name: str, seed: int) -> None:
    net = supernet(name)
    rng = random.Random(seed)
    arch = random_point(net.space, rng)
    kept = random_kept(net, arch, rng)
    x = images(net)
    with torch.no_grad():
        net.set_arch(arch, kept)
        expected = net(x)
        compact = fold(net, arch, kept).eval()
        got = compact(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())
    g = net.geometry
    analytic = arch_cost(g, arch, "exact")
    assert _nonzero_params(compact) == analytic.params == arch_cost(g, arch, "paper").params
    dense_equivalent = FrozenArch(tuple(replace(b, density=Density()) for b in arch.blocks), arch.embed)
    measured = count_macs(compact, x[:1])
    assert measured == breakdown(g, dense_equivalent, "exact")["matmul"]
    assert measured - _zeros_times_uses(compact, arch, net) == breakdown(g, arch, "exact")["matmul"]


# --- the differentiable cost -------------------------------------------------------------------------------------


def exact_densities(g, arch: FrozenArch) -> FrozenArch:
    """Densities as a search leaves them: kept / weights of each compact layer (so density · weights is a whole
    number, where the relaxed cost of tensors and the rounded cost of a frozen point agree)."""
    out = []
    for geom, b in zip(g.blocks, arch.blocks, strict=True):
        dim, inner = arch.embed[geom.stage], b.heads * b.head_dim
        sizes = {"qkv": 3 * dim * inner, "proj": dim * inner, "fc1": dim * b.ffn, "fc2": b.ffn * dim}
        d = {k: (round(b.density.of(k) * n) / n if n else 1.0) for k, n in sizes.items()}
        out.append(replace(b, density=Density(**d)))
    return replace(arch, blocks=tuple(out))


def _as_tensors(counts: Counts) -> tuple[Counts, list[torch.Tensor]]:
    """The same counts as float64 leaf tensors (returned in a list for gradients)."""
    leaves: list[torch.Tensor] = []

    def leaf(v: float) -> torch.Tensor:
        t = torch.tensor(float(v), dtype=torch.float64, requires_grad=True)
        leaves.append(t)
        return t

    embed = [leaf(e) for e in counts.embed]
    blocks = [
        BlockCounts(
            {op: leaf(w) for op, w in c.ops.items()},
            leaf(c.heads),
            leaf(c.head_dim),
            leaf(c.ffn),
            {k: leaf(v) for k, v in c.density.items()},
        )
        for c in counts.blocks
    ]
    return Counts(embed, blocks), leaves


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(list(BACKBONES)),
    seed=st.integers(0, 10_000),
    convention=st.sampled_from(["paper", "exact"]),
)
def test_the_cost_of_expected_counts_is_exact_and_differentiable(
    name: str, seed: int, convention: str
) -> None:
    model, overrides = BACKBONES[name]
    g = resolve(model, overrides)
    space = every_dimension(g)
    arch = exact_densities(g, random_point(space, random.Random(seed)))
    counts, leaves = _as_tensors(counts_of(arch))
    value = tally(g, counts, convention).macs
    assert float(value.detach()) == pytest.approx(arch_cost(g, arch, convention).macs, rel=1e-12, abs=1e-6)
    params = tally(g, counts, convention).params
    assert float(params.detach()) == pytest.approx(arch_cost(g, arch, convention).params, rel=1e-12, abs=1e-6)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    eps = 1e-3
    for leaf, grad in zip(leaves, grads, strict=True):
        with torch.no_grad():
            leaf += eps
            up = float(tally(g, counts, convention).macs)
            leaf -= 2 * eps
            down = float(tally(g, counts, convention).macs)
            leaf += eps
        numeric = (up - down) / (2 * eps)
        assert (0.0 if grad is None else float(grad)) == pytest.approx(numeric, rel=1e-6, abs=1e-3)


def test_the_supernet_prices_counts_like_the_cost_model() -> None:
    net = supernet("swin")
    arch = exact_densities(net.geometry, random_point(net.space, random.Random(7)))
    counts, _ = _as_tensors(counts_of(arch))
    for metric, field in (("macs", "macs"), ("params", "params")):
        got = net.cost(counts, "exact", metric)
        assert got.dtype == torch.float64 and got.requires_grad
        assert float(got.detach()) == pytest.approx(
            getattr(arch_cost(net.geometry, arch, "exact"), field), rel=1e-12
        )
