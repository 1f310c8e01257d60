"""The search on examples/digits_tiny.vit: budgets met within 1%, outputs, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from spvit_dsl.cli import app
from spvit_dsl.compile.freeze import arch_of, provenance
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.search import run_search
from spvit_dsl.space.units import SCALE, parse_budget_flag

SPEC = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_tiny.vit")
BUDGETS = ("40%", "60%", "80%")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One short search per budget (3 steps of 16 images each: the repair has to do the work)."""
    out = {}
    for b in BUDGETS:
        program = compile_file(SPEC, budgets=[parse_budget_flag(b)])
        folder = tmp_path_factory.mktemp(f"search{b[:2]}")
        out[b] = (
            program,
            run_search(program, steps=3, batch_size=16, device="cpu", out=str(folder), quiet=True),
        )
    return out


@pytest.mark.parametrize("budget", BUDGETS)
def test_frozen_network_meets_the_budget_within_one_percent(searched, budget):
    program, result = searched[budget]
    text = open(result.frozen_path, encoding="utf-8").read()
    frozen = compile_text(text, result.frozen_path)
    assert frozen.decisions == 0
    dense = program.bounds("paper").macs.dense
    limit = float(budget.rstrip("%")) / 100 * dense
    # price the frozen spec with the original program's cost model, independently of the search's bookkeeping
    achieved = program.graph.cost(arch_of(frozen.checked), "paper").macs
    assert achieved <= limit
    assert achieved >= 0.99 * limit
    assert result.budgets[0]["achieved"] == pytest.approx(achieved)


@pytest.mark.parametrize("budget", BUDGETS)
def test_kept_units_match_the_frozen_widths(searched, budget):
    program, result = searched[budget]
    frozen = compile_file(result.frozen_path)
    arch = arch_of(frozen.checked)
    assert arch == result.arch
    for p, block in zip(program.space.plans, arch.blocks, strict=True):
        kept = result.kept.get(f"blocks.{p.geom.index}.ffn")
        if block.ffn == p.geom.hidden:
            assert kept is None  # a group kept whole needs no indices
            continue
        assert kept.dtype == torch.int64 and kept.numel() == block.ffn
        assert torch.equal(kept, torch.unique(kept))  # ascending, no repeats
        assert kept.numel() == 0 or int(kept.max()) < p.geom.hidden


def test_the_user_is_told_when_the_projection_did_the_work(searched, capsys):
    """--steps 3 stops the search long before its schedule (planned over the spec's 6 epochs) reaches 40% of the
    FLOPs: the projection cuts the rest, and says so in one line with what to do (even with quiet=True: the note
    goes to stderr; here it is also kept in ``info``)."""
    _, result = searched["40%"]
    notice = result.info.get("notice")
    assert notice is not None and "\n" not in notice
    assert "of the flops budget" in notice and "budget projection removed" in notice and "--epochs" in notice
    assert "stopped at step 3" in notice and "budget_reach=" in notice
    derived = result.info["derived_cost"]["flops"] / result.budgets[0]["limit"]
    assert f"{derived:.0%}" in notice and derived > 1.02


def _run_for_notice(limit: float, largest: float) -> object:
    """What :func:`spvit_dsl.search.loop._projection_notice` reads of a run: a training strategy, one FLOPs target,
    the price of the space's largest network."""
    from types import SimpleNamespace

    from spvit_dsl.search.budget import Target

    ctx = SimpleNamespace(
        targets=[Target("flops", limit, "x")],
        price=lambda arch: {"flops": largest},
        program=SimpleNamespace(space=SimpleNamespace(largest=lambda: None)),
    )
    return SimpleNamespace(strategy=SimpleNamespace(kind="train"), ctx=ctx, settings={})


def test_a_network_the_projection_gave_attention_back_is_announced_in_one_line():
    from spvit_dsl.search.loop import _projection_notice

    info = {"derived_cost": {"flops": 100.0}, "raised_msa": "blocks.3.attention", "added": 1, "removed": 0}
    notice = _projection_notice(_run_for_notice(100.0, 200.0), info)
    assert notice is not None and "\n" not in notice
    assert "no msa block" in notice and "blocks.3.attention" in notice and "--epochs" in notice
    assert _projection_notice(_run_for_notice(100.0, 200.0), info | {"raised_msa": None}) is None  # on budget


