"""The data-free reference strategies, ``magnitude`` and ``random``, on a tiny space that declares every dimension:
each lands at or under every budget within 1%, and ``build``, ``eval``, ``diff`` and ``export --onnx`` work on the
result (through the command line, as a user runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spvit_dsl.cli import app, main
from spvit_dsl.compile.freeze import arch_of
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.search import run_search
from spvit_dsl.space.groups import value_of

SPACE = """// every dimension: embedding width, ops, heads, per-head width, FFN neurons, per-layer sparsity
backbone vit_tiny_patch16_224 {{ weights = none; image = 16; patch = 4; channels = 1; classes = 10; embed_dim = 48; depth = 3; heads = 3 }}
embed: 16..48 step 8
blocks all {{
  attention: one of {{skip, conv3x3, msa}}
  heads: 1..3
  head_dim: 8..16 step 4
  ffn: per neuron
  sparsity: {{qkv: 0..0.5 step 0.25, fc1: 0..0.5 step 0.25, fc2: 0..0.5 step 0.25}}
}}
budget {{ {budget} }}
search {strategy} {{ seed = 1 }}
"""
BUDGETS = ["flops <= 50%", "flops <= 60%; params <= 45%", "params <= 30%"]
runner = CliRunner()


def write(tmp: Path, strategy: str, budget: str) -> Path:
    path = tmp / f"{strategy}.vit"
    path.write_text(SPACE.format(strategy=strategy, budget=budget))
    return path


@pytest.mark.parametrize("strategy", ["magnitude", "random"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_lands_at_or_under_every_budget_within_one_percent(
    tmp_path: Path, strategy: str, budget: str
) -> None:
    program = compile_file(str(write(tmp_path, strategy, budget)))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    frozen = compile_file(result.frozen_path)
    assert frozen.frozen
    cost = program.graph.cost(arch_of(frozen.checked), program.convention)  # priced independently
    ratios = []
    for b in program.budgets:
        value = cost.macs if b.metric == "flops" else cost.params
        assert value <= b.absolute
        ratios.append(value / b.absolute)
    assert max(ratios) >= 0.99
    assert "notice" not in result.info  # the projection is the method here, not a safety net
    # the kept units stored match the frozen counts
    for path, index in result.kept.items():
        group = next(g for g in program.graph.groups() if g.path == path)
        if group.kind != "weights":
            assert index.numel() == int(value_of(result.arch, group))


def test_magnitude_keeps_the_largest_units_and_is_deterministic(tmp_path: Path) -> None:
    program = compile_file(str(write(tmp_path, "magnitude", BUDGETS[0])))
    a = run_search(program, out=str(tmp_path / "a"), quiet=True, device="cpu")
    b = run_search(program, out=str(tmp_path / "b"), quiet=True, device="cpu")
    assert a.arch == b.arch and a.kept.keys() == b.kept.keys()
    assert all(torch.equal(a.kept[k], b.kept[k]) for k in a.kept)
    from spvit_dsl.supernet.lower import lower

    torch.manual_seed(1)  # the search seeds torch with the spec's seed before lowering
    net = lower(program.space)
    for path, index in a.kept.items():
        if net.groups[path].structured:
            assert torch.equal(index, net.top_units(path, index.numel()))


def test_random_depends_on_its_seed(tmp_path: Path) -> None:
    path = write(tmp_path, "random", BUDGETS[0])
    text = path.read_text()
    results = []
    for seed in (1, 1, 2):
        program = compile_text(text.replace("seed = 1", f"seed = {seed}"), str(path))
        results.append(run_search(program, out=str(tmp_path / f"r{len(results)}"), quiet=True, device="cpu"))
    assert results[0].arch == results[1].arch
    assert results[0].arch != results[2].arch or any(
        not torch.equal(results[0].kept[k], results[2].kept.get(k, torch.empty(0))) for k in results[0].kept
    )


@pytest.mark.parametrize("strategy", ["magnitude", "random"])
def test_build_eval_diff_and_export_the_result(tmp_path: Path, strategy: str) -> None:
    spec = write(tmp_path, strategy, BUDGETS[1])
    out = tmp_path / "run"
    res = runner.invoke(app, ["search", str(spec), "--out", str(out), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    frozen = out / f"{strategy}.frozen.vit"
    model = tmp_path / "model.safetensors"
    res = runner.invoke(
        app, ["build", str(frozen), "--weights", str(out / "search.ckpt"), "--out", str(model), "--json"]
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["params_counted"] >= info["params"]  # sparse layers are stored dense, zeros in place
    res = runner.invoke(app, ["eval", str(model), "--data", "digits", "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["top1"] <= 100 and metrics["images"] == 360
    res = runner.invoke(app, ["diff", str(spec), str(frozen), "--json"])
    assert res.exit_code == 1, res.output  # different, and a member of the space within its budgets
    assert json.loads(res.stdout)["member"] is True
    onnx = tmp_path / "model.onnx"
    res = runner.invoke(app, ["export", str(model), "--onnx", str(onnx)])
    assert res.exit_code == 0, res.output
    assert onnx.stat().st_size > 0 and "max |difference|" in res.output


def test_data_free_strategies_refuse_training_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, "magnitude", BUDGETS[0])
    with pytest.raises(SystemExit) as info:
        main(["search", str(spec), "--epochs", "3", "--quiet"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: --epochs does not apply to strategy 'magnitude' (data-free: its settings are seed)"
    )


def test_magnitude_prices_a_unit_by_the_weights_it_owns_when_all_weights_are_alike() -> None:
    """With every |w| equal, a unit's normalised score is its weight count, whatever its kind: an op step is
    worth the weights it stops using, not one unit's worth (which would cut attention ops before anything else)."""
    from spvit_dsl.search.methods.magnitude import _normalised
    from spvit_dsl.supernet.lower import lower

    program = compile_text(SPACE.format(strategy="magnitude", budget=BUDGETS[0]), "m.vit")
    net = lower(program.space)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.where(torch.rand(t.shape) < 0.5, -0.3, 0.3))
    groups = [g for g in net.groups.values() if g.decision]
    assert {g.kind for g in groups} >= {"embed", "attention", "heads", "head_dim", "ffn", "weights"}
    scores = _normalised(net, groups)
    for g in groups:
        torch.testing.assert_close(scores[g.path], net.unit_weights(g.path), rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("change", ["none", "round", "edit_density"])
def test_sparse_layers_keep_their_density_when_widths_or_densities_change(
    tmp_path: Path, change: str
) -> None:
    """``build --round`` resizes kept units, a hand edit may change a density: a sparse layer whose rows, columns
    or density changed gets a new mask with ``round(density · weights)`` non-zeros for its new shape, the others
    keep the searched mask."""
    import re

    from spvit_dsl.compact.build import build

    program = compile_file(str(write(tmp_path, "magnitude", BUDGETS[1])))
    result = run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    frozen = result.frozen_path
    if change == "edit_density":
        text = Path(frozen).read_text()
        edited, n = re.subn(r"fc1: 0\.5", "fc1: 0.25", text, count=1)
        assert n == 1, text
        edited = re.sub(r"\nbudget \{[^}]*\}", "", edited)  # the edit may cost more than the budget
        frozen = str(tmp_path / "edited.vit")
        Path(frozen).write_text(edited)
    model = build(frozen, weights=result.checkpoint_path, round_to=8 if change == "round" else None)
    arch = model.spvit_arch
    sparse = 0
    for i, b in enumerate(arch.blocks):
        for layer, module in (
            ("qkv", "attn.qkv"),
            ("proj", "attn.proj"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
        ):
            density = b.density.of(layer)
            if (
                density >= 1
                or (layer in ("qkv", "proj") and b.op != "msa")
                or (layer[:2] == "fc" and not b.ffn)
            ):
                continue
            weight = model.get_submodule(f"blocks.{i}.{module}").weight
            assert int((weight != 0).sum()) == round(density * weight.numel()), (i, layer)
            sparse += 1
    assert sparse > 0
