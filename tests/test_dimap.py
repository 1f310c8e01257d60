"""The ``dimap`` strategy (data-free LAMP scores of single weights, one threshold per module, bisected to
the budget; a structured variant on ffn / heads / head_dim): LAMP-score and allocation properties, budgets met
on a tiny ViT and Swin with kept weights that are a magnitude threshold in every layer, the built network
against the masked supernet and the cost model, zeros kept by fine-tuning and ONNX export, and the errors a
user can hit."""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spvit_dsl.compact.build import build, load
from spvit_dsl.compile.freeze import arch_of
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.lang.errors import SpecError, UsageError
from spvit_dsl.runtime.data import load_data
from spvit_dsl.search import run_search
from spvit_dsl.search.methods.dimap import MODULES, Allocation, LayerScores, allocate, lamp_scores
from spvit_dsl.space.cost import arch_cost, breakdown
from spvit_dsl.space.groups import UnitGroup
from spvit_dsl.space.plan import LAYERS, Density
from spvit_dsl.supernet.flops import count_macs
from spvit_dsl.supernet.lower import lower
from spvit_dsl.train.finetune import FinetuneSettings, finetune


def vit(dim: int, depth: int) -> str:
    return (
        "backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; channels = 1; classes = 10; "
        f"embed_dim = {dim}; depth = {depth}; heads = 3 }}\n"
    )


def space(budget: str, scope: str) -> str:
    blocks = "blocks all { sparsity: 0..0.95 step 0.05 }\n"
    return vit(48, 3) + blocks + f"budget {{ {budget} }}\nsearch dimap {{ scope = {scope} }}\n"


SWIN = """backbone swin_tiny_patch4_window7_224 {
  weights = none; image = 32; patch = 2; channels = 1; classes = 10
  embed_dim = 32; depth = (2, 2, 2); heads = (2, 4, 8); window = 4
}
blocks all { sparsity: 0..0.95 step 0.05 }
budget { params <= 60% }
search dimap { scope = module }
"""
BUDGETS = ["flops <= 40%", "flops <= 50%", "flops <= 60%", "params <= 50%", "flops <= 60%; params <= 45%"]
HEAVY = "blocks.0.mlp.fc1"  # its mass sits in 15% of its weights: LAMP must cut it more than its module
SUFFIX = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
SPARSE = tuple(f"{s}.weight" for s in SUFFIX.values())  # the prunable weights, by their timm name's ending


# --- 1. LAMP scores -----------------------------------------------------------------------------------------

weights_2d = st.integers(1, 6).flatmap(
    lambda rows: st.lists(
        st.lists(
            st.floats(-100, 100, width=32) | st.sampled_from([0.0, 0.5, -0.5, 2.0]), min_size=4, max_size=4
        ),
        min_size=rows,
        max_size=rows,
    )
)


def naive_lamp(weight: torch.Tensor) -> list[float]:
    """Imp(w(j)) = w(j)² / Σ_{i≤j} w(i)², sorted by |w| descending (ties: lower flat index first)."""
    flat = [float(v) for v in weight.flatten().tolist()]
    order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))
    out, total = [0.0] * len(flat), 0.0
    for i in order:
        total += flat[i] * flat[i]
        out[i] = flat[i] * flat[i] / total if total > 0 else 0.0
    return out


