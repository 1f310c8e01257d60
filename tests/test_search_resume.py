"""Interrupting a search (Ctrl-C, or stopping after an epoch) and resuming gives the same result as one run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from _search_specs import write_spec
from safetensors import safe_open

from spvit_dsl.compile.program import compile_file
from spvit_dsl.search import run_search
from spvit_dsl.search.loop import SearchInterrupted


def _tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(("net/", "opt/"))}


def _without_date(text):
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("date ="))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    program = compile_file(write_spec(folder))
    return program, run_search(program, device="cpu", out=str(folder / "out"), quiet=True)


def _same(a, b):
    assert _without_date(a.frozen_text) == _without_date(b.frozen_text)
    assert a.kept.keys() == b.kept.keys()
    for k in a.kept:
        assert torch.equal(a.kept[k], b.kept[k]), k
    ta, tb = _tensors(a.checkpoint_path), _tensors(b.checkpoint_path)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_ctrl_c_mid_epoch_then_resume_matches(reference, tmp_path):
    program, ref = reference
    assert ref.epochs == 2 and ref.steps > 12

    def press_ctrl_c(info):
        if info.step == 7:  # inside the first epoch (11 steps of 128 images)
            os.kill(os.getpid(), signal.SIGINT)

    out = str(tmp_path / "out")
    with pytest.raises(SearchInterrupted, match="checkpoint saved"):
        run_search(program, device="cpu", out=out, quiet=True, callback=press_ctrl_c)
    assert not os.path.exists(os.path.join(out, "small.frozen.vit"))
    resumed = run_search(program, device="cpu", out=out, quiet=True, resume=True)
    _same(ref, resumed)
    # the metrics log has each step exactly once
    steps = [line for line in open(resumed.metrics_path) if '"kind": "step"' in line]
    assert len(steps) == ref.steps


def test_stop_after_one_epoch_then_resume_matches(reference, tmp_path):
    """--steps stops a run (the schedules stay planned over its epochs); --resume without it finishes the run."""
    program, ref = reference
    out = str(tmp_path / "out")
    first = run_search(program, device="cpu", out=out, quiet=True, steps=ref.steps // 2)
    assert first.epochs == 1
    resumed = run_search(program, device="cpu", out=out, quiet=True, steps=0, resume=True)
    assert resumed.epochs == 2
    _same(ref, resumed)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from spvit_dsl.lang.errors import UsageError

    program = compile_file(write_spec(tmp_path))
    with pytest.raises(UsageError, match="no checkpoint"):
        run_search(program, device="cpu", out=str(tmp_path / "none"), quiet=True, resume=True)


def test_resume_survives_a_torn_metrics_line_and_keeps_every_record(reference, tmp_path):
    """A kill while metrics.jsonl is written leaves half a line: --resume skips it, and the log then has every
    step of the search exactly once (metrics are written before the checkpoint that covers them)."""
    program, ref = reference
    out = tmp_path / "out"
    run_search(program, device="cpu", out=str(out), quiet=True, steps=ref.steps // 2)
    metrics = out / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as fh:
        fh.write('{"kind": "step", "step": 99, "loss": 0.')  # torn: no end, no newline
    resumed = run_search(program, device="cpu", out=str(out), quiet=True, steps=0, resume=True)
    _same(ref, resumed)
    steps = [line for line in open(resumed.metrics_path) if '"kind": "step"' in line]
    assert len(steps) == ref.steps and all(line.endswith("}\n") for line in steps)


def test_resume_with_changed_settings_is_refused_but_longer_runs_are_fine(reference, tmp_path):
    """A resumed search must train with the settings it started with: a changed batch size or learning rate would
    be recorded but not used (the optimizers' state wins), so it is refused in one line; --epochs and --steps may
    change (that is what resuming is for)."""
    from spvit_dsl.lang.errors import UsageError

    program, ref = reference
    out = str(tmp_path / "out")
    run_search(program, device="cpu", out=out, quiet=True, steps=ref.steps // 2)
    with pytest.raises(UsageError, match=r"batch_size 128 \(now 32\)"):
        run_search(program, device="cpu", out=out, quiet=True, resume=True, batch_size=32)
    with pytest.raises(UsageError, match=r"lr .*now 0\.05"):
        run_search(program, device="cpu", out=out, quiet=True, resume=True, settings={"lr": 0.05})
    resumed = run_search(program, device="cpu", out=out, quiet=True, steps=0, resume=True)
    _same(ref, resumed)


def test_more_epochs_on_resume_keep_the_planned_schedule(reference, tmp_path):
    """SPViT's budget schedule is planned over the epochs of the first start: a resume with more --epochs trains
    on at the budget (the derived network stays within 2% of it) instead of re-planning the schedule."""
    program, ref = reference
    out = str(tmp_path / "out")
    run_search(program, device="cpu", out=out, quiet=True, epochs=1)
    longer = run_search(program, device="cpu", out=out, quiet=True, epochs=2, resume=True)
    assert longer.epochs == 2 and longer.steps == ref.steps
    with safe_open(longer.checkpoint_path, framework="pt") as f:
        state = json.loads(f.metadata()["spvit_dsl.state"])
    assert state["strategy_state"]["plan_epochs"] == 1.0
    limit = longer.budgets[0]["limit"]
    steps = [json.loads(line) for line in open(longer.metrics_path) if '"kind": "step"' in line]
    assert len(steps) == ref.steps
    assert all(abs(r["cost"]["flops"] / limit - 1) <= 0.02 for r in steps[len(steps) // 2 :])
