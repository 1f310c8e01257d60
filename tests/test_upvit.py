"""The ``upvit`` strategy (UP-ViT: leave-one-out KL importance on a proxy set, batched ablations with per-sample
masks, regrouped heads): the batched score of every unit kind against removing the unit from a copy of the model,
regrouping properties, regrouped heads built exactly with the original softmax scale, the DeiT-B → DeiT-T target
cost, the uniform and the budgeted search end to end, resume, the errors a user can hit and ``groups``."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from _spaces import dense_twin
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Subset, TensorDataset

from spvit_dsl.compact.build import build, fold
from spvit_dsl.compile.freeze import arch_of
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.lang.errors import UsageError
from spvit_dsl.runtime.data import labels_of, load_data, per_class
from spvit_dsl.runtime.evaluate import evaluate
from spvit_dsl.search import run_search
from spvit_dsl.search.checkpoint import load_checkpoint
from spvit_dsl.search.loop import SearchInterrupted
from spvit_dsl.search.methods.upvit import UpvitStrategy, regroup
from spvit_dsl.search.protocol import Batch, SearchContext
from spvit_dsl.search.setup import resolve_settings
from spvit_dsl.supernet.lower import lower

SPECS = Path(__file__).resolve().parent.parent / "specs"
BACKBONE = (
    "backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; channels = 1; classes = 10; "
    "embed_dim = 16; depth = 2; heads = 4 }\n"
)  # 4 heads of 4 channels, FFN 64
TARGET = "embed: 12\nblocks all { heads: 2; head_dim: 3; ffn: width 40 }\n"  # UP-ViT's uniform target shape
RANGES = "embed: 8..16 step 4\nblocks all { heads: 1..4; head_dim: 2..4; ffn: per neuron }\nbudget { flops <= 50% }\n"
SETTINGS = "proxy_per_class = 1; batch_size = 5; units_per_pass = 24"  # 10 digits: 2 proxy batches of 5
SWIN = """backbone swin_tiny_patch4_window7_224 { weights = none; image = 32; patch = 2; channels = 1; classes = 10
  embed_dim = 16; depth = (2, 2); heads = (1, 2); window = 4 }