@settings(max_examples=150, deadline=None)
@given(rows=weights_2d)
def test_lamp_scores_follow_the_definition(rows: list[list[float]]) -> None:
    w = torch.tensor(rows, dtype=torch.float32)
    scores = lamp_scores(w)
    assert scores.shape == w.shape and scores.dtype == torch.float64
    flat, mag = scores.flatten().tolist(), w.abs().flatten().tolist()
    for a in range(len(flat)):  # the magnitude order inside the layer
        for b in range(len(flat)):
            if mag[a] > mag[b]:
                assert flat[a] >= flat[b], (a, b)
    for s, m in zip(flat, mag, strict=True):  # in (0, 1] for non-zero weights, 0 for zeros
        assert (0 < s <= 1) if m > 0 else s == 0
    if max(mag) > 0:
        assert flat[mag.index(max(mag))] == 1.0  # the largest weight (first of ties) scores exactly 1
        assert max(flat) == 1.0
    assert flat == pytest.approx(naive_lamp(w), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("seed", range(5))
def test_lamp_scores_match_the_naive_loop_on_random_matrices(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 5, generator=gen) * torch.rand(7, 1, generator=gen) * 3
    assert lamp_scores(w).flatten().tolist() == pytest.approx(naive_lamp(w), rel=1e-12)
    assert torch.equal(lamp_scores(w), lamp_scores(-2 * w))  # sign- and scale-free within a layer


# --- 2. allocation ------------------------------------------------------------------------------------------


@st.composite
def layer_sets(draw, bounded: bool = False, low0: bool = False) -> list[LayerScores]:
    layers = []
    for i in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(LAYERS))
        shape = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
        w = torch.randn(shape, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
        if draw(st.booleans()):  # ties and zeros
            w = torch.round(w * 2 / w.abs().max().clamp_min(1e-12)) / 2
            w[0, 0] = 1.0  # never an all-zero layer
        n = w.numel()
        low, high = (0 if low0 else 1), n
        if bounded:
            low = draw(st.integers(1, n))
            high = draw(st.integers(low, n))
        group = UnitGroup(f"blocks.{i}.{SUFFIX[name]}", "weights", n, (0.05, 1.0), block=i, layer=name)
        ranked = torch.sort(lamp_scores(w).flatten(), descending=True).values.float()
        layers.append(LayerScores(group, MODULES[name], ranked, low, high))
    return layers


fractions = st.floats(0, 1, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(
    layers=layer_sets(),
    fs=st.lists(fractions, min_size=2, max_size=6),
    scope=st.sampled_from(["module", "global"]),
)
def test_allocation_is_monotone_and_never_empties_a_layer(layers, fs, scope) -> None:
    table = Allocation(layers, scope)
    runs = [table.counts(f) for f in sorted([0.0, 1.0, *fs])]
    for before, after in zip(runs, runs[1:], strict=False):
        assert all(before[p] <= after[p] for p in before)
    assert all(c >= 1 for run in runs for c in run.values())
    assert runs[-1] == {layer.group.path: layer.n for layer in layers}  # fraction 1 keeps everything
    assert allocate(layers, fs[0], scope) == table.counts(fs[0])


@settings(max_examples=60, deadline=None)
@given(layers=layer_sets(low0=True), f=st.floats(1e-6, 1))
def test_a_threshold_at_most_one_never_empties_a_layer_even_without_a_lower_bound(layers, f) -> None:
    assert all(c >= 1 for c in allocate(layers, f, "module").values())


@settings(max_examples=100, deadline=None)
@given(layers=layer_sets(), f=fractions, scope=st.sampled_from(["module", "global"]))
def test_each_module_keeps_its_fraction_with_one_threshold(layers, f, scope) -> None:
    counts = allocate(layers, f, scope)
    modules: dict[str, list[LayerScores]] = {}
    for layer in layers:
        modules.setdefault("all" if scope == "global" else layer.module, []).append(layer)
    for members in modules.values():
        scores = torch.cat([m.ranked for m in members])
        n, k = scores.numel(), math.ceil(f * scores.numel() - 1e-9)
        t = float(torch.sort(scores, descending=True).values[k - 1]) if k else math.inf
        ties = int((scores == t).sum())
        kept = sum(counts[m.group.path] for m in members)
        assert k <= kept <= k + max(ties - 1, 0) + len(members), (k, kept, ties, n)
        # one threshold: every kept weight (not kept by the lower bound) outscores every dropped weight
        last_kept = [
            float(m.ranked[counts[m.group.path] - 1]) for m in members if counts[m.group.path] > m.low
        ]
        first_dropped = [float(m.ranked[counts[m.group.path]]) for m in members if counts[m.group.path] < m.n]
        if last_kept and first_dropped:
            assert min(last_kept) > max(first_dropped)


@settings(max_examples=60, deadline=None)
@given(layers=layer_sets(bounded=True), f=fractions, scope=st.sampled_from(["module", "global"]))
def test_counts_respect_the_bounds(layers, f, scope) -> None:
    counts = allocate(layers, f, scope)
    assert all(m.low <= counts[m.group.path] <= m.high for m in layers)


# --- 3. end to end on a tiny ViT ----------------------------------------------------------------------------


def _checkpoint(program, path: Path) -> str:
    """A timm state dict with random weights, one layer heavy-tailed (so LAMP's allocation is not uniform)."""
    g = program.space.geometry
    torch.manual_seed(0)
    sd = timm.create_model(g.model, pretrained=False, **g.kwargs()).state_dict()
    gen = torch.Generator().manual_seed(1)
    for key, value in sd.items():
        if key.endswith(SPARSE):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.05)
    heavy = sd[f"{HEAVY}.weight"]
    heavy.mul_(torch.where(torch.rand(heavy.shape, generator=gen) < 0.15, 1.0, 1e-3))
    torch.save(sd, path)
    return str(path)


@functools.cache
def searched(budget: str, scope: str, folder: str):
    """(program, result, init checkpoint) of one dimap search on the tiny ViT (cached for the module)."""
    text = space(budget, scope)
    out = Path(folder) / f"b{BUDGETS.index(budget)}-{scope}"
    out.mkdir(parents=True)
    (out / "space.vit").write_text(text)
    program = compile_file(str(out / "space.vit"))
    ckpt = _checkpoint(program, out / "init.pth")
    result = run_search(program, out=str(out / "run"), quiet=True, device="cpu", init_checkpoint=ckpt)
    return program, result, ckpt


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("dimap"))


