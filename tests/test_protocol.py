"""The strategy protocol's hooks, exercised by toy strategies (tests/_toys.py): physical shrinks during training
keep checkpoints, resume and data-parallel ranks consistent; a scoring strategy's proxy batches resume too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import _toys  # noqa: F401  (registers toy_shrink and toy_score)
import pytest
import torch
from safetensors import safe_open

from spvit_dsl.compact.build import build
from spvit_dsl.compile.program import compile_file
from spvit_dsl.search import run_search
from spvit_dsl.search.loop import SearchInterrupted

SPEC = """backbone vit_tiny_patch16_224 {{ weights = none; image = 16; patch = 4; channels = 1; classes = 10; embed_dim = 32; depth = 2; heads = 2 }}
embed: 16..32 step 4
blocks all {{ heads: 1..2; ffn: per neuron }}
budget {{ flops <= 70% }}
search {strategy} {{ data = digits; batch_size = 32{extra} }}
"""


def spec(tmp: Path, strategy: str, extra: str = "; lr = 1e-3") -> str:
    path = tmp / f"{strategy}.vit"
    path.write_text(SPEC.format(strategy=strategy, extra=extra if strategy != "toy_score" else ""))
    return str(path)


def tensors(
    path: str, prefixes: tuple[str, ...] = ("net/", "opt/", "strategy/", "kept/")
) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}


def same(a, b) -> None:
    strip = lambda text: [line for line in text.splitlines() if "date =" not in line]  # noqa: E731
    assert strip(a.frozen_text) == strip(b.frozen_text)
    ta, tb = tensors(a.checkpoint_path), tensors(b.checkpoint_path)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shrink")
    program = compile_file(spec(folder, "toy_shrink"))
    return program, run_search(program, steps=6, device="cpu", out=str(folder / "out"), quiet=True)


def test_shrinks_change_the_supernet_and_the_checkpoint_records_them(shrunk) -> None:
    program, result = shrunk
    with safe_open(result.checkpoint_path, framework="pt") as f:
        import json

        state = json.loads(f.metadata()["spvit_dsl.state"])
        fc1 = f.get_tensor("net/model.blocks.0.mlp.fc1.weight")
    hidden = program.space.geometry.blocks[0].hidden
    assert len(state["shrunk"]["blocks.0.ffn"]) == hidden // 2 and fc1.shape[0] == hidden // 2
    assert len(state["shrunk"]["blocks.1.heads"]) == 1
    # the stored kept units index the dense backbone (a unit the shrink removed is never among them)
    kept = result.kept["blocks.0.ffn"]
    assert set(kept.tolist()) <= set(state["shrunk"]["blocks.0.ffn"])
    assert result.arch.blocks[1].heads == 1


def test_resume_across_a_shrink_is_bit_identical(shrunk, tmp_path: Path) -> None:
    program, reference = shrunk

    def ctrl_c_after_the_first_shrink(info) -> None:
        if info.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out = str(tmp_path / "out")
    with pytest.raises(SearchInterrupted):
        run_search(
            program, steps=6, device="cpu", out=out, quiet=True, callback=ctrl_c_after_the_first_shrink
        )
    resumed = run_search(program, steps=6, device="cpu", out=out, quiet=True, resume=True)
    same(reference, resumed)


def test_a_shrunk_search_builds_the_compact_network(shrunk, tmp_path: Path) -> None:
    _program, result = shrunk
    model = build(result.frozen_path, weights=result.checkpoint_path)
    g = model.spvit_geometry
    x = torch.rand(2, g.in_chans, g.img_size, g.img_size)
    assert model.eval()(x).shape == (2, 10)
    assert model.blocks[1].attn.num_heads == 1


def test_torchrun_ranks_shrink_the_same_units(tmp_path: Path) -> None:
    path = spec(tmp_path, "toy_shrink")
    out = tmp_path / "out"
    here = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{here}{os.pathsep}{os.getcwd()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(here / "_toy_search.py"), path, str(out), "5"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with safe_open(str(out / "search.ckpt"), framework="pt") as f:
        assert f.get_tensor("net/model.blocks.1.attn.qkv.weight").shape[0] == 3 * 16  # one head of 16 left
    assert compile_file(str(out / "toy_shrink.frozen.vit")).frozen


def test_a_scoring_strategy_resumes_its_proxy_batches(tmp_path: Path) -> None:
    program = compile_file(spec(tmp_path, "toy_score"))
    reference = run_search(program, device="cpu", out=str(tmp_path / "ref"), quiet=True)
    assert reference.steps == 3
    out = str(tmp_path / "out")

    def ctrl_c(info) -> None:
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SearchInterrupted):
        run_search(program, device="cpu", out=out, quiet=True, callback=ctrl_c)
    assert int(tensors(os.path.join(out, "search.ckpt"), ("strategy/",))["strategy/seen"]) == 2
    resumed = run_search(program, device="cpu", out=out, quiet=True, resume=True)
    same(reference, resumed)