stage 0 { embed: 8 }
stage 1 { embed: 24 }
search upvit { proxy_per_class = 1; batch_size = 5 }
"""


def spec(space: str, search: str = SETTINGS) -> str:
    return BACKBONE + space + f"search upvit {{ {search} }}\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upvit")


@pytest.fixture(scope="module")
def init(folder: Path) -> str:
    """Dense weights larger than timm's init (std 0.02 gives near-uniform outputs, so every KL score would be ~0
    and the comparisons below vacuous)."""
    g = compile_text(spec(TARGET), str(folder / "init.vit")).space.geometry
    torch.manual_seed(0)
    sd = timm.create_model(g.model, pretrained=False, **g.kwargs()).state_dict()
    gen = torch.Generator().manual_seed(1)
    for v in sd.values():
        if v.is_floating_point():
            v.add_(torch.randn(v.shape, generator=gen) * (0.3 if v.dim() > 1 else 0.1))
    torch.save(sd, folder / "init.pth")
    return str(folder / "init.pth")


def _search(text: str, folder: Path, name: str, init: str):
    program = compile_text(text, str(folder / f"{name}.vit"))
    return program, run_search(
        program, out=str(folder / name), quiet=True, device="cpu", init_checkpoint=init
    )


@pytest.fixture(scope="module")
def uniform(folder: Path, init: str):
    return _search(spec(TARGET), folder, "uniform", init)


@pytest.fixture(scope="module")
def ranges(folder: Path, init: str):
    return _search(spec(RANGES), folder, "ranges", init)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _log_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(x).double(), dim=-1)


def _drop_attention_channel(model: torch.nn.Module, block: int, j: int) -> None:
    attn = model.blocks[block].attn
    rows = [j + t * attn.proj.in_features for t in range(3)]  # channel j of q, k and v
    attn.qkv.weight[rows] = 0
    attn.qkv.bias[rows] = 0
    attn.proj.weight[:, j] = 0


def _drop_neuron(model: torch.nn.Module, block: int, j: int) -> None:
    fc1 = model.blocks[block].mlp.fc1
    fc1.weight[j] = 0
    fc1.bias[j] = 0  # GELU(0) = 0: the neuron contributes nothing


# --- 1. the batched KL of a unit = the KL of a copy without that unit --------------------------------------------


@pytest.mark.parametrize("space", [RANGES, TARGET], ids=["ranges", "target"])
def test_batched_kl_equals_removing_the_unit_from_a_copy(init: str, folder: Path, space: str) -> None:
    # Access path: the strategy's own score() on one batch of 3 random images, through a hand-made SearchContext (no
    # data needed: score() is handed the batch), then its float64 score buffers. units_per_pass = 7 cuts every
    # group into uneven chunks. References, each a separate model: the dense timm twin with the unit zeroed
    # (attention channel: q, k, v rows and proj column; FFN neuron: fc1 row and bias); an embedding channel: the
    # compact network folded without it (its LayerNorms then normalise over the other 15 channels). The teacher is
    # the dense twin, also with the target space (whose fixed widths the teacher must not apply).
    program = compile_text(spec(space, "units_per_pass = 7"), str(folder / "kl.vit"))
    net = lower(program.space, weights=init).eval()
    dense = dense_twin(net).eval()
    settings_ = resolve_settings(program, {})
    strategy = UpvitStrategy(SearchContext(program, net, [], settings_, torch.device("cpu"), None))
    x = _images(3, 2)
    strategy.score(0, Batch(x, torch.zeros(3, dtype=torch.long)))
    scores = dict(strategy.scores.named_buffers())
    assert set(scores) == {"embed", "attn_0", "attn_1", "ffn_0", "ffn_1"}
    teacher = _log_probs(dense, x)

    def kl(model: torch.nn.Module) -> float:
        return float((teacher.exp() * (teacher - _log_probs(model, x))).sum())

    def without(edit, block: int, j: int) -> float:
        model = copy.deepcopy(dense)
        with torch.no_grad():
            edit(model, block, j)
        return kl(model)

    narrow = replace(program.space.dense(), embed=(15,))  # every other unit kept
    ref = {
        "embed": [
            kl(fold(net, narrow, {"embed": torch.tensor([c for c in range(16) if c != j])}).eval())
            for j in range(16)
        ]
    }
    for i in range(2):
        ref[f"attn_{i}"] = [without(_drop_attention_channel, i, j) for j in range(16)]
        ref[f"ffn_{i}"] = [without(_drop_neuron, i, j) for j in range(64)]
    for name, want in ref.items():
        got = scores[name]
        assert got.dtype == torch.float64 and float(got.max()) > 1e-3, name  # far above the tolerance
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5, msg=name)


def test_swiglu_neuron_scores_equal_removing_the_neuron_from_a_copy(tmp_path: Path) -> None:
    """timm's packed SwiGLU (DINOv2-g at width 24: fc1 128 rows, 64 neurons): the batched KL of FFN neuron j, whose
    per-sample mask covers both of its fc1 rows, is the KL of the dense twin with fc2's column j zeroed."""
    text = (
        BACKBONE.replace("vit_tiny_patch16_224", "vit_giant_patch14_dinov2").replace(
            "embed_dim = 16", "embed_dim = 24"
        )
        + "blocks all { ffn: per neuron }\nbudget { flops <= 80% }\n"
        + 'search upvit { units_per_pass = 7; groups = "ffn" }\n'
    )
    program = compile_text(text, str(tmp_path / "swiglu.vit"))
    assert program.space.geometry.blocks[0].ffn_glu and program.space.geometry.blocks[0].hidden == 64
    net = lower(program.space).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():  # larger than timm's init, so that the scores are far from 0
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))
    dense = dense_twin(net).eval()
    assert type(dense.blocks[0].mlp).__name__ == "GluMlp"
    strategy = UpvitStrategy(
        SearchContext(program, net, [], resolve_settings(program, {}), torch.device("cpu"), None)
    )
    x = _images(3, 2)
    strategy.score(0, Batch(x, torch.zeros(3, dtype=torch.long)))
    scores = dict(strategy.scores.named_buffers())
    teacher = _log_probs(dense, x)
    for i in range(2):
        want = []
        for j in range(64):
            model = copy.deepcopy(dense)
            with torch.no_grad():
                model.blocks[i].mlp.fc2.weight[:, j] = 0
            want.append(float((teacher.exp() * (teacher - _log_probs(model, x))).sum()))
        got = scores[f"ffn_{i}"]
        assert float(got.max()) > 1e-3
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5)


# --- 2. regrouping -------------------------------------------------------------------------------------------