def test_a_warm_up_longer_than_the_run_is_named_instead_of_more_steps():
    """--epochs 2 on a spec with warmup_epochs = 4: the gates never trained, so "run more steps" or a budget_reach
    cannot help; the line says to lower the warm-up or raise --epochs."""
    from spvit_dsl.search.loop import _ratio_notice

    run = _run_for_notice(100.0, 200.0)
    stopped = {"steps": 44, "reach_step": 66, "planned_steps": 44, "reach_that_fits": 0.0}
    said = _ratio_notice(run, {"schedule": stopped | {"warmup_steps": 88}, "removed": 2}, {"flops": 150.0})
    assert said is not None and "gates never trained" in said and "--warmup-epochs" in said
    assert "run at least" not in said
    short = _ratio_notice(run, {"schedule": stopped | {"warmup_steps": 10}, "removed": 2}, {"flops": 150.0})
    assert short is not None and "run at least 66 steps" in short and "gates never trained" not in short


@pytest.mark.parametrize("warmup", [0.5, 1.0])
def test_a_warm_up_as_long_as_the_run_is_said_before_the_first_step(tmp_path, warmup):
    """The same mistake, said before training (a run can be long): one line naming both settings, ahead of the
    first step, even when quiet; a warm-up shorter than the run says nothing."""
    from spvit_dsl.search.progress import Reporter

    events: list[tuple[str, str]] = []

    class Seen(Reporter):
        def note(self, text: str) -> None:
            events.append(("note", text))

        def step(self, fields: dict) -> None:
            events.append(("step", ""))

    program = compile_file(SPEC)
    run_search(
        program,
        epochs=1,
        steps=2,
        batch_size=16,
        device="cpu",
        out=str(tmp_path),
        reporter=Seen(),
        settings={"warmup_epochs": warmup},
    )
    first = [text for kind, text in events[: events.index(("step", ""))] if kind == "note"]
    if warmup < 1:
        assert first == []
    else:
        (line,) = first
        assert "warmup_epochs = 1" in line and "(1 epoch)" in line and "--warmup-epochs" in line
        assert "gates will never train" in line and "\n" not in line


def test_no_train_longer_advice_when_the_budget_is_above_the_largest_network():
    """`--budget 150%latency`: the searched network uses 67% of it because nothing larger exists; training longer
    cannot help, so there is no line. Under a budget the space could use, the line stays."""
    from spvit_dsl.search.loop import _projection_notice

    info = {"derived_cost": {"flops": 100.0}, "added": 0, "removed": 0}
    assert _projection_notice(_run_for_notice(150.0, 100.0), info) is None
    under = _projection_notice(_run_for_notice(150.0, 300.0), info)
    assert under is not None and "used only 67%" in under
    # the projection added nothing back (every op or unit left out costs more than the rest): it does not claim to
    assert under == (
        "note: the searched network used only 67% of the flops budget, and no op or unit it left out fits in the "
        "rest. To use more of it: offer finer choices where it cut (more ops, per-neuron FFN widths), or train "
        "longer (--epochs)."
    )
    filled = _projection_notice(_run_for_notice(150.0, 300.0), info | {"added": 2})
    assert filled is not None and "added 2 level(s)" in filled


