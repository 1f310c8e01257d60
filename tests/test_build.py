"""The build stage: compact networks equal the supernet, match the cost model, save/load without pickle, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from _frozen import (
    DISTILLED_BACKBONE,
    SWIN_BACKBONE,
    VIT_BACKBONE,
    images,
    pattern_arch,
    randomise,
    search_program,
    write_frozen,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from spvit_dsl.cli import app, main
from spvit_dsl.compact import ConvBranch, FfnBias, SkipBranch, create_compact
from spvit_dsl.compact.build import build, fold, kept_masks, load, round_widths, save
from spvit_dsl.lang.errors import UsageError
from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.cost import arch_cost, breakdown
from spvit_dsl.space.plan import BlockArch, FrozenArch
from spvit_dsl.supernet import save_supernet
from spvit_dsl.supernet.flops import count_macs
from spvit_dsl.supernet.lower import lower

BACKBONES = {"vit": VIT_BACKBONE, "distilled": DISTILLED_BACKBONE, "swin": SWIN_BACKBONE}
OPS = ("skip", "conv1x1", "conv3x3", "conv5x5", "msa")
runner = CliRunner()


@pytest.fixture(params=sorted(BACKBONES))
def program(request, tmp_path):
    return search_program(BACKBONES[request.param], tmp_path / "search.vit")


def _supernet(program, seed=0):
    net = lower(program.space)
    randomise(net, seed)
    return net.eval()


def _random_kept(net, arch, seed=0):
    """Arbitrary kept sets of the frozen widths (not the gates' choice), so gathering is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for row, b in zip(net.rows, arch.blocks, strict=True):
        mask = torch.zeros(row.hidden, dtype=torch.bool)
        mask[torch.randperm(row.hidden, generator=gen)[: b.ffn]] = True
        out[f"blocks.{row.index}.ffn"] = mask
    return out


# --- exactness against the supernet --------------------------------------------------------------------------


def test_fold_equals_the_fixed_supernet(program):
    net = _supernet(program)
    arch = pattern_arch(program)
    kept = _random_kept(net, arch)
    x = images(program)
    with torch.no_grad():
        dense_features = net.model.forward_features(x)
        compact = fold(net, arch, kept).eval()
        net.fix(arch, kept)
        net.draw()
        want_features, want = net.model.forward_features(x), net(x)
        got_features, got = compact.forward_features(x), compact(x)
    assert (want_features - dense_features).abs().max() > 1e-2  # the frozen choices change the network
    torch.testing.assert_close(got_features, want_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_fold_leaves_the_supernet_alone(program):
    net = _supernet(program)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fold(net, pattern_arch(program))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.fixed is None


def test_conv_branch_equals_the_unified_op(program):
    """Block by block: the folded Conv2d → BN → ReLU → Conv2d computes the supernet's conv candidate."""
    net = _supernet(program, seed=3)
    g = program.space.geometry
    for op in ("conv1x1", "conv3x3", "conv5x5"):
        arch = FrozenArch(tuple(BlockArch(op, b.hidden, b.heads, b.head_dim) for b in g.blocks), g.embed_dim)
        compact = fold(net, arch).eval()
        blocks = [b for s in compact.layers for b in s.blocks] if g.family == "swin" else list(compact.blocks)
        for row, block, geom in zip(net.rows, blocks, g.blocks, strict=True):
            row.attn.choose(row.plan.attention.index(op))
            shape = (2, *geom.grid, geom.dim) if g.family == "swin" else (2, geom.tokens, geom.dim)
            x = torch.randn(shape)
            with torch.no_grad():
                want = row.attn.forward_map(x) if g.family == "swin" else row.attn(x)
                got = block.attn(x)
            assert isinstance(block.attn, ConvBranch)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_skip_adds_zero_and_width_zero_keeps_fc2_bias(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    g = program.space.geometry
    arch = FrozenArch(tuple(BlockArch("skip", 0, b.heads, b.head_dim) for b in g.blocks), g.embed_dim)
    model = create_compact(g, arch).eval()
    block = model.blocks[1]
    assert isinstance(block.attn, SkipBranch) and isinstance(block.mlp, FfnBias)
    with torch.no_grad():
        block.mlp.bias.copy_(torch.randn(g.embed_dim))
        block.norm1.weight.fill_(float("nan"))  # a skip block must not even run norm1
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


def test_timm_kwargs_reach_the_model(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    model = build(str(frozen), weights="none", timm_kwargs={"drop_path_rate": 0.1})
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_kept_masks_follow_the_checkpoint_and_adjust_to_the_width(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    derived = net.derive()
    masks = kept_masks(net, derived)
    for name, mask in net.kept_units().items():
        assert torch.equal(masks[name], mask)  # same widths: exactly the gates' neurons
    wider = derived.with_block(0, ffn=min(derived.blocks[0].ffn + 5, net.rows[0].hidden))
    grown = kept_masks(net, wider)["blocks.0.ffn"]
    base = net.kept_units()["blocks.0.ffn"]
    assert int(grown.sum()) == wider.blocks[0].ffn and bool(
        (grown | ~base).all()
    )  # a superset of the kept ones
    logits = net.gates["blocks.0.ffn"].logits.detach()
    added = grown & ~base
    assert logits[added].min() >= logits[~grown].max()  # the best unkept neurons were added


# --- weights sources -----------------------------------------------------------------------------------------


def test_build_from_search_checkpoint_equals_supernet(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    ckpt = tmp_path / "search.safetensors"
    save_supernet(net, ckpt, program.source)
    arch = pattern_arch(program)
    frozen = write_frozen(program, arch, tmp_path / "frozen.vit")
    model = build(str(frozen), weights=str(ckpt)).eval()
    x = images(program)
    net.fix(arch, kept_masks(net, arch))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=1e-5)
    assert model.spvit_arch == arch


def _search_ckpt(program, net, kept, path, settings=None):
    """A search.ckpt as spvit_dsl.search writes it (no spec text inside: found through the frozen header)."""
    from spvit_dsl.search.checkpoint import Checkpoint, save_checkpoint, spec_hash

    state = {
        "settings": {"alpha": 0.0, "gate_init": 1.5, "seed": 0, **(settings or {})},
        "spec_hash": spec_hash(program.source),
        "finished": True,
    }
    save_checkpoint(str(path), Checkpoint(net.state_dict(), {}, {}, state, kept))


def test_build_from_a_search_ckpt_uses_its_kept_masks(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    arch = pattern_arch(program)
    kept = _random_kept(net, arch, seed=5)
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    _search_ckpt(program, net, kept, run / "search.ckpt")
    frozen = write_frozen(program, arch, run / "s.frozen.vit")  # header: source = <tmp>/s.vit
    model = build(str(frozen), weights=str(run / "search.ckpt")).eval()
    net.fix(arch, kept)
    x = images(program)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=1e-5)
    for i, mask in enumerate(kept.values()):
        if arch.blocks[i].ffn:
            torch.testing.assert_close(model.blocks[i].mlp.fc1.weight, net.rows[i].mlp.fc1.weight[mask])


def test_search_ckpt_needs_the_spec_text_it_was_written_for(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    ckpt = tmp_path / "search.ckpt"
    _search_ckpt(program, net, {}, ckpt)
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    (tmp_path / "s.vit").write_text(program.source + "// edited after the search\n")
    with pytest.raises(UsageError, match="does not embed its search spec"):
        build(str(frozen), weights=str(ckpt))


def test_real_search_then_build(tmp_path, monkeypatch):
    """End to end: `spvit-dsl search` (two steps) writes search.ckpt + frozen spec; `build` folds them exactly."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.vit").write_text(
        f"{VIT_BACKBONE}\nblocks all {{ attention: one of {{skip, conv1x1, "
        "conv3x3, msa}; ffn: per neuron }\nbudget { flops <= 70% }\n"
    )
    result = runner.invoke(
        app,
        [
            "search",
            "tiny.vit",
            "--data",
            "synthetic",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--out",
            "run",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.safetensors"
    result = runner.invoke(
        app, ["build", "run/tiny.frozen.vit", "--weights", "run/search.ckpt", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    from spvit_dsl.compact.build import _load_search, frozen_program

    program = frozen_program("run/tiny.frozen.vit")
    net, kept = _load_search("run/search.ckpt", program, "cpu")
    from spvit_dsl.compile.freeze import arch_of

    net.fix(arch_of(program.checked), kept)
    net.eval()
    x = images(program)
    with torch.no_grad():
        torch.testing.assert_close(load(str(out))(x), net(x), rtol=0, atol=1e-5)


def _dense_file(program, tmp_path):
    import timm

    g = program.space.geometry
    torch.manual_seed(1)
    dense = timm.create_model(g.model, pretrained=False, **g.kwargs())
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.3)
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    return dense, path


def test_build_from_dense_weights_official_recipe(tmp_path):
    """Dense start: FFN neurons by importance, conv kernels from a fresh mixing matrix (uniform over heads)."""
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    dense, path = _dense_file(program, tmp_path)
    arch = pattern_arch(program)
    model = build(str(write_frozen(program, arch, tmp_path / "f.vit")), weights=str(path))
    g = program.space.geometry
    for i, (b, geom) in enumerate(zip(arch.blocks, g.blocks, strict=True)):
        src, dst = dense.blocks[i], model.blocks[i]
        if b.ffn:
            score = src.mlp.fc1.weight.norm(dim=1) * src.mlp.fc2.weight.norm(dim=0)
            top = torch.sort(score, descending=True, stable=True).indices[: b.ffn].sort().values
            torch.testing.assert_close(dst.mlp.fc1.weight, src.mlp.fc1.weight[top])
            torch.testing.assert_close(dst.mlp.fc2.weight, src.mlp.fc2.weight[:, top])
        if b.op.startswith("conv"):
            h, d, C, k = geom.heads, geom.head_dim, geom.dim, dst.attn.kernel
            w_v = src.attn.qkv.weight[2 * C :].view(h, d, C)
            kernel = dst.attn.conv.weight
            for p in range(k * k):
                torch.testing.assert_close(kernel[:, :, p // k, p % k], w_v.mean(0), rtol=1e-5, atol=1e-6)
            expand = src.attn.proj.weight.view(C, h, d).sum(1) * k * k / h
            torch.testing.assert_close(dst.attn.proj.weight[:, :, 0, 0], expand, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dst.attn.bn.running_var, torch.ones(d))  # fresh BatchNorm


def test_dense_weights_with_masks_from_the_search(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    ckpt = tmp_path / "search.safetensors"
    save_supernet(net, ckpt, program.source)
    dense, path = _dense_file(program, tmp_path)
    arch = net.derive()
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    model = build(str(frozen), weights=str(path), masks=str(ckpt))
    for i, mask in enumerate(net.kept_units().values()):
        if arch.blocks[i].ffn:
            torch.testing.assert_close(model.blocks[i].mlp.fc1.weight, dense.blocks[i].mlp.fc1.weight[mask])
    assert "kept by" in model.spvit_weights


def test_checkpoint_of_another_backbone_is_refused(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    other = search_program(SWIN_BACKBONE, tmp_path / "o.vit")
    ckpt = tmp_path / "swin.safetensors"
    save_supernet(lower(other.space), ckpt, other.source)
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    with pytest.raises(UsageError, match="searched on another backbone"):
        build(str(frozen), weights=str(ckpt))


def test_frozen_op_outside_the_searched_candidates_is_refused(tmp_path):
    path = tmp_path / "s.vit"
    path.write_text(f"{VIT_BACKBONE}\nblocks all {{ attention: one of {{skip, msa}}; ffn: per neuron }}\n")
    from spvit_dsl.compile.program import compile_file

    program = compile_file(str(path))
    ckpt = tmp_path / "search.safetensors"
    save_supernet(lower(program.space), ckpt, program.source)
    g = program.space.geometry
    arch = FrozenArch(
        tuple(BlockArch("conv3x3", b.hidden, b.heads, b.head_dim) for b in g.blocks), g.embed_dim
    )
    full = search_program(VIT_BACKBONE, tmp_path / "full.vit")  # a space where conv3x3 exists, to freeze it
    frozen = write_frozen(full, arch, tmp_path / "f.vit")
    with pytest.raises(UsageError, match="not a candidate"):
        build(str(frozen), weights=str(ckpt))


def test_unfrozen_spec_and_unsupported_choices_are_refused(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    with pytest.raises(UsageError, match="not a frozen spec: .* decision"):
        build(str(tmp_path / "s.vit"))
    g = program.space.geometry
    arch = pattern_arch(program)
    with pytest.raises(UsageError, match="heads"):
        create_compact(g, arch.with_block(0, heads=1))
    with pytest.raises(UsageError, match="sparsity"):
        create_compact(g, arch.with_block(0, density=0.5))
    with pytest.raises(UsageError, match="embedding width"):
        create_compact(g, replace(arch, embed=16))


# --- the cost model, measured --------------------------------------------------------------------------------

TINY = {
    "vit": resolve(
        "deit_tiny_patch16_224", dict(image=32, patch=8, embed_dim=32, depth=3, heads=2, classes=10)
    ),
    "distilled": resolve(
        "deit_tiny_distilled_patch16_224", dict(image=32, patch=8, embed_dim=32, depth=2, heads=2, classes=10)
    ),
    "swin": resolve(
        "swin_tiny_patch4_window7_224",
        dict(image=32, patch=2, embed_dim=16, depth=(2, 2), heads=(1, 2), window=4, classes=10),
    ),
}
REAL = {
    "deit_s": resolve("deit_small_patch16_224", {}),
    "swin_t": resolve("swin_tiny_patch4_window7_224", {}),
}


@st.composite
def archs(draw, geometry):
    blocks = tuple(
        BlockArch(draw(st.sampled_from(OPS)), draw(st.integers(0, b.hidden)), b.heads, b.head_dim)
        for b in geometry.blocks
    )
    return FrozenArch(blocks, geometry.embed_dim)


def _check_cost(geometry, arch, device):
    model = create_compact(geometry, arch, device=device).eval()
    assert sum(p.numel() for p in model.parameters()) == arch_cost(geometry, arch, "exact").params
    x = torch.randn(1, geometry.in_chans, geometry.img_size, geometry.img_size, device=device)
    assert count_macs(model, x) == breakdown(geometry, arch, "exact")["matmul"]


@pytest.mark.parametrize("name", sorted(TINY))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_params_and_matmuls_match_the_cost_model(name, data):
    geometry = TINY[name]
    _check_cost(geometry, data.draw(archs(geometry)), "cpu")


@pytest.mark.parametrize("name", sorted(REAL))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_real_backbones_on_meta_match_the_cost_model(name, data):
    geometry = REAL[name]
    _check_cost(geometry, data.draw(archs(geometry)), "meta")


# --- rounding ------------------------------------------------------------------------------------------------


def test_round_widths_nearest_multiple_capped_at_dense():
    g = TINY["vit"]  # hidden 128
    arch = FrozenArch(
        tuple(BlockArch("msa", w, b.heads, b.head_dim) for w, b in zip((3, 4, 127), g.blocks, strict=True)),
        g.embed_dim,
    )
    assert [b.ffn for b in round_widths(g, arch, 8).blocks] == [0, 8, 128]
    assert [b.ffn for b in round_widths(g, arch, 48).blocks] == [0, 0, 128]  # 144 would exceed the dense 128
    assert round_widths(g, arch, 1) == arch
    with pytest.raises(UsageError, match="positive"):
        round_widths(g, arch, 0)


def test_rounded_build_embeds_the_rounded_spec(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    arch = pattern_arch(program, [("conv3x3", 0.3), ("skip", 0.1), ("msa", 0.55)])
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    model = build(str(frozen), weights="none", round_to=16)
    assert all(b.ffn % 16 == 0 for b in model.spvit_arch.blocks)
    assert [b.ffn for b in model.spvit_arch.blocks] == [
        b.ffn for b in round_widths(program.space.geometry, arch, 16).blocks
    ]
    save(model, str(tmp_path / "m.safetensors"))
    again = load(str(tmp_path / "m.safetensors"))
    assert again.spvit_arch == model.spvit_arch
    assert "ffn_round = 16" in again.spvit_spec


# --- saving and loading --------------------------------------------------------------------------------------


def test_save_load_round_trip_without_pickle(program, tmp_path):
    arch = pattern_arch(program)
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    model = build(str(frozen), weights="none").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
    path = tmp_path / "m.safetensors"
    save(model, str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["spvit_dsl.format"] == "compact/1"
    assert meta["spvit_dsl.spec"] == frozen.read_text()
    loaded = load(str(path))
    x = images(program)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_refuses_foreign_files(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UsageError, match="not a built spvit-dsl model"):
        load(str(path))
    with pytest.raises(UsageError, match="not found"):
        load(str(tmp_path / "missing.safetensors"))


def test_timm_interface(tmp_path):
    program = search_program(SWIN_BACKBONE, tmp_path / "s.vit")
    model = build(
        str(write_frozen(program, pattern_arch(program), tmp_path / "f.vit")), weights="none"
    ).eval()
    x = images(program)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.num_classes == 10
    model.reset_classifier(4)
    with torch.no_grad():
        assert model(x).shape == (2, 4)


# --- the command line ----------------------------------------------------------------------------------------


def test_cli_build_json(tmp_path):
    program = search_program(SWIN_BACKBONE, tmp_path / "s.vit")
    arch = pattern_arch(program)
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["build", str(frozen), "--weights", "none", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    g = program.space.geometry
    assert info["params_counted"] == arch_cost(g, arch, "exact").params
    assert info["exact"]["flops"] == arch_cost(g, arch, "exact").macs
    assert [b["op"] for b in info["blocks"]] == [b.op for b in arch.blocks]
    assert load(str(out)).spvit_arch == arch


def test_cli_build_round_reports_the_cost_change(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    arch = pattern_arch(program, [("conv3x3", 0.3), ("skip", 0.1), ("msa", 0.55)])
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    result = runner.invoke(
        app,
        ["build", str(frozen), "--weights", "none", "--round", "8", "--out", str(tmp_path / "m.safetensors")],
    )
    assert result.exit_code == 0, result.output
    assert "--round 8" in result.output and "before" in result.output and "after" in result.output


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_cli_build_failures(tmp_path, capsys):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    out = str(tmp_path / "m.safetensors")
    code, err = _exit(["build", str(tmp_path / "missing.vit"), "--out", out], capsys)
    assert code == 1 and "error: file not found" in err and "Traceback" not in err
    code, err = _exit(["build", str(frozen), "--weights", "none", "--round", "0", "--out", out], capsys)
    assert code == 1 and "--round: expected a positive integer, found 0" in err
    code, err = _exit(["build", str(frozen), "--weights", "none", "--round", "eight", "--out", out], capsys)
    assert code == 2 and "--round" in err
    code, err = _exit(["build", str(tmp_path / "s.vit"), "--out", out], capsys)
    assert code == 1 and "not a frozen spec" in err
    code, err = _exit(
        ["build", str(frozen), "--weights", str(tmp_path / "nope.safetensors"), "--out", out], capsys
    )
    assert code == 1 and "not found" in err
