"""``spvit-dsl compare``: every strategy from one dense start under one budget, one table; cached, resumable cells;
a strategy that cannot search the space gets its reason in its row."""

from __future__ import annotations

import json
import os

import pytest

from spvit_dsl.cli.app import main
from spvit_dsl.compare import run_compare
from spvit_dsl.compile.program import compile_file
from spvit_dsl.space.units import parse_budget_flag

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_tiny.vit")
FAST = ["--dense-epochs", "0", "--finetune-epochs", "1", "--finetune-steps", "2", "--search-steps", "2"]


def _ffn_only(tmp_path) -> str:
    """digits_tiny with a space every strategy can search: FFN widths in groups of 8, nothing else."""
    text = open(EXAMPLE, encoding="utf-8").read()
    text = text.replace(
        "blocks all { attention: one of {skip, conv1x1, conv3x3, msa}; ffn: per neuron }",
        "blocks all { ffn: groups of 8 }",
    )
    assert "groups of 8" in text
    path = tmp_path / "ffn_only.vit"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _run(capsys, *args):
    try:
        main(list(args))
    except SystemExit as exc:
        captured = capsys.readouterr()
        assert exc.code in (0, None), captured.err
        return captured
    return capsys.readouterr()


def test_every_strategy_one_seed_end_to_end(tmp_path, capsys):
    spec, out = _ffn_only(tmp_path), tmp_path / "cmp"
    got = _run(
        capsys,
        "compare",
        spec,
        "--seeds",
        "1",
        "--budget",
        "50%",
        *FAST,
        "--latency-batch",
        "4",
        "--out",
        str(out),
        "--json",
    )
    report = json.loads(got.out)  # the whole of stdout is one JSON object
    assert [r["strategy"] for r in report["rows"]] == [
        "spvit",
        "upvit",
        "ofb",
        "dimap",
        "magnitude",
        "random",
    ]
    dense = report["dense"]
    assert dense["flops"] > 0 and dense["latency_ms"] > 0 and 0 <= dense["top1"] <= 100
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert 0.99 <= row["budget_ratio_max"] <= 1.0, row  # at or under the budget, within 1%
        assert row["flops"] <= 0.5 * dense["flops"] * (1 + 1e-9)
        assert 0 <= row["top1_min"] <= row["top1_mean"] <= row["top1_max"] <= 100
        assert row["latency_ms"] > 0 and row["flops_cut"] > 0.49
        # DIMAP runs in the paper's form (single weights): its row is sparse, its FLOPs count non-zero weights
        assert row["structure"] == ("sparse" if row["strategy"] == "dimap" else "dense"), row
        assert row["search_s"] is not None and row["search_s"] >= 0
    assert set(report["units"]) >= {"top1", "flops", "params", "latency_ms", "latency_cut", "efficiency"}
    assert report["latency"]["batch"] == 4 and report["budget"] == "flops <= 50%"
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") == 8  # header, dense and six methods


def test_dimap_runs_in_the_papers_form_or_on_the_specs_space(tmp_path):
    from spvit_dsl.compare import cell_spec
    from spvit_dsl.compile.program import compile_text

    program = compile_file(_ffn_only(tmp_path))
    sparse = compile_text(cell_spec(program, "dimap", dimap_sparse=True), program.path)
    structured = compile_text(cell_spec(program, "dimap", dimap_sparse=False), program.path)
    assert {g.kind for g in sparse.graph.groups() if len(g.choices) > 1} == {"weights"}
    assert {g.kind for g in structured.graph.groups() if len(g.choices) > 1} == {"ffn"}
    assert cell_spec(program, "ofb", dimap_sparse=True) == cell_spec(program, "ofb")  # only DIMAP changes


def test_a_strategy_with_default_grids_searches_only_the_specs_space(tmp_path):
    """OFB fills its grids into every dimension a spec leaves open; in a comparison it must search the space the
    others search, so its cell spec pins the open dimensions at their dense values."""
    from spvit_dsl.compare import cell_spec
    from spvit_dsl.compile.program import compile_text

    program = compile_file(_ffn_only(tmp_path))
    kinds = {}
    for name in ("spvit", "ofb", "upvit", "magnitude"):
        cell = compile_text(cell_spec(program, name), program.path)
        kinds[name] = sorted((g.path, tuple(g.choices)) for g in cell.graph.groups() if len(g.choices) > 1)
    assert kinds["ofb"] == kinds["spvit"] == kinds["upvit"] == kinds["magnitude"]
    assert {path.split(".")[-1] for path, _ in kinds["ofb"]} == {"ffn"}


