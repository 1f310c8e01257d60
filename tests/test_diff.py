"""`spvit-dsl diff`: frozen/frozen, space/frozen membership, exit codes and deterministic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spvit_dsl.cli import app
from spvit_dsl.compile.diff import diff, markdown
from spvit_dsl.compile.freeze import freeze
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.lang.emit import emit

ROOT = Path(__file__).parent.parent
runner = CliRunner()
FROZEN = ROOT / "examples/deit_s_frozen.vit"


def _variant(tmp_path: Path, old: str, new: str, name: str = "b.vit") -> Path:
    path = tmp_path / name
    path.write_text(FROZEN.read_text().replace(old, new))
    return path


def test_identical_frozen_specs_exit_0() -> None:
    result = runner.invoke(app, ["diff", str(FROZEN), str(FROZEN)])
    assert result.exit_code == 0 and "identical" in result.stdout


def test_two_frozen_specs_report_block_changes_and_cost_delta(tmp_path: Path) -> None:
    b = _variant(
        tmp_path,
        "block 11 { attention: msa; ffn: width 320 }",
        "block 11 { attention: skip; ffn: width 320 }",
    )
    result = runner.invoke(app, ["diff", str(FROZEN), str(b), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["changes"] == [
        {"block": 11, "stage": 0, "field": "attention", "a": "msa", "b": "skip", "note": ""}
    ]
    pa, pb = compile_file(str(FROZEN)), compile_file(str(b))
    from spvit_dsl.compile.freeze import arch_of

    expect = (
        pb.graph.cost(arch_of(pb.checked), "paper").macs - pa.graph.cost(arch_of(pa.checked), "paper").macs
    ) / 1e9
    assert data["cost"]["b"]["flops"] - data["cost"]["a"]["flops"] == pytest.approx(expect)
    assert expect < 0  # removing attention saves compute


def test_space_against_frozen_member_and_breaks(tmp_path: Path) -> None:
    space = compile_file(str(ROOT / "specs/deit_s.vit"))
    d = diff(space, compile_file(str(FROZEN)))
    assert d.kind == "space/frozen" and d.member is True and not d.breaks
    restricted = compile_text(
        "backbone deit_small_patch16_224 { weights = pretrained; image = 224; classes = 1000 }\n"
        "blocks all { attention: one of {skip, conv1x1, conv3x3, msa}; ffn: per neuron }\n"
        "blocks 0..1 { attention: msa }\n",
        "restricted.vit",
    )
    d = diff(restricted, compile_file(str(FROZEN)))
    assert d.member is False
    assert [(r.block, r.field, r.note) for r in d.breaks] == [
        (0, "attention", "not in space"),
        (1, "attention", "not in space"),
    ]


def test_frozen_over_the_space_budget_is_not_a_member() -> None:
    d = diff(compile_file(str(ROOT / "examples/deit_s_tight.vit")), compile_file(str(FROZEN)))
    assert d.member is False and [r.note for r in d.breaks] == ["over budget"]


def test_markdown_is_deterministic_and_complete() -> None:
    a, b = (
        compile_file(str(ROOT / "specs/swin_t.vit")),
        compile_file(str(ROOT / "examples/swin_restricted.vit")),
    )
    arch = b.graph.bounds("paper").cheapest["flops"]
    frozen = compile_text(emit(freeze(b.checked, arch, {})), "f.vit")
    first, second = markdown(diff(a, frozen)), markdown(diff(a, frozen))
    assert first == second
    assert "| 0 | 0 | attention |" in first and "frozen network is a member of the space" in first


def test_diff_error_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["diff", str(FROZEN), str(tmp_path / "missing.vit")])
    assert result.exit_code == 2
