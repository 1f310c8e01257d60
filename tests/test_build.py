"""The build stage: compact networks equal the masked supernet, keep the right units from every weights source,
round, save/load without pickle, CLI. (Every dimension and the cost model: test_build_dims.py.)"""

from __future__ import annotations

import json
import re

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
from _spaces import dense_twin
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from spvit_dsl.cli import app, main
from spvit_dsl.compact import ConvBranch
from spvit_dsl.compact.build import adjust_kept, build, fold, load, round_widths, save
from spvit_dsl.lang.errors import UsageError
from spvit_dsl.search.checkpoint import Checkpoint, save_checkpoint, spec_hash
from spvit_dsl.search.methods.spvit_gates import SpvitGates
from spvit_dsl.space.backbones import resolve
from spvit_dsl.space.cost import arch_cost
from spvit_dsl.space.plan import BlockArch, FrozenArch
from spvit_dsl.supernet import save_supernet
from spvit_dsl.supernet.lower import lower

BACKBONES = {"vit": VIT_BACKBONE, "distilled": DISTILLED_BACKBONE, "swin": SWIN_BACKBONE}
runner = CliRunner()


@pytest.fixture(params=sorted(BACKBONES))
def program(request, tmp_path):
    return search_program(BACKBONES[request.param], tmp_path / "search.vit")


def _supernet(program, seed=0):
    net = lower(program.space)
    randomise(net, seed)
    return net.eval()


def _random_kept(net, arch, seed=0):
    """Arbitrary kept FFN neurons of the frozen widths (not the largest), so gathering is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"blocks.{row.index}.ffn": torch.randperm(row.hidden, generator=gen)[: b.ffn].sort().values
        for row, b in zip(net.rows, arch.blocks, strict=True)
    }


def _blocks(model, geometry):
    return [b for s in model.layers for b in s.blocks] if geometry.family == "swin" else list(model.blocks)


# --- exactness against the supernet --------------------------------------------------------------------------


def test_fold_equals_the_masked_supernet(program):
    net = _supernet(program)
    arch = pattern_arch(program)
    kept = _random_kept(net, arch)
    g = program.space.geometry
    x = images(program)
    with torch.no_grad():
        dense_features = net.model.forward_features(x)
        compact = fold(net, arch, kept).eval()
        net.set_arch(arch, kept)
        want_features, want = net.model.forward_features(x), net(x)
        got_features, got = compact.forward_features(x), compact(x)
    assert (want_features - dense_features).abs().max() > 1e-2  # the frozen choices change the network
    torch.testing.assert_close(got_features, want_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for i, (row, block) in enumerate(zip(net.rows, _blocks(compact, g), strict=True)):
        if arch.blocks[i].ffn:  # exactly the given neurons, in ascending order
            index = kept[f"blocks.{i}.ffn"]
            torch.testing.assert_close(block.mlp.fc1.weight, row.mlp.fc1.weight[index], rtol=0, atol=0)
            torch.testing.assert_close(block.mlp.fc2.weight, row.mlp.fc2.weight[:, index], rtol=0, atol=0)


def test_fold_leaves_the_supernet_alone(program):
    net = _supernet(program)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fold(net, pattern_arch(program))
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(net.mask(path) is None for path in net.groups)  # masks cleared
    x = images(program)
    with torch.no_grad():  # every op back at its top candidate: the dense timm model again
        torch.testing.assert_close(net(x), dense_twin(net).eval()(x), rtol=0, atol=1e-5)


def test_conv_branch_equals_the_unified_op(program):
    """Block by block: the folded Conv2d → BN → ReLU → Conv2d computes the supernet's conv candidate."""
    net = _supernet(program, seed=3)
    g = program.space.geometry
    for op in ("conv1x1", "conv3x3", "conv5x5"):
        arch = FrozenArch(tuple(BlockArch(op, b.hidden, b.heads, b.head_dim) for b in g.blocks), g.dims)
        compact = fold(net, arch).eval()
        for row, block, geom in zip(net.rows, _blocks(compact, g), g.blocks, strict=True):
            row.attn.choose(row.plan.attention.index(op))
            shape = (2, *geom.grid, geom.dim) if g.family == "swin" else (2, geom.tokens, geom.dim)
            x = torch.randn(shape)
            with torch.no_grad():
                want = row.attn.forward_map(x) if g.family == "swin" else row.attn(x)
                got = block.attn(x)
            assert isinstance(block.attn, ConvBranch) and block.attn.conv.out_channels == geom.head_dim
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        net.reset()


