"""Data-parallel search: torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

from _search_specs import write_spec

from spvit_dsl.compile.freeze import arch_of
from spvit_dsl.compile.program import compile_file


def test_torchrun_two_processes_gloo(tmp_path):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "spvit_dsl",
        "search",
        spec,
        "--steps",
        "3",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "report.png", "search.ckpt", "small.frozen.vit"]
    assert proc.stdout.count("frozen spec:") == 1  # only rank 0 reports
    frozen = compile_file(str(out / "small.frozen.vit"))
    assert frozen.decisions == 0
    program = compile_file(spec)
    cost = program.graph.cost(arch_of(frozen.checked), "paper").macs
    limit = program.budgets[0].absolute
    assert 0.99 * limit <= cost <= limit
    steps = [line for line in open(out / "metrics.jsonl") if '"kind": "step"' in line]
    assert len(steps) == 3  # one writer


def _torchrun_search(spec, out, timeout: int) -> None:
    """``spvit-dsl search SPEC`` under torchrun with 2 CPU processes (gloo) into ``out``; it must succeed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["spvit_dsl", "search", str(spec), "--device", "cpu", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)  # a hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


UPVIT = """backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; channels = 1; classes = 10
  embed_dim = 32; depth = 2; heads = 4 }
embed: 24
blocks all { heads: 2; head_dim: 6; ffn: width 64 }
search upvit { proxy_per_class = 2; batch_size = 10; units_per_pass = 16 }
"""


def test_torchrun_upvit_shards_units_and_sums_the_scores(tmp_path):
    """Two gloo processes score disjoint halves of the units (u mod 2); the summed scores, the kept units and the
    frozen network equal one process's."""
    import torch

    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.search import run_search
    from spvit_dsl.search.checkpoint import load_checkpoint

    spec = tmp_path / "up.vit"
    spec.write_text(UPVIT)
    out = tmp_path / "ddp"
    _torchrun_search(spec, out, timeout=300)
    single = run_search(compile_text(UPVIT, str(spec)), out=str(tmp_path / "one"), quiet=True, device="cpu")
    ddp_ckpt = load_checkpoint(str(out / "search.ckpt"))
    one_ckpt = load_checkpoint(single.checkpoint_path)
    assert set(one_ckpt.kept) == set(ddp_ckpt.kept) and one_ckpt.kept
    for path, index in one_ckpt.kept.items():
        assert torch.equal(index, ddp_ckpt.kept[path]), path
    # each rank's own checkpointed buffers hold its half; the kept units above come from the summed scores
    for name, t in one_ckpt.strategy.items():
        assert t.abs().sum() > 0, name
    skip = ("date",)
    text = [ln for ln in (out / "up.frozen.vit").read_text().splitlines() if not ln.strip().startswith(skip)]
    ref = [ln for ln in open(single.frozen_path).read().splitlines() if not ln.strip().startswith(skip)]
    assert [ln for ln in text if "source" not in ln] == [ln for ln in ref if "source" not in ln]


OFB = """backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; channels = 1; classes = 10
  embed_dim = 32; depth = 2; heads = 4 }
budget { flops <= 50% }
search ofb { epochs = 2; batch_size = 64; lr = 2e-3; arch_lr = 0.1; warmup_fraction = 0.1 }
"""


def test_torchrun_ofb_shrinks_identically_on_every_rank(tmp_path):
    """Two gloo processes: α is all-reduced before every shrinking check and the ranks compare their decisions
    (active candidates and cut units) at each check, failing loudly if they differ; the ranks then derive the same
    network (checked by the loop)."""
    from spvit_dsl.search.checkpoint import load_checkpoint

    spec = tmp_path / "ofb.vit"
    spec.write_text(OFB)
    out = tmp_path / "ddp"
    _torchrun_search(spec, out, timeout=600)
    ckpt = load_checkpoint(str(out / "search.ckpt"))
    assert ckpt.state["shrunk"], "no group was shrunk: the test would check nothing"
    assert ckpt.state["strategy_state"]["checks"] > 0
    frozen = compile_file(str(out / "ofb.frozen.vit"))
    assert frozen.decisions == 0