def _layer_weights(ckpt: str) -> dict[str, torch.Tensor]:
    """The prunable weights of the dense checkpoint the search started from, by group path."""
    return {
        k.removesuffix(".weight"): v
        for k, v in torch.load(ckpt, weights_only=True).items()
        if k.endswith(SPARSE)
    }


@pytest.mark.parametrize("scope", ["module", "global"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_meets_every_budget_with_a_magnitude_threshold_per_layer(
    folder: str, budget: str, scope: str
) -> None:
    program, result, ckpt = searched(budget, scope, folder)
    assert [b["metric"] for b in result.budgets] == [b.metric for b in program.budgets]
    frozen = compile_file(result.frozen_path)
    assert frozen.frozen
    arch = arch_of(frozen.checked)
    cost = program.graph.cost(arch, program.convention)  # priced independently, from the frozen file
    ratios = [(cost.macs if b.metric == "flops" else cost.params) / b.absolute for b in program.budgets]
    assert max(ratios) <= 1 and max(ratios) >= 0.99, ratios
    assert [b["ratio"] for b in result.budgets] == pytest.approx(ratios, rel=1e-9)
    weights = _layer_weights(ckpt)
    modules: dict[str, list[tuple[int, int]]] = {}
    last_kept: dict[str, list[float]] = {}
    first_dropped: dict[str, list[float]] = {}
    for i, block in enumerate(arch.blocks):
        for layer in LAYERS:
            path = f"blocks.{i}.{SUFFIX[layer]}"
            w = weights[path]
            mask = result.kept.get(path, torch.ones(w.shape, dtype=torch.bool))
            count = int(mask.sum())
            # the density in the frozen text gives back the kept count; no layer is emptied
            assert count == round(block.density.of(layer) * w.numel()) >= 1, path
            assert bool(mask.flatten()[int(w.abs().argmax())]), path  # the largest weight is kept
            if count < w.numel():  # kept = top-k by |w|
                assert float(w.abs()[mask].min()) >= float(w.abs()[~mask].max()), path
            scores = lamp_scores(w).float()
            key = "all" if scope == "global" else MODULES[layer]
            modules.setdefault(key, []).append((count, w.numel()))
            last_kept.setdefault(key, []).append(float(scores[mask].min()))
            if count < w.numel():
                first_dropped.setdefault(key, []).append(float(scores[~mask].max()))
    assert set(modules) == ({"all"} if scope == "global" else {"QKV-M", "PRJ-M", "MLP-M"})
    fraction = result.info["kept_fraction"]
    for key, layers in modules.items():  # each module keeps the same fraction, cut at one LAMP threshold
        kept, total = sum(c for c, _ in layers), sum(n for _, n in layers)
        assert abs(kept - fraction * total) <= len(layers) + 1, key
        if key in first_dropped:
            assert min(last_kept[key]) > max(first_dropped[key]), key
    fc = [arch.blocks[i].density.of(layer) for i in range(len(arch.blocks)) for layer in ("fc1", "fc2")]
    assert fc[0] < min(fc[1:])  # the heavy-tailed fc1 of block 0 gives up the most of its module


# --- 4. the built network -----------------------------------------------------------------------------------


def _zeros_times_tokens(model, geometry) -> int:
    return sum(
        (layer.weight.numel() - int(torch.count_nonzero(layer.weight))) * b.tokens
        for b in geometry.blocks
        for layer in (model.get_submodule(f"{b.module}.{s}") for s in SUFFIX.values())
    )


@pytest.mark.parametrize("scope", ["module", "global"])
def test_built_network_matches_densities_cost_and_masked_supernet(folder: str, scope: str) -> None:
    program, result, ckpt = searched(BUDGETS[1], scope, folder)
    model = build(result.frozen_path, weights=result.checkpoint_path).eval()
    arch, g = model.spvit_arch, program.space.geometry
    assert arch.sparse and arch == arch_of(compile_file(result.frozen_path).checked)
    for i, b in enumerate(arch.blocks):
        for layer in LAYERS:
            weight = model.get_submodule(f"blocks.{i}.{SUFFIX[layer]}").weight
            assert int(torch.count_nonzero(weight)) == round(b.density.of(layer) * weight.numel())
            kept = result.kept.get(f"blocks.{i}.{SUFFIX[layer]}")
            if kept is not None:
                assert torch.equal(weight != 0, kept)
    zeros = sum(p.numel() - int(torch.count_nonzero(p)) for p in _sparse_weights(model).values())
    assert sum(p.numel() for p in model.parameters()) - zeros == arch_cost(g, arch, "exact").params
    x = torch.randn(2, g.in_chans, g.img_size, g.img_size, generator=torch.Generator().manual_seed(3))
    dense_equivalent = replace(arch, blocks=tuple(replace(b, density=Density()) for b in arch.blocks))
    measured = count_macs(model, x[:1])
    assert measured == breakdown(g, dense_equivalent, "exact")["matmul"]
    assert measured - _zeros_times_tokens(model, g) == breakdown(g, arch, "exact")["matmul"]
    torch.manual_seed(0)
    net = lower(program.space, weights=ckpt).eval()
    with torch.no_grad():
        net.set_arch(result.arch, result.kept)
        want = net(x)
        net.reset()
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- 5./6. fine-tuning and ONNX keep the zeros --------------------------------------------------------------


def _sparse_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(SPARSE)}


def test_finetune_keeps_every_pruned_weight_at_zero(folder: str, tmp_path: Path) -> None:
    _program, result, _ckpt = searched(BUDGETS[1], "module", folder)
    model = build(result.frozen_path, weights=result.checkpoint_path)
    zeros = {n: (w == 0).clone() for n, w in _sparse_weights(model).items()}
    assert sum(int(z.sum()) for z in zeros.values()) > 0
    before = {n: w.detach().clone() for n, w in _sparse_weights(model).items()}
    data = load_data("digits", model.spvit_geometry)
    out = finetune(
        model, data, FinetuneSettings(epochs=1, steps=3, lr=1e-3, warmup_epochs=0), out=str(tmp_path)
    )
    for trained in (model, load(out.best_path)):
        for name, weight in _sparse_weights(trained).items():
            assert torch.equal(weight == 0, zeros[name]), f"{name}: pruned weights were trained back"
    assert any(not torch.equal(before[n], w) for n, w in _sparse_weights(model).items())  # it did train


def test_onnx_export_keeps_the_zeros(folder: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    from onnx import numpy_helper

    from spvit_dsl.compact.export import export_onnx

    _program, result, _ckpt = searched(BUDGETS[1], "global", folder)
    model = build(result.frozen_path, weights=result.checkpoint_path).eval()
    export_onnx(model, str(tmp_path / "m.onnx"))
    arrays = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    pruned = 0
    for name, w in _sparse_weights(model).items():
        w = w.detach().numpy()
        pruned += int((w == 0).sum())
        assert any(
            a.shape == w.shape and (a == w).all() or a.shape == w.T.shape and (a == w.T).all() for a in arrays
        ), name
    assert sum(int((a == 0).sum()) for a in arrays) >= pruned > 0


# --- 7./8. structured variant and errors --------------------------------------------------------------------


def _spec(blocks: str, budget: str = "flops <= 50%", settings_: str = "") -> str:
    return vit(96, 2) + f"blocks all {{ {blocks} }}\nbudget {{ {budget} }}\nsearch dimap {{ {settings_} }}\n"


def test_structured_variant_meets_the_budget_with_a_dense_network(tmp_path: Path) -> None:
    program = compile_text(_spec("ffn: per neuron; head_dim: 8..32 step 8"), str(tmp_path / "s.vit"))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    arch = arch_of(compile_file(result.frozen_path).checked)
    assert not arch.sparse and all(b.density == Density() for b in arch.blocks)
    cost = program.graph.cost(arch, program.convention)
    (budget,) = program.budgets
    assert 0.99 * budget.absolute <= cost.macs <= budget.absolute
    assert any(b.ffn < 384 for b in arch.blocks)  # it did cut rows
    for path, index in result.kept.items():  # kept units: ascending indices, no weights masks
        assert index.dtype == torch.int64 and torch.equal(index, torch.sort(index).values), path


def test_mixing_sparsity_with_rows_is_a_one_line_usage_error(tmp_path: Path) -> None:
    program = compile_text(_spec("sparsity: 0..0.5 step 0.25; ffn: per neuron"), str(tmp_path / "m.vit"))
    with pytest.raises(UsageError) as info:
        run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    message = str(info.value)
    assert "\n" not in message and "sparsity" in message and "ffn" in message


def test_an_unreachable_budget_is_refused_when_compiling(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        compile_text(_spec("sparsity: 0..0.5 step 0.25", budget="flops <= 5%"), str(tmp_path / "u.vit"))
    assert "flops" in str(info.value) and info.value.span is not None and info.value.span.line == 3


def test_a_bogus_scope_is_a_located_spec_error(tmp_path: Path) -> None:
    text = _spec("sparsity: 0..0.5 step 0.25", settings_="scope = bogus")
    with pytest.raises(SpecError) as info:
        compile_text(text, str(tmp_path / "b.vit"))
    message, span = str(info.value), info.value.span
    assert "module" in message and "global" in message and "bogus" in message
    assert span is not None and span.line == 4
    assert text.splitlines()[3][span.column - 1 : span.end_column - 1] == "bogus"


# --- 9. Swin ------------------------------------------------------------------------------------------------


def test_swin_meets_a_params_budget_with_module_scope(tmp_path: Path) -> None:
    program = compile_text(SWIN, str(tmp_path / "swin.vit"))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    arch = arch_of(compile_file(result.frozen_path).checked)
    (budget,) = program.budgets
    params = program.graph.cost(arch, program.convention).params
    assert 0.99 * budget.absolute <= params <= budget.absolute
    assert result.info["scope"] == "module" and set(result.info["thresholds"]) == {"QKV-M", "PRJ-M", "MLP-M"}
    assert arch.sparse and all(0.05 <= b.density.of(layer) <= 1 for b in arch.blocks for layer in LAYERS)


# --- regressions: fixed densities, the compiler's cheapest point, 12-digit densities, diff membership ----------


def test_a_fixed_sparsity_is_kept_while_the_rest_is_searched(tmp_path: Path) -> None:
    blocks = "sparsity: {qkv: 0.5, fc1: 0..0.9 step 0.1}"
    program = compile_text(_spec(blocks, budget="flops <= 80%"), str(tmp_path / "f.vit"))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    arch = arch_of(compile_file(result.frozen_path).checked)
    assert all(b.density.qkv == 0.5 for b in arch.blocks)  # declared, fixed: never reset to dense
    assert all(b.density.proj == 1.0 and b.density.fc2 == 1.0 for b in arch.blocks)  # not declared: dense
    assert any(b.density.fc1 < 1.0 for b in arch.blocks)


def test_a_budget_at_the_compilers_cheapest_network_is_met(tmp_path: Path) -> None:
    draft = compile_text(_spec("sparsity: 0..0.95 step 0.05"), str(tmp_path / "d.vit"))
    cheapest = draft.bounds().params.min
    program = compile_text(
        _spec("sparsity: 0..0.95 step 0.05", budget=f"params <= {cheapest / 1e3:.3f}K"),
        str(tmp_path / "c.vit"),
    )
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    assert result.costs["params"] <= program.budgets[0].absolute


def test_densities_survive_the_frozen_text_to_the_weight(tmp_path: Path) -> None:
    """A frozen density gives back the exact kept count for a layer of millions of weights (12 digits)."""
    text = (
        "backbone vit_base_patch16_224 { weights = none; image = 32; patch = 8; classes = 10; "
        "embed_dim = 768; depth = 1; heads = 12 }\nblocks all { sparsity: 0..0.95 step 0.05 }\n"
        "budget { flops <= 50% }\nsearch dimap { }\n"
    )
    result = run_search(compile_text(text, str(tmp_path / "b.vit")), out=str(tmp_path / "run"), quiet=True)
    searched_arch = result.arch
    frozen = arch_of(compile_file(result.frozen_path).checked)
    program = compile_file(result.frozen_path)
    for b_search, b_frozen, plan in zip(
        searched_arch.blocks, frozen.blocks, program.space.plans, strict=True
    ):
        g = plan.geom
        sizes = {
            "qkv": 3 * g.dim * g.dim,
            "proj": g.dim * g.dim,
            "fc1": g.dim * g.hidden,
            "fc2": g.dim * g.hidden,
        }
        for layer, n in sizes.items():
            assert round(b_search.density.of(layer) * n) == round(b_frozen.density.of(layer) * n), layer
    model = build(result.frozen_path, weights=result.checkpoint_path)
    mask = result.kept["blocks.0.mlp.fc2"]
    assert torch.equal(model.blocks[0].mlp.fc2.weight != 0, mask)  # the search's mask, not a re-derived one


def test_diff_calls_a_dimap_result_a_member_of_its_space(tmp_path: Path) -> None:
    from spvit_dsl.compile.diff import diff

    path = tmp_path / "s.vit"
    path.write_text(_spec("sparsity: 0..0.95 step 0.05"))
    program = compile_file(str(path))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    d = diff(program, compile_file(result.frozen_path))
    assert d.member is True, d.breaks
    outside = compile_text(
        _spec("sparsity: 0..0.25 step 0.05", budget="flops <= 95%"), str(tmp_path / "o.vit")
    )
    assert (
        diff(outside, compile_file(result.frozen_path)).member is False
    )  # 50% FLOPs needs more than 25% zeros


# --- our extension: 2:4 semi-structured sparsity ----------------------------------------------------------------


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_two_of_four_keeps_the_two_largest_of_every_four(rows: int, groups: int, seed: int) -> None:
    from spvit_dsl.compact.semi import is_two_of_four
    from spvit_dsl.search.methods.dimap import two_of_four

    w = torch.randn(rows, 4 * groups, generator=torch.Generator().manual_seed(seed))
    mask = two_of_four(w)
    quads, kept = w.abs().view(rows, groups, 4), mask.view(rows, groups, 4)
    assert torch.equal(kept.sum(-1), torch.full((rows, groups), 2))
    smallest_kept = torch.where(kept, quads, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, quads).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())
    assert is_two_of_four(w * mask) and not is_two_of_four(w)
    with pytest.raises(ValueError, match="groups of 4"):
        two_of_four(torch.randn(2, 6))


def test_semi_structured_search_gives_two_of_four_layers_under_the_budget(tmp_path: Path) -> None:
    from spvit_dsl.compact.semi import semi_structured_layers

    text = _spec("sparsity: {0, 0.5}", budget="flops <= 75%", settings_="semi_structured = true")
    program = compile_text(text, str(tmp_path / "semi.vit"))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    arch = arch_of(compile_file(result.frozen_path).checked)
    assert result.costs["flops_paper"] <= program.budgets[0].absolute
    densities = {b.density.of(layer) for b in arch.blocks for layer in LAYERS}
    assert densities <= {0.5, 1.0} and 0.5 in densities
    model = build(result.frozen_path, weights=result.checkpoint_path)
    sparse = {
        f"blocks.{i}.{SUFFIX[la]}" for i, b in enumerate(arch.blocks) for la in LAYERS if b.density.of(la) < 1
    }
    assert set(semi_structured_layers(model)) == sparse


def test_semi_structured_needs_half_density_in_the_space(tmp_path: Path) -> None:
    text = _spec("sparsity: 0..0.25 step 0.25", budget="flops <= 95%", settings_="semi_structured = true")
    with pytest.raises(UsageError, match="density 0.5"):
        run_search(compile_text(text, str(tmp_path / "s.vit")), out=str(tmp_path / "run"), quiet=True)


def test_semi_structured_respects_a_space_without_dense_layers(tmp_path: Path) -> None:
    """proj fixed at sparsity 0.5, the other layers {0, 0.5}: proj is 2:4 in every block, the rest chosen."""
    blocks = "sparsity: {qkv: 0..0.5 step 0.5, proj: 0.5, fc1: 0..0.5 step 0.5, fc2: 0..0.5 step 0.5}"
    text = _spec(blocks, budget="flops <= 80%", settings_="semi_structured = true")
    program = compile_text(text, str(tmp_path / "semi.vit"))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    arch = arch_of(compile_file(result.frozen_path).checked)
    assert all(b.density.proj == 0.5 for b in arch.blocks)
    assert result.costs["flops_paper"] <= program.budgets[0].absolute


@pytest.mark.parametrize(
    ("blocks", "budget", "message"),
    [
        ("ffn: per neuron", "flops <= 80%", "semi_structured = true prunes weights"),
        ("sparsity: {0, 0.5, 0.9}", "flops <= 40%", "with every declared layer at 2:4"),
    ],
)
def test_semi_structured_refusals_are_one_line(
    tmp_path: Path, blocks: str, budget: str, message: str
) -> None:
    text = _spec(blocks, budget=budget, settings_="semi_structured = true")
    with pytest.raises(UsageError, match=message) as info:
        run_search(compile_text(text, str(tmp_path / "s.vit")), out=str(tmp_path / "run"), quiet=True)
    assert "\n" not in str(info.value)