def test_outputs(searched):
    program, result = searched["60%"]
    files = sorted(os.listdir(result.out_dir))
    assert files == ["digits_tiny.frozen.vit", "metrics.jsonl", "report.png", "search.ckpt"]
    head = provenance(compile_file(result.frozen_path).spec)
    for key in (
        "source",
        "strategy",
        "budget",
        "flops_paper",
        "flops_exact",
        "params",
        "seed",
        "date",
        "epochs",
    ):
        assert key in head, key
    assert head["strategy"] == "spvit" and head["budget"] == "flops <= 60%"
    value = head["flops_paper"]
    assert (
        value[-1] in "KMGT" and 1 <= float(value[:-1]) < 1000
    )  # the prefix that reads best: 5.6M, not 0.0056G
    assert float(value[:-1]) * SCALE[value[-1]] == pytest.approx(result.costs["flops_paper"], rel=1e-5)
    # checkpoint: safetensors (the header is JSON, no pickle), with every part of the state
    with open(result.checkpoint_path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        json.loads(fh.read(size))
    with safe_open(result.checkpoint_path, framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    for prefix in (
        "net/",
        "strategy/gates.",
        "opt/weights/",
        "opt/gates/",
        "rng/torch",
        "rng/gates",
        "kept/blocks.",
    ):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert meta["spvit_dsl.spec"] == program.source  # the checkpoint is self-contained
    state = json.loads(meta["spvit_dsl.state"])
    assert state["step"] == 3 and state["finished"] is True and state["strategy_state"]["plan_epochs"] == 6
    records = [json.loads(line) for line in open(result.metrics_path, encoding="utf-8")]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"loss", "acc", "cost", "ratio", "strategy"} <= set(r) and r["cost"]["flops"] > 0
    with open(result.report_path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_search_with_budget_above_dense_warns_and_runs(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "search",
            SPEC,
            "--budget",
            "150%",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "at or above the dense" in res.output
    assert "frozen spec" in res.output and "searched architecture" in res.output
    frozen = compile_file(str(out / "digits_tiny.frozen.vit"))
    assert frozen.decisions == 0


def test_init_checkpoint_starts_from_dense_weights(tmp_path):
    from safetensors.torch import save_file

    from spvit_dsl.supernet._timm import create_backbone

    program = compile_file(SPEC)
    torch.manual_seed(123)
    dense = create_backbone(program.space.geometry, "none")
    path = str(tmp_path / "dense.safetensors")
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, path)
    res = run_search(
        program,
        steps=1,
        batch_size=8,
        device="cpu",
        out=str(tmp_path / "o"),
        quiet=True,
        init_checkpoint=path,
    )
    with safe_open(res.checkpoint_path, framework="pt") as f:
        searched = f.get_tensor("net/model.patch_embed.proj.weight")
    start = dense.state_dict()["patch_embed.proj.weight"]
    # one AdamW step at lr 1e-3 moves each weight by about 1e-3; a fresh random init would differ by ~0.1
    assert (searched - start).abs().max() < 5e-3
    with pytest.raises(Exception, match="checkpoint not found"):
        run_search(
            program,
            steps=1,
            device="cpu",
            out=str(tmp_path / "p"),
            quiet=True,
            init_checkpoint=str(tmp_path / "missing.pth"),
        )


@pytest.mark.parametrize(
    ("flag", "want"),
    [
        ("50%", ("flops", 0.5, True)),
        ("70%params", ("params", 0.7, True)),
        ("3.3G", ("flops", 3.3e9, False)),
        ("3.3GFLOPs", ("flops", 3.3e9, False)),
        ("16Mparams", ("params", 16e6, False)),
    ],
)
def test_budget_flags_read_their_unit(flag, want):
    limit = parse_budget_flag(flag)
    assert (limit.metric, limit.value, limit.relative) == pytest.approx(want)
    # the text is what a spec would write after `metric <=`, so a frozen spec can quote it and compile again
    program = compile_text(
        f"backbone deit_tiny_patch16_224 {{ }}\nblocks all {{ ffn: per neuron }}\n"
        f"budget {{ {limit.metric} <= {limit.text} }}\n",
        "flag.vit",
    )
    assert program.budgets[0].metric == limit.metric


@pytest.mark.parametrize("flag", ["6 ms", " 6ms ", "6\tms"])
def test_a_space_between_number_and_unit_is_read_and_written_back_without_it(flag):
    """`--budget "6 ms"`: the limit's text is quoted into the frozen spec, where `latency <= 6 ms` would not parse
    (the search would fail after its training)."""
    limit = parse_budget_flag(flag)
    assert (limit.metric, limit.value, limit.text) == ("latency", 6.0, "6ms")
    assert parse_budget_flag("70 %params").text == "70%" and parse_budget_flag("3.3 GFLOPs").text == "3.3G"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("50", "has no unit; write e.g. 50%"),
        ("50", "50ms"),
        ("fifty%", "cannot read"),
        ("-3ms", "must be positive"),
        ("-50%", "must be positive"),
    ],
)
def test_budget_flags_without_a_readable_unit_are_refused(flag, message):
    from spvit_dsl.space.units import UnitError

    with pytest.raises(UnitError, match=message):
        parse_budget_flag(flag)
