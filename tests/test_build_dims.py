"""Every dimension: compact networks of points that change embedding widths, heads, per-head widths, FFN widths,
ops and per-layer densities equal the masked supernet, keep the dense softmax scale, store sparse layers dense with
exactly round(density·n) non-zeros, build from search checkpoints and dense weights, and match the cost model
(parameters, FlopCounterMode ÷ 2)."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import pytest
import torch
from _frozen import (
    DISTILLED_BACKBONE,
    FAMILY_BACKBONES,
    SWIN_BACKBONE,
    SWIN_PADDED_BACKBONE,
    SWINV2_BACKBONE,
    SWINV2_CR_BACKBONE,
    VIT_BACKBONE,
    every_dimension_text,
    images,
    pattern_arch,
    randomise,
    search_program,
    write_frozen,
)
from _spaces import every_dimension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from spvit_dsl.cli import app
from spvit_dsl.compact import (
    CompactAttention,
    CompactWindowAttention,
    CompactWindowAttentionV2,
    CompactWindowAttentionV2Cr,
    ConvBranch,
    FfnBias,
    SkipBranch,
    create_compact,
)
from spvit_dsl.compact.build import build, fold, load, save
from spvit_dsl.compile.program import compile_text
from spvit_dsl.lang.errors import UsageError
from spvit_dsl.search.checkpoint import Checkpoint, save_checkpoint, spec_hash
from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.cost import arch_cost, breakdown
from spvit_dsl.space.groups import embed_path, layer_module
from spvit_dsl.space.plan import LAYERS, BlockArch, Density, FrozenArch
from spvit_dsl.supernet import save_supernet
from spvit_dsl.supernet.flops import count_macs
from spvit_dsl.supernet.lower import lower

SPECS = {name: every_dimension_text(b) for name, b in (("vit", VIT_BACKBONE), ("distilled", DISTILLED_BACKBONE),
                                                       ("swin", SWIN_BACKBONE))}  # fmt: skip
SPECS |= {name: every_dimension_text(b) for name, b in FAMILY_BACKBONES.items()}
SPECS["swin_padded"] = every_dimension_text(SWIN_PADDED_BACKBONE)
SPECS["swinv2"] = every_dimension_text(SWINV2_BACKBONE)
SPECS["swinv2_cr"] = every_dimension_text(SWINV2_CR_BACKBONE)
runner = CliRunner()


@functools.cache
def _program(name):
    program = compile_text(SPECS[name], f"/nowhere/{name}.vit")
    assert program.space == every_dimension(program.space.geometry)
    return program


@functools.cache
def _net(name, seed=0):
    """One randomised supernet per family, reused: fold resets its masks after every call."""
    net = lower(_program(name).space)
    randomise(net, seed)
    return net.eval()


@st.composite
def points(draw, space, sparse=True):
    blocks = []
    for p in space.plans:
        b = p.geom
        density = (
            Density(*(draw(st.sampled_from(p.density.of(layer))) for layer in LAYERS))
            if sparse
            else Density()
        )
        ffn = draw(st.integers(0, b.hidden))
        blocks.append(
            BlockArch(draw(st.sampled_from(p.attention)), ffn, draw(st.sampled_from(p.heads)),
                      draw(st.sampled_from(p.head_dim)), density)
        )  # fmt: skip
    return FrozenArch(tuple(blocks), tuple(draw(st.sampled_from(widths)) for widths in space.embed))


def _random_kept(net, arch, seed=0):
    """Arbitrary kept units of every structured group (not the largest), in a random order."""
    from spvit_dsl.space.groups import value_of

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, group in net.groups.items():
        if group.structured:
            out[path] = torch.randperm(net.size(path), generator=gen)[: int(value_of(arch, group))]
    return out


def _blocks(model, geometry):
    return [model.get_submodule(b.module) for b in geometry.blocks]


def _sparse_layers(model, geometry, arch):
    """(block, layer, weight of the compact network) of every layer the point runs."""
    out = []
    for i, (block, a) in enumerate(zip(_blocks(model, geometry), arch.blocks, strict=True)):
        layers = (["qkv", "proj"] if a.op == "msa" else []) + (["fc1", "fc2"] if a.ffn else [])
        out += [(i, layer, block.get_submodule(layer_module(layer)).weight) for layer in layers]
    return out


def _support(net, kept, i, layer):
    """Bool masks of the rows and columns of a layer's dense weight that the structured groups keep."""
    b = net.geometry.blocks[i]

    def keep(path, n):
        out = torch.zeros(n, dtype=torch.bool)
        out[kept[path] if path in kept else slice(None)] = True
        return out

    e = keep(embed_path(net.geometry, b.stage), b.dim)
    inner = (
        keep(f"blocks.{i}.heads", b.heads)[:, None] & keep(f"blocks.{i}.head_dim", b.head_dim)[None]
    ).flatten()
    ffn = keep(f"blocks.{i}.ffn", b.hidden)
    fc1 = ffn.repeat(b.fc1_per_neuron)  # a packed SwiGLU: value and gate rows
    return {"qkv": (inner.repeat(3), e), "proj": (e, inner), "fc1": (fc1, e), "fc2": (e, ffn)}[layer]