def test_a_strategy_that_cannot_search_the_space_says_why_in_its_row(tmp_path, capsys):
    got = _run(
        capsys,
        "compare",
        EXAMPLE,
        "--strategies",
        "upvit,random",
        "--seeds",
        "2",
        *FAST,
        "--latency-batch",
        "4",
        "--out",
        str(tmp_path / "o"),
    )
    assert "upvit: cannot search this space: 'upvit' cannot search attention" in got.err
    assert "cannot search" in got.out  # the table row too
    report = json.loads((tmp_path / "o" / "compare.json").read_text())
    upvit, random = report["rows"]
    assert upvit["status"] == "skipped" and "attention" in upvit["reason"]
    assert random["status"] == "ok" and random["seeds"] == [0, 1]


def test_an_interrupted_comparison_finishes_only_the_missing_cells(tmp_path, monkeypatch):
    import spvit_dsl.compare.cells as compare

    program = compile_file(_ffn_only(tmp_path), budgets=[parse_budget_flag("50%")])
    out = str(tmp_path / "cmp")
    kw = dict(
        strategies=["magnitude", "random"],
        seeds=2,
        out=out,
        finetune_epochs=1,
        finetune_steps=2,
        dense_epochs=0,
        latency_batch=4,
    )
    real, calls = compare.run_cell, []

    def interrupting(plan, strategy, seed, folder, **kw):
        calls.append((strategy, seed))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the third cell
        return real(plan, strategy, seed, folder, **kw)

    monkeypatch.setattr(compare, "run_cell", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_compare(program, **kw)
    first = os.path.join(out, "cells", "magnitude", "seed0", "cell.json")
    stamp = os.stat(first).st_mtime_ns
    monkeypatch.setattr(compare, "run_cell", real)
    result = run_compare(program, **kw)
    assert result.computed == 2  # random seed 0 and 1; both magnitude cells were read back
    assert os.stat(first).st_mtime_ns == stamp
    assert [r["seeds"] for r in result.rows] == [[0, 1], [0, 1]]
    with open(
        first, "w", encoding="utf-8"
    ) as fh:  # a cell record edited into garbage is run again, not trusted
        fh.write('{"strategy": ')
    again = run_compare(program, **kw)
    assert again.computed == 1 and json.loads(open(first).read())["strategy"] == "magnitude"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--strategies", "spvit,bogus"], "unknown strategy 'bogus'"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--latency-batch", "0"], "--latency-batch must be at least 1"),
        (["--budget", "3.3"], "--budget: "),
        (["--strategies", "spvt"], "did you mean 'spvit'"),
        (["--search-steps", "-1"], "--search-steps must be at least 0, not -1"),
        (["--finetune-epochs", "0"], "--finetune-epochs must be at least 1, not 0"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exc:
        main(["compare", EXAMPLE, *flags, "--out", str(tmp_path / "o")])
    assert exc.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in lines[0]


def test_ctrl_c_exits_130_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import spvit_dsl.compare.cells as cells

    def interrupt(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cells, "run_cell", interrupt)
    with pytest.raises(SystemExit) as exc:
        main(["compare", _ffn_only(tmp_path), "--strategies", "random", *FAST, "--out", str(tmp_path / "o")])
    assert exc.value.code == 130
    assert "finished cells are kept; run the same command again to continue" in capsys.readouterr().err


def test_another_comparison_in_the_same_folder_is_refused(tmp_path, capsys):
    spec, out = _ffn_only(tmp_path), str(tmp_path / "o")
    args = [
        "compare",
        spec,
        "--strategies",
        "random",
        "--seeds",
        "1",
        *FAST,
        "--latency-batch",
        "2",
        "--out",
        out,
    ]
    first = _run(capsys, *args)  # the spec's own budget, flops <= 50%
    assert "random weights" in first.err  # --dense-epochs 0 with `weights = none` is said, not silent
    again = _run(capsys, *args, "--budget", "50%")  # the same limit, written as a flag: read back
    assert "0 cell(s) computed, 1 read back" in again.out
    with pytest.raises(SystemExit) as exc:
        main([*args, "--budget", "40%"])  # another budget: the 50% cell must not be read back as a 40% one
    assert exc.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds the cells of another comparison" in line and "--out" in line


def test_under_torchrun_the_searches_are_data_parallel_and_rank_0_reports(tmp_path):
    """Two gloo processes: every rank runs each training search (DDP), rank 0 alone fine-tunes, times and writes
    the table; the result has every row, once."""
    import subprocess
    import sys

    spec, out = _ffn_only(tmp_path), tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["spvit_dsl", "compare", spec, "--strategies", "spvit,random", "--seeds", "1", *FAST]
    cmd += ["--latency-batch", "2", "--device", "cpu", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)  # a hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in report["rows"]] == ["spvit", "random"]
    assert all(r["status"] == "ok" and r["budget_ratio_max"] <= 1.0 for r in report["rows"])
    assert proc.stdout.count('"rows"') == 1  # one report, from rank 0
    search = json.loads(
        (out / "cells" / "spvit" / "seed0" / "cell.json").read_text()
    )  # the DDP search ran its steps
    assert search["search_steps"] == 2