def test_timm_kwargs_reach_the_model(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    model = build(str(frozen), weights="none", timm_kwargs={"drop_path_rate": 0.1})
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_kept_units_follow_the_gates_and_adjust_to_the_width(tmp_path):
    """An SPViT search's kept neurons are used as they are; a wider/narrower frozen width grows them by the largest
    unkept units or drops the smallest kept ones (L1 magnitude)."""
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    gates = SpvitGates(net)
    randomise(gates, seed=1)  # logits of both signs
    arch = gates.derive(net)
    kept = {path: mask.nonzero().flatten() for path, mask in gates.kept_ffn().items()}
    same = adjust_kept(net, arch, kept)
    assert same.keys() == kept.keys() and all(torch.equal(same[p], kept[p]) for p in kept)
    path, hidden, base = "blocks.0.ffn", net.rows[0].hidden, kept["blocks.0.ffn"]
    assert 5 < base.numel() < hidden - 5
    scores = net.unit_scores(path)
    every = torch.arange(hidden)
    grown = adjust_kept(net, arch.with_block(0, ffn=base.numel() + 5), kept)[path]
    assert grown.numel() == base.numel() + 5
    assert torch.equal(grown[: base.numel()], base)  # the kept ones first, in their order
    assert torch.equal(grown[base.numel() :], grown[base.numel() :].sort().values)
    added, unkept = grown[~torch.isin(grown, base)], every[~torch.isin(every, grown)]
    assert scores[added].min() >= scores[unkept].max()  # the largest unkept units were added
    shrunk = adjust_kept(net, arch.with_block(0, ffn=base.numel() - 5), kept)[path]
    assert shrunk.numel() == base.numel() - 5 and torch.isin(shrunk, base).all()
    dropped = base[~torch.isin(base, shrunk)]
    assert scores[shrunk].min() >= scores[dropped].max()  # the smallest kept units were dropped
    assert torch.equal(shrunk, base[torch.isin(base, shrunk)])  # the others keep their order
    backwards = {path: base.flip(0)}  # an ordered list stays ordered
    assert torch.equal(
        adjust_kept(net, arch.with_block(0, ffn=base.numel() - 5), backwards)[path], shrunk.flip(0)
    )
    mask = torch.ones(96, 32, dtype=torch.bool)
    assert (
        adjust_kept(net, arch, {"blocks.0.attn.qkv": mask})["blocks.0.attn.qkv"] is mask
    )  # weights: as given
    with pytest.raises(UsageError, match="blocks.9.ffn"):
        adjust_kept(net, arch, {"blocks.9.ffn": base})


# --- weights sources -----------------------------------------------------------------------------------------


def test_build_from_a_saved_supernet_equals_the_supernet(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    ckpt = tmp_path / "search.safetensors"
    save_supernet(net, ckpt, program.source)
    arch = pattern_arch(program)
    frozen = write_frozen(program, arch, tmp_path / "frozen.vit")
    model = build(str(frozen), weights=str(ckpt)).eval()
    x = images(program)
    net.set_arch(arch)  # no kept units stored: the largest by L1, as the supernet picks them
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=1e-5)
    assert model.spvit_arch == arch and model.spvit_weights == str(ckpt)


def _search_ckpt(program, net, kept, path, *, embed_spec=False):
    """A search.ckpt as spvit_dsl.search writes it; without ``embed_spec`` (older checkpoints) the spec text is
    found through the frozen spec's ``source`` header."""
    state = {"settings": {"alpha": 0.0, "seed": 0}, "spec_hash": spec_hash(program.source), "finished": True}
    spec = (program.source, program.path) if embed_spec else ("", "")
    save_checkpoint(
        str(path), Checkpoint(net.state_dict(), {}, {}, state, kept, spec=spec[0], spec_path=spec[1])
    )


@pytest.mark.parametrize("embed_spec", [False, True])
def test_build_from_a_search_ckpt_uses_its_kept_units(tmp_path, embed_spec):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    arch = pattern_arch(program)
    kept = _random_kept(net, arch, seed=5)
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    _search_ckpt(program, net, kept, run / "search.ckpt", embed_spec=embed_spec)
    frozen = write_frozen(program, arch, run / "s.frozen.vit")  # header: source = <tmp>/s.vit
    if embed_spec:
        (tmp_path / "s.vit").unlink()  # the checkpoint carries its spec: no lookup needed
    model = build(str(frozen), weights=str(run / "search.ckpt")).eval()
    net.set_arch(arch, kept)
    x = images(program)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=1e-5)
    for i, index in enumerate(kept.values()):
        if arch.blocks[i].ffn:
            torch.testing.assert_close(model.blocks[i].mlp.fc1.weight, net.rows[i].mlp.fc1.weight[index])