def _check_sparse(model, geometry, arch):
    """Each layer the point runs keeps exactly round(density · n) of its n weights (stored dense, zeros in place);
    the parameters, those layers counted by their non-zero weights, are the cost model's."""
    layers = _sparse_layers(model, geometry, arch)
    for i, layer, weight in layers:
        density = arch.blocks[i].density.of(layer)
        assert int(torch.count_nonzero(weight)) == round(density * weight.numel()), (i, layer, density)
    zeros = sum(weight.numel() - int(torch.count_nonzero(weight)) for _, _, weight in layers)
    assert sum(p.numel() for p in model.parameters()) - zeros == arch_cost(geometry, arch, "exact").params


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Every network of this module is built in float64 (timm, the supernet, the compact network, the images): the
    draws include degenerate networks (a residual stream of 2 channels, where a LayerNorm over two values is
    ill-conditioned) on which float32 round-off alone reaches 3e-5, so equality is checked where it is exact."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _check_equal(net, model, arch, kept, x):
    """Logits and final features (the supernet's at the kept channels of the last stage) agree to 1e-9 of their
    largest magnitude (float64, see :func:`_float64`)."""
    g = net.geometry
    assert x.dtype == torch.float64 and next(model.parameters()).dtype == torch.float64
    with torch.no_grad():
        full = net.set_arch(arch, kept)
        want_features, want = net.model.forward_features(x), net(x)
        net.reset()
        got_features, got = model.forward_features(x), model(x)
    channels = full.get(embed_path(g, g.stages - 1))
    if channels is not None:  # SwinV2-CR's stages hand NCHW maps on (timm's layout), the others channels last
        want_features = want_features.index_select(1 if g.swin_v2_cr else -1, channels)
    for g_, w_ in ((got_features, want_features), (got, want)):
        torch.testing.assert_close(g_, w_, rtol=0, atol=1e-9 * max(1.0, float(w_.abs().max())))


# --- exactness, scale, sparse storage --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_dimension_folds_to_the_masked_supernet(name, data):
    net, g = _net(name), _program(name).space.geometry
    arch = data.draw(points(_program(name).space))
    kept = _random_kept(net, arch, seed=data.draw(st.integers(0, 99)))
    model = fold(net, arch, kept).eval()
    assert model.spvit_arch == arch
    _check_equal(net, model, arch, kept, images(g))
    _check_sparse(model, g, arch.canonical())
    last = g.stages - 1
    head = model.head.fc.weight if g.family == "swin" else model.head.weight
    dense_head = net.model.head.fc.weight if g.family == "swin" else net.model.head.weight
    if g.global_pool == "map":  # the head reads the attention pool's output, not the residual stream
        torch.testing.assert_close(head, dense_head)
    else:
        torch.testing.assert_close(
            head, dense_head[:, kept[f"stages.{last}.embed" if g.family == "swin" else "embed"]]
        )


