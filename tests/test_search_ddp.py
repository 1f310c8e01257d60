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