def test_search_ckpt_needs_the_spec_text_it_was_written_for(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    ckpt = tmp_path / "search.ckpt"
    _search_ckpt(program, _supernet(program), {}, ckpt)
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    (tmp_path / "s.vit").write_text(program.source + "// edited after the search\n")
    with pytest.raises(UsageError, match="does not embed its search spec"):
        build(str(frozen), weights=str(ckpt))


def test_real_search_then_build(tmp_path, monkeypatch):
    """End to end: `spvit-dsl search` (two steps) writes search.ckpt + frozen spec; `build` folds them exactly."""
    from spvit_dsl.compact.build import _load_search, frozen_program
    from spvit_dsl.compile.freeze import arch_of

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.vit").write_text(
        f"{VIT_BACKBONE}\nblocks all {{ attention: one of {{skip, conv1x1, conv3x3, msa}}; ffn: per neuron }}\n"
        "budget { flops <= 50% }\n"
    )
    argv = ["search", "tiny.vit", "--data", "synthetic", "--steps", "2", "--batch-size", "4"]
    result = runner.invoke(app, [*argv, "--device", "cpu", "--out", "run", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.safetensors"
    result = runner.invoke(
        app, ["build", "run/tiny.frozen.vit", "--weights", "run/search.ckpt", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    program = frozen_program("run/tiny.frozen.vit")
    net, kept = _load_search("run/search.ckpt", program, "cpu")
    arch = arch_of(program.checked)
    cut = {f"blocks.{i}.ffn": b.ffn for i, b in enumerate(arch.blocks) if b.ffn < net.rows[i].hidden}
    assert (
        cut and {path: int(kept[path].numel()) for path in cut} == cut
    )  # the search's kept neurons are stored
    assert all(
        kept[path].dtype == torch.int64 and torch.equal(kept[path], kept[path].sort().values) for path in cut
    )
    net.eval().set_arch(arch, net.to_current(kept))  # checkpoints index the dense backbone's units
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
    """Dense start: the FFN neurons of largest L1 magnitude (fc1 row, fc1 bias, fc2 column), conv kernels from a
    fresh mixing matrix (uniform over heads), fresh BatchNorms."""
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    dense, path = _dense_file(program, tmp_path)
    arch = pattern_arch(program)
    model = build(str(write_frozen(program, arch, tmp_path / "f.vit")), weights=str(path))
    g = program.space.geometry
    for i, (b, geom) in enumerate(zip(arch.blocks, g.blocks, strict=True)):
        src, dst = dense.blocks[i], model.blocks[i]
        if b.ffn:
            fc1, fc2 = src.mlp.fc1, src.mlp.fc2
            score = fc1.weight.abs().sum(1) + fc1.bias.abs() + fc2.weight.abs().sum(0)
            top = torch.sort(score, descending=True, stable=True).indices[: b.ffn].sort().values
            torch.testing.assert_close(dst.mlp.fc1.weight, fc1.weight[top], rtol=0, atol=0)
            torch.testing.assert_close(dst.mlp.fc2.weight, fc2.weight[:, top], rtol=0, atol=0)
        if b.op.startswith("conv"):
            h, d, C, k = geom.heads, geom.head_dim, geom.dim, dst.attn.kernel
            w_v = src.attn.qkv.weight[2 * C :].view(h, d, C)
            kernel = dst.attn.conv.weight
            for p in range(k * k):
                torch.testing.assert_close(kernel[:, :, p // k, p % k], w_v.mean(0), rtol=1e-5, atol=1e-6)
            expand = src.attn.proj.weight.view(C, h, d).sum(1) * k * k / h
            torch.testing.assert_close(dst.attn.proj.weight[:, :, 0, 0], expand, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dst.attn.bn.running_var, torch.ones(d))  # fresh BatchNorm
            torch.testing.assert_close(dst.attn.bn.weight, torch.ones(d))
    assert model.spvit_weights == str(path)


def test_dense_weights_with_masks_from_the_search(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    arch = pattern_arch(program)
    kept = _random_kept(net, arch, seed=2)
    ckpt = tmp_path / "search.ckpt"
    _search_ckpt(program, net, kept, ckpt, embed_spec=True)
    dense, path = _dense_file(program, tmp_path)
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    model = build(str(frozen), weights=str(path), masks=str(ckpt))
    for i, index in enumerate(kept.values()):
        if arch.blocks[i].ffn:
            torch.testing.assert_close(model.blocks[i].mlp.fc1.weight, dense.blocks[i].mlp.fc1.weight[index])
            torch.testing.assert_close(
                model.blocks[i].mlp.fc2.weight, dense.blocks[i].mlp.fc2.weight[:, index]
            )
    assert model.spvit_weights == f"{path} (units kept by {ckpt})"
    with pytest.raises(UsageError, match="--masks needs dense weights"):
        build(str(frozen), weights="none", masks=str(ckpt))
    with pytest.raises(UsageError, match="already holds its kept units"):
        build(str(frozen), weights=str(ckpt), masks=str(ckpt))
    with pytest.raises(UsageError, match="not a search checkpoint"):
        build(str(frozen), weights=str(path), masks=str(path))


def test_checkpoint_of_another_backbone_is_refused(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    other = search_program(SWIN_BACKBONE, tmp_path / "o.vit")
    ckpt = tmp_path / "swin.safetensors"
    save_supernet(lower(other.space), ckpt, other.source)
    frozen = write_frozen(program, pattern_arch(program), tmp_path / "f.vit")
    with pytest.raises(UsageError, match="searched on another backbone"):
        build(str(frozen), weights=str(ckpt))


def test_frozen_op_outside_the_searched_candidates_is_refused(tmp_path):
    from spvit_dsl.compile.program import compile_file

    path = tmp_path / "s.vit"
    path.write_text(f"{VIT_BACKBONE}\nblocks all {{ attention: one of {{skip, msa}}; ffn: per neuron }}\n")
    program = compile_file(str(path))
    ckpt = tmp_path / "search.safetensors"
    save_supernet(lower(program.space), ckpt, program.source)
    g = program.space.geometry
    arch = FrozenArch(tuple(BlockArch("conv3x3", b.hidden, b.heads, b.head_dim) for b in g.blocks), g.dims)
    full = search_program(VIT_BACKBONE, tmp_path / "full.vit")  # a space where conv3x3 exists, to freeze it
    frozen = write_frozen(full, arch, tmp_path / "f.vit")
    with pytest.raises(UsageError, match="not a candidate"):
        build(str(frozen), weights=str(ckpt))


# --- rounding ------------------------------------------------------------------------------------------------


def test_round_widths_nearest_multiple_capped_at_dense():
    g = resolve("deit_tiny_patch16_224", dict(image=32, patch=8, embed_dim=32, depth=3, heads=2, classes=10))
    blocks = tuple(
        BlockArch("msa", w, b.heads, b.head_dim) for w, b in zip((3, 4, 127), g.blocks, strict=True)
    )
    arch = FrozenArch(blocks, g.dims)  # hidden 128
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
    assert model.spvit_arch == round_widths(program.space.geometry, arch, 16) != arch
    save(model, str(tmp_path / "m.safetensors"))
    again = load(str(tmp_path / "m.safetensors"))
    assert again.spvit_arch == model.spvit_arch
    assert "ffn_round = 16" in again.spvit_spec


def test_rounded_build_from_a_search_ckpt_grows_the_kept_units(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    net = _supernet(program)
    arch = pattern_arch(program, [("conv3x3", 0.3), ("skip", 0.1), ("msa", 0.55)])  # widths 38, 13, 70
    kept = _random_kept(net, arch, seed=4)
    ckpt = tmp_path / "search.ckpt"
    _search_ckpt(program, net, kept, ckpt, embed_spec=True)
    model = build(str(write_frozen(program, arch, tmp_path / "f.vit")), weights=str(ckpt), round_to=16).eval()
    rounded = model.spvit_arch
    assert [b.ffn for b in rounded.blocks] == [32, 16, 64]
    adjusted = adjust_kept(net, rounded, kept)
    for i in range(3):
        index, base = adjusted[f"blocks.{i}.ffn"], kept[f"blocks.{i}.ffn"]
        small, large = (index, base) if index.numel() < base.numel() else (base, index)
        assert torch.isin(small, large).all()  # grown or shrunk around the checkpoint's units
        torch.testing.assert_close(model.blocks[i].mlp.fc1.weight, net.rows[i].mlp.fc1.weight[index])
    net.set_arch(rounded, adjusted)
    x = images(program)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=1e-5)


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
    assert json.loads(meta["spvit_dsl.arch"])["embed"] == list(arch.embed)
    loaded = load(str(path))
    assert not loaded.training and loaded.spvit_arch == arch
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
    assert info["params_counted"] == arch_cost(g, arch, "exact").params == info["params"]
    assert info["exact"]["flops"] == arch_cost(g, arch, "exact").macs
    assert info["embed"] == list(g.dims) and info["sparse"] is False
    assert [b["op"] for b in info["blocks"]] == [b.op for b in arch.blocks]
    assert [(b["ffn"], b["heads"], b["head_dim"]) for b in info["blocks"]] == [
        (b.ffn, b.heads, b.head_dim) for b in arch.blocks
    ]
    assert load(str(out)).spvit_arch == arch


def test_cli_build_round_reports_the_cost_change(tmp_path):
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    arch = pattern_arch(program, [("conv3x3", 0.3), ("skip", 0.1), ("msa", 0.55)])
    frozen = write_frozen(program, arch, tmp_path / "f.vit")
    out = tmp_path / "m.safetensors"
    result = runner.invoke(
        app, ["build", str(frozen), "--weights", "none", "--round", "8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "--round 8" in result.output and "before" in result.output and "after" in result.output
    assert load(str(out)).spvit_arch == round_widths(program.space.geometry, arch, 8)


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
    assert code == 1 and "--round: expected a positive integer or auto, found '0'" in err
    code, err = _exit(["build", str(frozen), "--weights", "none", "--round", "eight", "--out", out], capsys)
    assert code == 1 and "--round: expected a positive integer or auto, found 'eight'" in err
    code, err = _exit(["build", str(tmp_path / "s.vit"), "--out", out], capsys)
    assert code == 1 and "not a frozen spec" in err
    code, err = _exit(
        ["build", str(frozen), "--weights", str(tmp_path / "nope.safetensors"), "--out", out], capsys
    )
    assert code == 1 and "not found" in err
    code, err = _exit(["build", str(frozen), "--weights", "none", "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 1 and "--out: expected a .safetensors path" in err


def test_cli_build_round_warns_when_rounding_breaks_a_budget(tmp_path, capsys):
    """Rounding widths up may cost more than the frozen spec's budget: the build still runs (the user asked for
    it) and says so in one line."""
    program = search_program(VIT_BACKBONE, tmp_path / "s.vit")
    arch = pattern_arch(program, [("conv3x3", 0.3), ("skip", 0.1), ("msa", 0.55)])
    g = program.space.geometry
    params = arch_cost(g, arch, "paper").params
    step = next(n for n in (8, 16, 32, 64) if arch_cost(g, round_widths(g, arch, n), "paper").params > params)
    text = write_frozen(program, arch, tmp_path / "f.vit").read_text()
    frozen = tmp_path / "budgeted.vit"
    budget = f"params <= {params / 1000}K"  # exact: a whole count of parameters in K
    frozen.write_text(re.sub(r"\nbudget \{[^}]*\}", "", text) + f"\nbudget {{ {budget} }}\n")
    out = str(tmp_path / "m.safetensors")
    main(["build", str(frozen), "--weights", "none", "--out", out])  # at its budget: no warning
    assert "warning" not in capsys.readouterr().err
    main(["build", str(frozen), "--weights", "none", "--round", str(step), "--out", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: --round {step} puts params at 10")
    assert "of the budget params <= " in err[0]


def test_build_warns_about_a_vit_whose_class_token_never_reads_the_image(tmp_path, capsys):
    """Every block a convolution or skip: SPViT's convolutions pass the class token unchanged, so every image gets
    the same logits. `build` (like `compile` and `search`) says so, and still builds what was asked."""
    spec = tmp_path / "blind.vit"
    spec.write_text(
        "backbone vit_tiny_patch16_224 {\n  weights = none\n  image = 32\n  patch = 8\n  channels = 1\n"
        "  classes = 10\n  embed_dim = 96\n  depth = 2\n  heads = 3\n}\n\n"
        "blocks all { attention: conv3x3; ffn: width 64 }\n",
        encoding="utf-8",
    )
    out = tmp_path / "blind.safetensors"
    try:
        main(["build", str(spec), "--out", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    err = capsys.readouterr().err
    assert "no block can run msa" in err and "same logits" in err and "blind.vit:" in err
    assert out.exists()