def _cut_point(g, op=lambda i: "msa"):
    """Every dimension below its dense size: one head less where there are two, 5 of 16 channels per head, width
    three quarters (the dense width under an attention-pool head), densities (0.5, 0.75, 0.5, 0.75)."""
    blocks = tuple(
        BlockArch(op(b.index), b.hidden // 3, max(1, b.heads - 1), 5, Density(0.5, 0.75, 0.5, 0.75))
        for b in g.blocks
    )
    return FrozenArch(blocks, g.dims if g.global_pool == "map" else tuple(3 * d // 4 for d in g.dims))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cut_heads_keep_the_dense_softmax_scale(name):
    net, g = _net(name), _program(name).space.geometry
    arch = _cut_point(g)
    model = fold(net, arch).eval()
    kind = CompactWindowAttention if g.family == "swin" else CompactAttention
    for block, geom, a in zip(_blocks(model, g), g.blocks, arch.blocks, strict=True):
        attn = block.attn
        cosine = g.blocks[
            0
        ].swin_v2  # a learned per-head logit scale instead of 1/sqrt(d), cut with its heads
        if cosine:
            v2 = CompactWindowAttentionV2Cr if g.swin_v2_cr else CompactWindowAttentionV2
            assert isinstance(attn, v2) and (attn.num_heads, attn.head_dim) == (a.heads, 5)
            assert attn.logit_scale.numel() == a.heads
            continue
        assert isinstance(attn, kind) and (attn.num_heads, attn.head_dim) == (a.heads, 5)
        assert attn.qkv.weight.shape == (3 * a.heads * 5, arch.embed[geom.stage])
        assert attn.scale == pytest.approx(geom.head_dim**-0.5) and attn.scale != pytest.approx(5**-0.5)
    _check_equal(net, model, arch, None, images(g))  # the supernet keeps the dense scale too


@pytest.mark.parametrize("fused", [True, False])
def test_compact_attention_computes_scaled_dot_product_attention(fused):
    """An independent reference: softmax(q·kᵀ·scale)·v over heads of head_dim channels, then proj."""
    torch.manual_seed(0)
    attn = CompactAttention(12, 2, 5, scale=0.25, qkv_bias=True).eval()
    attn.fused_attn = fused
    x = torch.randn(3, 7, 12)
    q, k, v = attn.qkv(x).reshape(3, 7, 3, 2, 5).permute(2, 0, 3, 1, 4)
    z = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
    want = attn.proj(z.transpose(1, 2).reshape(3, 7, 10))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_sparse_layers_keep_the_supernets_weights_in_place(name):
    net, g = _net(name), _program(name).space.geometry
    arch = _cut_point(g, op=lambda i: ("msa", "conv3x3")[i % 2])
    kept = net.kept_for(arch)
    model = fold(net, arch, kept).eval()
    _check_sparse(model, g, arch.canonical())
    for i, layer, weight in _sparse_layers(model, g, arch):
        dense = net.layers(i)[layer].weight * kept[f"blocks.{i}.{layer_module(layer)}"]
        rows, cols = _support(net, kept, i, layer)
        torch.testing.assert_close(weight, dense[rows][:, cols], rtol=0, atol=0)
    for block, a in zip(_blocks(model, g), arch.blocks, strict=True):
        if a.op == "conv3x3":  # conv ops are never sparse; their bottleneck is the kept per-head width
            assert isinstance(block.attn, ConvBranch) and block.attn.conv.out_channels == 5
            assert int(torch.count_nonzero(block.attn.conv.weight)) == block.attn.conv.weight.numel()


# --- modules and limits -----------------------------------------------------------------------------------


def test_skip_adds_zero_and_width_zero_keeps_fc2_bias(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    g = program.space.geometry
    arch = FrozenArch(tuple(BlockArch("skip", 0, b.heads, b.head_dim) for b in g.blocks), g.dims)
    model = create_compact(g, arch).eval()
    block = model.blocks[1]
    assert isinstance(block.attn, SkipBranch) and isinstance(block.mlp, FfnBias)
    assert isinstance(block.norm1, torch.nn.Identity)  # a skip block has no norm1 at all
    with torch.no_grad():
        block.mlp.bias.copy_(torch.randn(g.embed_dim))
        x = torch.randn(2, g.blocks[1].tokens, g.embed_dim)
        torch.testing.assert_close(block(x), x + block.mlp.bias, rtol=0, atol=0)


def test_conv_branch_trains_like_the_plain_module_sequence():
    """Training mode too: same output, same gradients, same BatchNorm running statistics as NCHW modules."""
    import copy

    torch.manual_seed(0)
    branch = ConvBranch(24, 8, 3, (5, 4), prefix=2).train()
    plain = copy.deepcopy(branch)
    x = torch.randn(3, 2 + 20, 24, requires_grad=True)
    got = branch(x)
    patches = x[:, 2:].transpose(1, 2).reshape(3, 24, 5, 4)
    y = plain.proj(plain.act(plain.bn(plain.conv(patches)))).flatten(2).transpose(1, 2)
    want = torch.cat([x[:, :2], y], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g, retain_graph=True)
    (wx,) = torch.autograd.grad(want, x, g, retain_graph=True)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-6)
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(branch.conv.weight.grad, plain.conv.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(branch.bn.running_var, plain.bn.running_var)
    assert not torch.equal(branch.bn.running_var, torch.ones(8))


def test_unfrozen_spec_and_unbuildable_choices_are_refused(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    with pytest.raises(UsageError, match="not a frozen spec: .* decision"):
        build(str(tmp_path / "s.vit"))
    g = program.space.geometry  # 2 heads of 16, FFN 128, width 32
    arch = pattern_arch(program)
    for bad, message in (
        (arch.with_block(0, heads=3), "heads"),
        (arch.with_block(0, heads=0), "heads"),
        (arch.with_block(1, head_dim=17), "head"),
        (arch.with_block(2, ffn=129), "FFN width 129"),
        (FrozenArch(arch.blocks, (33,)), "embedding width"),
        (FrozenArch(arch.blocks, (16, 16)), "embedding width"),
        (FrozenArch(arch.blocks[:2], g.dims), "blocks"),
    ):
        with pytest.raises(UsageError, match=message):
            create_compact(g, bad)
        with pytest.raises(UsageError, match=message):
            fold(lower(program.space), bad)


# --- the cost model, measured --------------------------------------------------------------------------------

REAL = {
    "deit_s": resolve("deit_small_patch16_224", {}),
    "swin_t": resolve("swin_tiny_patch4_window7_224", {}),
}


def _check_cost(geometry, arch, device):
    model = create_compact(geometry, arch, device=device).eval()
    assert sum(p.numel() for p in model.parameters()) == arch_cost(geometry, arch, "exact").params
    x = torch.randn(1, geometry.in_chans, geometry.img_size, geometry.img_size, device=device)
    assert count_macs(model, x) == breakdown(geometry, arch, "exact")["matmul"]


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_params_and_matmuls_match_the_cost_model(name, data):
    space = _program(name).space
    _check_cost(space.geometry, data.draw(points(space, sparse=False)), "cpu")


@pytest.mark.parametrize("name", sorted(REAL))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_real_backbones_on_meta_match_the_cost_model(name, data):
    geometry = REAL[name]
    _check_cost(geometry, data.draw(points(every_dimension(geometry), sparse=False)), "meta")


# --- Swin stage widths -------------------------------------------------------------------------------------------


def test_swin_stage_widths_need_not_be_proportional(tmp_path):
    program, net = _program("swin"), _net("swin")
    g = program.space.geometry  # dense (16, 32)
    arch = replace(_cut_point(g), embed=(12, 20))
    model = fold(net, arch).eval()
    assert model.layers[1].downsample.reduction.weight.shape == (20, 4 * 12)
    assert model.norm.normalized_shape == (20,) and model.head.fc.in_features == 20
    _check_equal(net, model, arch, None, images(g))
    dense_blocks = tuple(BlockArch("msa", b.hidden, b.heads, b.head_dim) for b in g.blocks)
    _check_cost(g, FrozenArch(dense_blocks, (12, 20)), "cpu")
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    built = build(str(frozen), weights="none").eval()
    assert built.spvit_arch == arch
    save(built, str(tmp_path / "m.safetensors"))
    loaded = load(str(tmp_path / "m.safetensors"))
    x = images(g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), built(x), rtol=0, atol=0)


# --- weights sources -----------------------------------------------------------------------------------------


def _ckpt(program, net, kept, path):
    """A finished search.ckpt: kept units in the dense backbone's indexing, the shrinks and the spec recorded."""
    state = {"settings": {"alpha": 0.0, "seed": 0}, "spec_hash": spec_hash(program.source), "finished": True}
    state["shrunk"] = {p: v.tolist() for p, v in net.kept_index.items()}
    ckpt = Checkpoint(net.state_dict(), {}, {}, state, kept, spec=program.source, spec_path=program.path)
    save_checkpoint(str(path), ckpt)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_build_from_a_search_ckpt_keeps_every_group(name, tmp_path):
    program, net = _program(name), _net(name)
    g = program.space.geometry
    arch = _cut_point(g, op=lambda i: ("conv5x5", "msa", "skip", "msa")[i % 4])
    kept = net.kept_for(arch, _random_kept(net, arch, seed=7))  # with the weights masks the supernet picks
    _ckpt(program, net, kept, tmp_path / "search.ckpt")
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    model = build(str(frozen), weights=str(tmp_path / "search.ckpt")).eval()
    assert model.spvit_arch == arch  # the frozen spec states every dimension
    _check_equal(net, model, arch, kept, images(g))
    _check_sparse(model, g, arch.canonical())


@pytest.mark.parametrize("canonical", [True, False])
def test_dense_weights_with_masks_of_every_group(tmp_path, canonical):
    """`--weights dense --masks search.ckpt`: the compact network is the dense-weight supernet of the searched space
    under the search's kept units (conv kernels from a fresh mixing matrix). The frozen point may state densities
    for layers it does not run (qkv/proj of a conv block): they change nothing (``FrozenArch.canonical``)."""
    program, net = _program("vit"), _net("vit", seed=1)
    g = program.space.geometry
    arch = _cut_point(g, op=lambda i: ("conv3x3", "msa")[i % 2])
    arch = arch.canonical() if canonical else arch
    kept = net.kept_for(arch, _random_kept(net, arch, seed=3))
    _ckpt(program, net, kept, tmp_path / "search.ckpt")
    dense = lower(program.space)
    randomise(dense.model, seed=9)
    for m in dense.modules():  # fresh BatchNorms, as a dense checkpoint has none
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.model.state_dict().items() if ".attn.mix" not in k
               and ".attn.bns." not in k}, str(path))  # fmt: skip
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    model = build(str(frozen), weights=str(path), masks=str(tmp_path / "search.ckpt")).eval()
    reference = lower(program.space, weights=str(path)).eval()
    _check_equal(reference, model, arch, kept, images(g))
    _check_sparse(model, g, arch.canonical())


def test_real_random_search_then_cli_build(tmp_path, monkeypatch):
    """End to end over every dimension: `search random` writes kept units of every group; `build --json` reports
    the point and the compact network is the supernet under them."""
    from spvit_dsl.compact.build import _load_search, frozen_program
    from spvit_dsl.compile.freeze import arch_of
    from spvit_dsl.space.groups import value_of

    monkeypatch.chdir(tmp_path)
    (tmp_path / "every.vit").write_text(
        SPECS["vit"] + "budget { flops <= 40% }\nsearch random { seed = 3 }\n"
    )
    result = runner.invoke(app, ["search", "every.vit", "--device", "cpu", "--out", "run", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.safetensors"
    argv = ["build", "run/every.frozen.vit", "--weights", "run/search.ckpt", "--out", str(out), "--json"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    program = frozen_program("run/every.frozen.vit")
    arch, g = arch_of(program.checked), program.space.geometry
    assert info["embed"] == list(arch.embed) and info["sparse"] == arch.sparse
    assert info["blocks"] == [
        {"op": b.op, "ffn": b.ffn, "heads": b.heads, "head_dim": b.head_dim, "density": vars(b.density)}
        for b in arch.blocks
    ]
    assert (
        info["params"] == arch_cost(g, arch, "exact").params
        and info["exact"]["flops"] == arch_cost(g, arch, "exact").macs
    )
    net, kept = _load_search("run/search.ckpt", program, "cpu")
    canonical, cut = arch.canonical(), set()
    for (
        path,
        group,
    ) in net.groups.items():  # the checkpoint holds the kept units of every group the point cuts
        value = value_of(canonical, group)
        if group.structured and value < group.size:
            assert kept[path].numel() == value, path
            cut.add(group.kind)
        elif group.kind == "weights" and value < 1:
            assert kept[path].shape == net.layers(group.block)[group.layer].weight.shape, path
            cut.add(group.kind)
    assert cut == {"embed", "heads", "head_dim", "ffn", "weights"}  # this search cuts every kind of group
    model = load(str(out))
    _check_equal(net.eval(), model, arch, net.to_current(kept), images(g))
    _check_sparse(model, g, arch.canonical())


# --- supernets a search shrank physically ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path", "size"),
    [
        ("vit", "blocks.0.ffn", 100),
        ("swiglu", "blocks.0.ffn", 60),  # a packed SwiGLU neuron's two fc1 rows go together
        ("vit", "embed", 28),
        ("vit", "blocks.1.heads", 1),
        ("vit", "blocks.2.head_dim", 10),
        ("swin", "stages.0.embed", 12),
        ("swin", "blocks.3.head_dim", 9),
    ],
)
def test_build_of_a_shrunk_supernet(name, path, size, tmp_path):
    """A supernet with a group physically shrunk (Supernet.shrink) folds to the network it computes under the
    point's masks; so does its saved file or search checkpoint (shrinks re-applied, kept units stored in the dense
    backbone's indexing). A kept unit that the shrink removed is refused."""
    program = _program(name)
    g = program.space.geometry
    net = lower(program.space)
    randomise(net, seed=2)
    net.eval().shrink(path, torch.randperm(net.size(path), generator=torch.Generator().manual_seed(0))[:size])
    arch = FrozenArch(
        tuple(BlockArch(("msa", "conv3x3")[b.index % 2], b.hidden // 2, 1, 8) for b in g.blocks),
        tuple(d // 2 for d in g.dims),
    )
    _check_equal(net, fold(net, arch).eval(), arch, None, images(g))
    frozen = str(write_frozen(program, arch, tmp_path / "f.vit"))
    save_supernet(net, tmp_path / "shrunk.safetensors", program.source)
    _check_equal(
        net, build(frozen, weights=str(tmp_path / "shrunk.safetensors")).eval(), arch, None, images(g)
    )
    kept = net.kept_for(arch, _random_kept(net, arch, seed=1))
    original = net.to_original(kept)
    assert torch.equal(original[path], net.kept_index[path][kept[path]])  # same units, same order
    assert torch.equal(net.to_current(original)[path], kept[path])
    _ckpt(program, net, original, tmp_path / "search.ckpt")
    _check_equal(net, build(frozen, weights=str(tmp_path / "search.ckpt")).eval(), arch, kept, images(g))
    removed = [u for u in range(net.groups[path].size) if u not in net.kept_index[path]]
    original[path] = torch.cat([original[path][1:], torch.tensor(removed[:1])]).sort().values
    _ckpt(program, net, original, tmp_path / "bad.ckpt")
    with pytest.raises(UsageError, match="removed by a shrink"):
        build(frozen, weights=str(tmp_path / "bad.ckpt"))
