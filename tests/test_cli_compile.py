"""CLI tests for `compile` and `fmt` (CliRunner for output, main() for exit codes and rendered errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spvit_dsl.cli import app, main

ROOT = Path(__file__).parent.parent
runner = CliRunner()


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    cap = capsys.readouterr()
    return int(info.value.code or 0), cap.out, cap.err


@pytest.mark.parametrize("spec", sorted(p.name for p in ROOT.glob("specs/*.vit")))
def test_compile_json_of_shipped_specs(spec: str) -> None:
    result = runner.invoke(app, ["compile", str(ROOT / "specs" / spec), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {
        "spec",
        "backbone",
        "convention",
        "frozen",
        "decisions",
        "space_size_log10",
        "flops",
        "params",
        "budgets",
        "feasible",
    } <= set(data)
    assert data["flops"]["min"] < data["budgets"][0]["absolute"] < data["flops"]["dense"]
    assert data["feasible"] and not data["frozen"] and data["decisions"] > 0


def test_compile_summary_names_the_convention() -> None:
    result = runner.invoke(app, ["compile", str(ROOT / "specs/deit_s.vit"), "--convention", "exact"])
    assert result.exit_code == 0
    assert "exact convention" in result.stdout and "4.608 G" in result.stdout


@pytest.mark.parametrize(
    "example, label",
    [
        ("family_swin.vit", "swin_tiny_patch4_window7_224 (swin, "),
        ("family_swinv2.vit", "swinv2_tiny_window8_256 (swinv2, "),
        ("family_swinv2_cr.vit", "swinv2_cr_tiny_ns_224 (swinv2_cr, "),
        ("family_swiglu.vit", "vit_giant_patch14_dinov2 (vit, SwiGLU FFN, "),
    ],
)
def test_compile_summary_names_the_family(example: str, label: str) -> None:
    result = runner.invoke(app, ["compile", str(ROOT / "examples" / example)])
    assert result.exit_code == 0, result.output
    assert label in " ".join(result.stdout.split())


def test_budget_flag_overrides_the_spec() -> None:
    result = runner.invoke(app, ["compile", str(ROOT / "specs/deit_s.vit"), "--json", "--budget", "70%"])
    data = json.loads(result.stdout)
    assert [b["unit"] for b in data["budgets"]] == ["%"]
    assert data["budgets"][0]["absolute"] == pytest.approx(0.7 * data["flops"]["dense"], rel=1e-6)


def test_frozen_example_has_no_decisions() -> None:
    data = json.loads(
        runner.invoke(app, ["compile", str(ROOT / "examples/deit_s_frozen.vit"), "--json"]).stdout
    )
    assert data["frozen"] and data["decisions"] == 0 and data["space_size_log10"] == 0
    assert data["flops"]["min"] == data["flops"]["max"]


@pytest.mark.parametrize("suffix", [".json", ".graphml", ".dot"])
def test_graph_export(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"g{suffix}"
    result = runner.invoke(app, ["compile", str(ROOT / "examples/swin_restricted.vit"), "--graph", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "blocks.11.attention" in text and "stages.3.merge" in text
    if suffix == ".json":
        data = json.loads(text)
        assert len([n for n in data["nodes"] if n["kind"] == "attention"]) == 12


def test_spec_error_is_rendered_with_caret_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "bad.vit"
    spec.write_text("backbone deit_small_patch16_224 { }\nblocks all { attention: one of {skip, conv3x4} }\n")
    code, out, err = run_main(["compile", str(spec)], capsys)
    assert code == 1 and out == ""
    assert f"{spec}:2:39: error: unknown op 'conv3x4'" in err
    assert "^^^^^^^" in err and "did you mean 'conv3x3'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["compile", "missing.vit"], 1, "error: cannot read spec 'missing.vit'"),
        (["compile", "SPEC", "--budget", "3.3GFLOP"], 1, "error: --budget: unknown unit 'GFLOP'"),
        (
            ["compile", "SPEC", "--budget", "0.001G"],
            1,
            "cannot be met: the cheapest network in this space costs",
        ),
        (
            ["compile", "SPEC", "--convention", "fvcore"],
            1,
            "error: --convention: expected 'paper' or 'exact'",
        ),
        (["compile", "SPEC", "--graph", "x.png"], 1, "error: --graph: unknown graph format"),
        (["compile", "SPEC", "--bogus"], 2, "error: No such option: --bogus"),
    ],
)
def test_flag_and_file_errors_are_one_line(
    args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = [str(ROOT / "specs/deit_s.vit") if a == "SPEC" else a for a in args]
    args = [str(tmp_path / a) if a == "x.png" else a for a in args]
    got, _, err = run_main(args, capsys)
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_warning_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        ["compile", str(ROOT / "tests/data/valid/warning_budget.vit"), "--json"], capsys
    )
    assert code == 0 and "warning: budget flops <= 2G is at or above" in err
    json.loads(out)


def test_fmt_rewrites_and_check_reports(tmp_path: Path) -> None:
    spec = tmp_path / "a.vit"
    spec.write_text("backbone deit_tiny_patch16_224{weights=none}  // keep me\nblocks all{attention:msa}")
    result = runner.invoke(app, ["fmt", "--check", str(spec)])
    assert result.exit_code == 1 and "would reformat" in result.stdout
    assert runner.invoke(app, ["fmt", str(spec)]).exit_code == 0
    assert (
        spec.read_text()
        == "backbone deit_tiny_patch16_224 { weights = none }  // keep me\n\nblocks all { attention: msa }\n"
    )
    assert runner.invoke(app, ["fmt", "--check", str(spec)]).exit_code == 0


def test_compile_materialises_the_supernet(tmp_path: Path) -> None:
    import torch

    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.supernet import load_supernet, read_metadata

    out = tmp_path / "supernet.safetensors"
    result = runner.invoke(app, ["compile", str(ROOT / "examples/digits_tiny.vit"), "--supernet", str(out)])
    assert result.exit_code == 0, result.output
    assert "supernet written to" in result.stdout
    meta = read_metadata(str(out))
    assert "blocks all" in next(v for v in meta.values() if "backbone vit_tiny_patch16_224" in v)
    net = load_supernet(str(out), lambda text: compile_text(text).space).eval()
    assert {g.path for g in net.groups.values() if g.decision} >= {"blocks.0.attention", "blocks.5.ffn"}
    x = torch.rand(2, 1, 32, 32)
    assert net(x).shape == (2, 10)