@st.composite
def regroup_cases(draw):
    heads, head_dim = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    new_heads = draw(st.integers(1, heads))
    new_dim = draw(st.integers(1, (heads // new_heads) * head_dim))  # the smallest group's channels
    values = draw(st.lists(st.integers(-3, 3), min_size=heads * head_dim, max_size=heads * head_dim))
    return heads, new_heads, new_dim, torch.tensor(values, dtype=torch.float64)  # small ints: many ties


@settings(max_examples=150, deadline=None)
@given(case=regroup_cases())
def test_regroup_takes_the_top_channels_of_contiguous_head_groups(case) -> None:
    heads, new_heads, new_dim, scores = case
    head_dim = scores.numel() // heads
    out = regroup(scores, heads, new_heads, new_dim)
    assert out.shape == (new_heads, new_dim) and out.dtype == torch.int64
    assert torch.unique(out).numel() == out.numel()  # no channel twice
    # contiguous groups of original heads, as equal as possible (the larger ones first), in order
    sizes = [heads // new_heads + (g < heads % new_heads) for g in range(new_heads)]
    first = 0
    for row, size in zip(out, sizes, strict=True):
        group = torch.arange(first * head_dim, (first + size) * head_dim)
        first += size
        assert torch.equal(row, torch.sort(row).values) and bool(torch.isin(row, group).all())
        rest = group[~torch.isin(group, row)]
        if rest.numel():  # the new head's channels are the top new_dim scores of its group
            assert float(scores[row].min()) >= float(scores[rest].max())


def test_regroup_refuses_impossible_requests() -> None:
    scores = torch.arange(12, dtype=torch.float64)  # 3 heads of 4
    with pytest.raises(ValueError, match="regroup"):
        regroup(scores, 3, 4, 1)  # more new heads than heads
    with pytest.raises(ValueError, match="regroup"):
        regroup(scores, 3, 0, 1)
    with pytest.raises(ValueError, match="5 asked"):
        regroup(scores, 3, 2, 5)  # the second group is one head: 4 channels
    assert torch.equal(regroup(scores, 3, 1, 12), torch.arange(12)[None])


# --- 3./5. the uniform target shape: regrouped heads, top units, the built network ------------------------------


def test_uniform_search_keeps_the_target_shape_and_the_top_units(uniform) -> None:
    program, result = uniform
    arch = result.arch
    assert arch == program.space.largest() == arch_of(compile_file(result.frozen_path).checked)
    assert arch.embed == (12,) and all((b.heads, b.head_dim, b.ffn) == (2, 3, 40) for b in arch.blocks)
    assert result.info["proxy_images"] == 10  # one image of each digit
    ckpt = load_checkpoint(result.checkpoint_path)
    scores = ckpt.strategy
    assert set(scores) == {"embed", "attn_0", "attn_1", "ffn_0", "ffn_1"}
    assert ckpt.kept.keys() == result.kept.keys()
    assert all(torch.equal(ckpt.kept[k], result.kept[k]) for k in ckpt.kept)
    for path, name in (("embed", "embed"), ("blocks.0.ffn", "ffn_0"), ("blocks.1.ffn", "ffn_1")):
        kept, s = result.kept[path], scores[name]
        assert float(s.max()) > float(s.min()), name  # the scores do rank the units
        assert torch.equal(kept, torch.sort(kept).values) and torch.unique(kept).numel() == kept.numel()
        dropped = torch.ones(s.numel(), dtype=torch.bool)
        dropped[kept] = False
        assert float(s[kept].min()) >= float(s[dropped].max()), name
    for i in range(2):  # one (heads, head_dim) index per block: regrouped from the attention-channel scores
        assert f"blocks.{i}.heads" not in result.kept
        assert torch.equal(result.kept[f"blocks.{i}.head_dim"], regroup(scores[f"attn_{i}"], 4, 2, 3))


def test_regrouped_build_equals_the_masked_supernet_with_the_dense_scale(uniform, init: str) -> None:
    program, result = uniform
    net = lower(program.space, weights=init).eval()
    x = _images(4, 3)
    with torch.no_grad():
        dense_logits = net(x)
        net.set_arch(result.arch, result.kept)
        want = net(x)
        net.reset()
        built = build(result.frozen_path, weights=result.checkpoint_path).eval()
        folded = fold(net, result.arch, result.kept).eval()
        for model in (built, folded):
            torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
    assert (want - dense_logits).abs().max() > 1e-3  # pruning changed the network: a comparison that can fail
    for block in built.blocks:
        attn = block.attn
        assert (attn.num_heads, attn.head_dim) == (2, 3)
        assert attn.scale == pytest.approx(4**-0.5)  # the original head_dim (4), not 1/sqrt(3)
        assert tuple(attn.qkv.weight.shape) == (18, 12) and tuple(attn.proj.weight.shape) == (12, 6)
    # block 0's attention by hand from the dense weights: new head h = channels C[h] of q, k and v, scale 1/2
    sd, e, C = torch.load(init, weights_only=True), result.kept["embed"], result.kept["blocks.0.head_dim"]
    w, b = sd["blocks.0.attn.qkv.weight"][:, e], sd["blocks.0.attn.qkv.bias"]
    t = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(4))
    q, k, v = (
        t[:, None] @ w[C + 16 * s].transpose(-1, -2) + b[C + 16 * s][:, None] for s in range(3)
    )  # B,H,N,d
    z = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
    proj = sd["blocks.0.attn.proj.weight"][e][:, C.flatten()]
    manual = z.transpose(1, 2).flatten(2) @ proj.T + sd["blocks.0.attn.proj.bias"][e]
    with torch.no_grad():
        torch.testing.assert_close(built.blocks[0].attn(t), manual, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="repeat"):
        net.set_arch(result.arch, {"blocks.0.head_dim": torch.tensor([[0, 0, 1], [8, 9, 10]])})


def test_the_built_network_evaluates_like_the_masked_supernet(uniform, init: str) -> None:
    program, result = uniform
    built = build(result.frozen_path, weights=result.checkpoint_path)
    data = load_data("digits", built.spvit_geometry)
    got = evaluate(built, data.val, batch_size=256)
    net = lower(program.space, weights=init)
    net.set_arch(result.arch, result.kept)
    want = evaluate(net, data.val, batch_size=256)
    assert got.images == want.images == len(data.val) > 0
    assert abs(got.top1 - want.top1) <= 100 / len(data.val) and 0 <= got.top1 <= 100  # at most one near-tie
    assert got.loss == pytest.approx(want.loss, abs=1e-4) and math.isfinite(got.loss)


# --- 4. DeiT-B pruned to DeiT-T's shape ----------------------------------------------------------------------


def _deit_b_to_t(tmp_path: Path, search: str) -> str:
    path = tmp_path / "deit_b_to_t.vit"
    path.write_text(
        f'extends "{SPECS / "deit_b.vit"}"\nembed: 192\n'
        f"blocks all {{ attention: msa; heads: 3; head_dim: 64; ffn: width 768 }}\n{search}"
    )
    return str(path)


def test_deit_b_with_deit_t_shape_costs_deit_t(tmp_path: Path) -> None:
    program = compile_file(_deit_b_to_t(tmp_path, ""))  # no weights are loaded to compile
    assert program.space.geometry.model == "deit_base_patch16_224" and not program.graph.decisions()
    cost = program.graph.cost(program.space.largest(), "exact")
    tiny = compile_file(str(SPECS / "deit_ti.vit"))
    dense_t = tiny.graph.cost(tiny.space.dense(), "exact")
    assert (cost.macs, cost.params) == (dense_t.macs, dense_t.params)
    assert cost.macs == pytest.approx(1.258e9, rel=5e-3)


def test_a_derived_spec_can_switch_to_upvit(tmp_path: Path) -> None:
    program = compile_file(_deit_b_to_t(tmp_path, "search upvit { proxy_per_class = 2 }\n"))
    assert program.checked.search.strategy == "upvit"


# --- 5. ranges under a budget ----------------------------------------------------------------------------------


def test_ranges_meet_the_budget_and_build_exactly(ranges, init: str) -> None:
    program, result = ranges
    arch = arch_of(compile_file(result.frozen_path).checked)
    assert arch == result.arch != program.space.largest()
    (budget,) = program.budgets
    macs = program.graph.cost(arch, program.convention).macs  # priced independently, from the frozen file
    assert 0.99 * budget.absolute <= macs <= budget.absolute
    for i, b in enumerate(arch.blocks):
        if (b.heads, b.head_dim) != (4, 4):
            assert tuple(result.kept[f"blocks.{i}.head_dim"].shape) == (b.heads, b.head_dim)
    net = lower(program.space, weights=init).eval()
    x = _images(4, 5)
    with torch.no_grad():
        net.set_arch(result.arch, result.kept)
        want = net(x)
        net.reset()
        built = build(result.frozen_path, weights=result.checkpoint_path).eval()
        torch.testing.assert_close(built(x), want, rtol=0, atol=1e-5)


def test_ranges_give_no_advice_to_train_longer(ranges) -> None:
    assert "--epochs" not in str(ranges[1].info.get("notice", ""))


# --- 6. resume -------------------------------------------------------------------------------------------------


def test_resume_after_the_first_proxy_batch_gives_the_same_scores(uniform, init: str, tmp_path: Path) -> None:
    program, reference = uniform
    out, seen = str(tmp_path / "run"), []

    def stop(info) -> None:
        seen.append(info.step)
        raise KeyboardInterrupt

    with pytest.raises(SearchInterrupted, match="checkpoint saved"):
        run_search(program, out=out, quiet=True, device="cpu", init_checkpoint=init, callback=stop)
    assert seen == [1]
    final = load_checkpoint(reference.checkpoint_path).strategy
    partial = load_checkpoint(str(tmp_path / "run" / "search.ckpt")).strategy
    for name, s in final.items():  # the first batch was scored and saved, the second not yet
        assert float(partial[name].sum()) > 0 and not torch.equal(partial[name], s), name
    resumed = run_search(program, out=out, quiet=True, device="cpu", init_checkpoint=init, resume=True)
    scores = load_checkpoint(resumed.checkpoint_path).strategy
    assert scores.keys() == final.keys() and all(torch.equal(scores[k], final[k]) for k in final)

    def undated(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.strip().startswith("date =")]

    assert undated(resumed.frozen_text) == undated(reference.frozen_text)
    assert resumed.kept.keys() == reference.kept.keys()
    assert all(torch.equal(resumed.kept[k], reference.kept[k]) for k in reference.kept)


# --- 7. errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        (spec(TARGET, SETTINGS + '; groups = "bogus"'), ("groups", "bogus", "embed, attention, ffn")),
        (spec("blocks all { heads: 4; ffn: width 64 }\n"), ("nothing to search",)),  # keeps everything
        (spec("embed: 12\n", SETTINGS + '; groups = "attention"'), ("nothing to score",)),
        (SWIN, ("Swin", "embedding")),
    ],
    ids=["bogus-groups", "keeps-everything", "nothing-scored", "swin-embed"],
)
def test_errors_are_one_line_usage_errors(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    program = compile_text(text, str(tmp_path / "e.vit"))
    with pytest.raises(UsageError) as info:
        run_search(program, out=str(tmp_path / "run"), quiet=True, device="cpu")
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


# --- 8. groups = "ffn" -------------------------------------------------------------------------------------------


def test_groups_ffn_leaves_embed_and_attention_to_l1_with_a_notice(folder: Path, init: str) -> None:
    program, result = _search(spec(TARGET, SETTINGS + '; groups = "ffn"'), folder, "ffn", init)
    notice = result.info["notice"]
    assert "\n" not in notice and all(w in notice for w in ("embed", "attention", "L1")), notice
    scores = load_checkpoint(result.checkpoint_path).strategy
    assert set(scores) == {"ffn_0", "ffn_1"}
    net = lower(program.space, weights=init)
    assert torch.equal(result.kept["embed"], net.top_units("embed", 12))
    for i in range(2):  # the original heads, not regrouped: heads and per-head channels by L1
        assert torch.equal(result.kept[f"blocks.{i}.heads"], net.top_units(f"blocks.{i}.heads", 2))
        assert torch.equal(result.kept[f"blocks.{i}.head_dim"], net.top_units(f"blocks.{i}.head_dim", 3))
        kept, s = result.kept[f"blocks.{i}.ffn"], scores[f"ffn_{i}"]
        assert float(s[kept].min()) >= float(s[~torch.isin(torch.arange(64), kept)].max())


def test_the_groups_notice_is_shown_and_survives_a_budget(
    folder: Path, init: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _program, result = _search(spec(RANGES, SETTINGS + '; groups = "ffn"'), folder, "ffn_ranges", init)
    notice = result.info["notice"]  # the projection may add its own line: the strategy's stays
    assert "\n" not in notice and "L1" in notice and "L1" in capsys.readouterr().err  # shown even when quiet


# --- the proxy set ---------------------------------------------------------------------------------------------


def test_proxy_set_takes_k_images_of_every_class() -> None:
    labels = [0, 1, 1, 2, 2, 2, 0, 1, 2, 3]
    picked = per_class(labels, 2, seed=3)
    assert picked == sorted(picked) == per_class(labels, 2, seed=3)
    assert sorted(labels[i] for i in picked) == [0, 0, 1, 1, 2, 2, 3]  # class 3 has one image
    assert per_class(labels, 5, seed=0) == list(range(len(labels)))
    data = TensorDataset(torch.zeros(len(labels), 1), torch.tensor(labels))
    assert labels_of(data) == labels and labels_of(Subset(data, [3, 1])) == [2, 1]
