"""The joint choice `heads x head_dim: H x D` (parse, check, override rules, errors, emit, graph, CLI) and the default
grids the checker fills for `search ofb` (tiny ViT, tiny Swin, declared dimensions kept, other strategies and frozen
specs untouched), with properties of the grids for random dense sizes."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from spvit_dsl.cli import app
from spvit_dsl.compile.check import check
from spvit_dsl.compile.freeze import arch_of, freeze
from spvit_dsl.compile.graph import to_dot
from spvit_dsl.compile.program import Program, compile_text
from spvit_dsl.lang import ast
from spvit_dsl.lang.emit import emit
from spvit_dsl.lang.errors import SpecError
from spvit_dsl.lang.parse import parse
from spvit_dsl.space import defaults

# the demo's tiny ViT (examples/digits_tiny.vit): D = 96, H = 3, d = 32, h = 384, six blocks
VIT = """backbone vit_tiny_patch16_224 {
  weights = none
  image = 32
  patch = 8
  channels = 1
  classes = 10
  embed_dim = 96
  depth = 6
  heads = 3
}
"""
# a tiny Swin (examples/dimap_swin_digits.vit): stage widths 16, 32, 64; heads 1, 2, 4 (per-head width 16)
SWIN = """backbone swin_tiny_patch4_window7_224 {
  weights = none
  image = 32
  patch = 4
  channels = 1
  classes = 10
  embed_dim = 16
  depth = (2, 2, 2)
  heads = (1, 2, 4)
  window = 4
}
"""
VIT_LINES = VIT.count("\n")  # the first line after the backbone is VIT_LINES + 1


def compiled(text: str, path: str = "t.vit") -> Program:
    return compile_text(text, path)


def error(text: str, path: str = "t.vit") -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_text(text, path)
    return info.value


def at(exc: SpecError) -> tuple[int, int]:
    """(line, column) of the rendered error, read from its first line ``t.vit:LINE:COL: error: ...``."""
    m = re.match(r"t\.vit:(\d+):(\d+): error: ", exc.render())
    assert m is not None, exc.render()
    return int(m.group(1)), int(m.group(2))


def shapes(p: Program) -> list[tuple[tuple[int, ...], tuple[int, ...], bool]]:
    return [(pl.heads, pl.head_dim, pl.joint) for pl in p.space.plans]


# ---------------------------------------------------------------- the joint choice: parse and check
@pytest.mark.parametrize("sign", ["x", "×"])
def test_joint_declaration_gives_both_candidate_sets_and_the_joint_flag(sign: str) -> None:
    p = compiled(VIT + f"blocks all {{ heads {sign} head_dim: {{2, 3}} {sign} 8..32 step 8 }}\n")
    assert shapes(p) == [((2, 3), (8, 16, 24, 32), True)] * 6
    choice = (
        parse(VIT + f"blocks all {{ heads {sign} head_dim: {{2, 3}} {sign} 8..32 step 8 }}")
        .items[1]
        .choices[0]
    )
    assert (choice.field, choice.joint.value, choice.label) == ("heads", "head_dim", "heads x head_dim")
    assert isinstance(choice.value, ast.Pair)
    # both unit groups stay separate groups, each with its own candidates
    kinds = {(d.path, d.choices) for d in p.graph.decisions() if d.block == 0}
    assert kinds == {("blocks.0.heads", (2, 3)), ("blocks.0.head_dim", (8, 16, 24, 32))}


@pytest.mark.parametrize(
    ("rhs", "heads", "head_dim"),
    [
        ("one of {1, 3} x {16, 32}", (1, 3), (16, 32)),
        ("2 x 16", (2,), (16,)),
        ("1..3 x 8..32 step 12", (1, 2, 3), (8, 20, 32)),
        ("{3, 1} × one of {32, 16}", (1, 3), (16, 32)),
    ],
)
def test_each_side_takes_every_numset_form(
    rhs: str, heads: tuple[int, ...], head_dim: tuple[int, ...]
) -> None:
    p = compiled(VIT + f"blocks 1..2 {{ heads x head_dim: {rhs} }}\n")
    assert shapes(p)[1] == shapes(p)[2] == (heads, head_dim, True)
    assert shapes(p)[0] == ((3,), (32,), False)  # undeclared blocks keep the dense shape, not joint


def test_separate_declarations_are_not_joint() -> None:
    p = compiled(VIT + "blocks all { heads: {2, 3}; head_dim: 8..32 step 8 }\n")
    assert shapes(p) == [((2, 3), (8, 16, 24, 32), False)] * 6
    assert not any(d["joint"] for _, d in p.graph.graph.nodes(data=True) if d.get("kind") == "attention")


def test_a_later_plain_field_replaces_its_side_and_clears_the_joint_flag() -> None:
    p = compiled(
        VIT
        + "blocks all { heads x head_dim: {2, 3} x {16, 32} }\n"
        + "block 1 { heads: 1 }\n"
        + "blocks 3..4 { head_dim: 8 }\n"
    )
    s = shapes(p)
    assert s[0] == s[2] == s[5] == ((2, 3), (16, 32), True)
    assert s[1] == ((1,), (16, 32), False)  # heads replaced, head_dim kept, no longer joint
    assert s[3] == s[4] == ((2, 3), (8,), False)


def test_a_later_joint_declaration_overrides_both_sides() -> None:
    p = compiled(VIT + "blocks all { heads: 1; head_dim: 8 }\nblock 2 { heads x head_dim: 3 x {24, 32} }\n")
    s = shapes(p)
    assert s[2] == ((3,), (24, 32), True)
    assert s[0] == ((1,), (8,), False)


def test_a_derived_spec_can_end_or_start_a_joint_choice() -> None:
    base = VIT + "blocks all { heads x head_dim: {2, 3} x {16, 32} }\n"
    files = {"base.vit": base}
    loader = files.__getitem__
    derived = 'extends "base.vit"\nblocks all { head_dim: 32 }\n'
    spec = parse(derived, "d.vit")
    s = [(p.heads, p.head_dim, p.joint) for p in check(spec, loader=loader).space.plans]
    assert s == [((2, 3), (32,), False)] * 6
    again = 'extends "base.vit"\nblocks all { heads x head_dim: 3 x 8 }\n'
    s = [(p.heads, p.head_dim, p.joint) for p in check(parse(again, "d.vit"), loader=loader).space.plans]
    assert s == [((3,), (8,), True)] * 6


def test_joint_on_swin_stage_selectors() -> None:
    p = compiled(
        SWIN
        + "stage 2 { heads x head_dim: {2, 4} x {8, 16} }\nstage 1 block 0 { heads x head_dim: 1 x 16 }\n"
    )
    s = shapes(p)
    assert s[4] == s[5] == ((2, 4), (8, 16), True)
    assert s[2] == ((1,), (16,), True)
    assert s[0] == s[1] == ((1,), (16,), False)  # stage 0: one head of width 16, undeclared
    assert s[3] == ((2,), (16,), False)


# ---------------------------------------------------------------- errors: located, never tracebacks
LINE = VIT_LINES + 1


@pytest.mark.parametrize(
    ("decl", "col", "message", "hint"),
    [
        (
            "heads x ffn: {2, 3} x 8",
            22,
            "'heads x ffn' cannot be searched jointly",
            "declare 'ffn' on its own",
        ),
        (
            "heads x head_dims: {2, 3} x 8",
            22,
            "the one joint choice is 'heads x head_dim'",
            "did you mean 'head_dim'",
        ),
        (
            "hedas x head_dim: {2, 3} x 8",
            14,
            "'hedas x head_dim' cannot be searched jointly",
            "did you mean 'heads'",
        ),
        ("head_dim x heads: 8 x 2", 14, "write the joint choice as 'heads x head_dim'", "head counts"),
    ],
)
def test_wrong_pair_names_are_located(decl: str, col: int, message: str, hint: str) -> None:
    exc = error(VIT + f"blocks all {{ {decl} }}\n")
    assert at(exc) == (LINE, col)
    assert message in exc.message
    assert exc.hint is not None and hint in exc.hint
    assert "^" in exc.render()


@pytest.mark.parametrize(
    ("decl", "col", "message"),
    [
        ("heads x head_dim: {2, 4} x 8", 32, "heads 4 is outside 1..3 (the dense count of block 0)"),
        ("heads x head_dim: 2 x 8..40 step 8", 36, "head_dim 40 is outside 1..32"),
        ("heads x head_dim: 0 x 8", 32, "heads 0 is outside 1..3"),
        ("heads x head_dim: 2 x 0.5", 36, "head_dim must be whole numbers, found '0.5'"),
        ("heads x head_dim: 2 x 3..1", 36, "empty range 3..1"),
        ("heads x head_dim: 2G x 8", 32, "unexpected unit 'G'"),
    ],
)
def test_out_of_range_values_get_the_separate_fields_checks(decl: str, col: int, message: str) -> None:
    exc = error(VIT + f"blocks all {{ {decl} }}\n")
    assert at(exc) == (LINE, col)
    assert message in exc.message


def test_the_same_range_error_as_the_separate_field() -> None:
    joint = error(VIT + "blocks all { heads x head_dim: {2, 4} x 8 }\n")
    plain = error(VIT + "blocks all { heads: {2, 4} }\n")
    assert joint.message == plain.message


@pytest.mark.parametrize(
    ("decl", "col", "message"),
    [
        ("heads x head_dim: {2, 3}", 39, "a joint choice takes two number sets"),  # right side missing
        ("heads x head_dim: 2x16", 33, "a joint choice takes two number sets"),  # glued: `x16` is a name
        ("heads x head_dim: ratios 2 x 3", 32, "unexpected 'ratios'"),
        ("heads: {2, 3} x 16", 28, "only a joint choice multiplies two number sets"),
        ("heads x head_dim: {2, 3} x", 41, "unexpected '}'"),
    ],
)
def test_malformed_right_sides_are_located_parse_errors(decl: str, col: int, message: str) -> None:
    exc = error(VIT + f"blocks all {{ {decl} }}\n")
    assert at(exc) == (LINE, col)
    assert message in exc.message


def test_a_field_named_twice_through_a_joint_choice() -> None:
    exc = error(VIT + "blocks all { heads x head_dim: 2 x 16; head_dim: 8 }\n")
    assert at(exc) == (LINE, 40)
    assert "'head_dim' is set twice in this declaration" in exc.message
    exc = error(VIT + "blocks all { heads x head_dim: 2 x 16 }\nblocks all { heads x head_dim: 3 x 8 }\n")
    assert at(exc) == (LINE + 1, 14)
    assert "'heads x head_dim' of these blocks is already declared at line" in exc.message


def test_a_missing_colon_still_reads_as_before() -> None:
    exc = error(VIT + "blocks all { attention one of {skip, msa} }\n")
    assert exc.message == "unexpected 'one'; expected ':'"


# ---------------------------------------------------------------- `x` stays an ordinary name elsewhere
def test_x_is_a_name_outside_joint_choices() -> None:
    spec = parse("backbone x { x = x }\nsearch spvit { data = x; seed = 1 }\nblocks all { x: 3 }\n")
    bb, search, scope = spec.items
    assert (
        bb.model == "x"
        and bb.settings[0].key == "x"
        and isinstance(bb.settings[0].value, ast.Name)
        and bb.settings[0].value.value == "x"
    )
    assert search.settings[0].value.value == "x"
    assert scope.choices[0].field == "x" and scope.choices[0].joint is None
    # the checker, not the parser, rejects names that are wrong where they stand
    assert "unknown op 'x'" in error(VIT + "blocks all { attention: one of {x, msa} }\n").message
    assert "unknown layer 'x'" in error(VIT + "blocks all { sparsity: {x: 0.5} }\n").message
    assert "unknown field 'x'" in error(VIT + "blocks all { x: 3 }\n").message
    # a number with a unit other than a lone x still lexes as one number
    assert "unexpected unit 'xy'" in error(VIT + "blocks all { heads: 2xy }\n").message


def test_existing_specs_parse_the_same() -> None:
    text = VIT + "blocks all { attention: one of {skip, msa}; ffn: ratios 1..4 step 0.5; heads: 1..3 }\n"
    p = compiled(text)
    assert shapes(p) == [((1, 2, 3), (32,), False)] * 6


# ---------------------------------------------------------------- emit and the graph
@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("heads x head_dim: {2, 3} x 8..32 step 8", "heads x head_dim: {2, 3} x 8..32 step 8"),
        ("heads × head_dim: one of {1, 3} × 16", "heads x head_dim: {1, 3} x 16"),
    ],
)
def test_emit_round_trips_the_joint_form(written: str, canonical: str) -> None:
    spec = parse(VIT + f"blocks all {{ {written}; ffn: ratio 2 }}\n")
    text = emit(spec)
    assert f"blocks all {{ {canonical}; ffn: ratio 2 }}" in text
    again = parse(text)
    assert ast.same(spec, again)
    assert emit(again) == text
    assert ast.Spec.model_validate_json(spec.model_dump_json()) == spec


def test_frozen_specs_state_heads_and_head_dim_separately() -> None:
    p = compiled(VIT + "blocks all { heads x head_dim: {2, 3} x {16, 32} }\n")
    arch = p.bounds().cheapest["flops"]
    text = emit(freeze(p.checked, arch, {"strategy": "ofb"}))
    assert "heads: 2; head_dim: 16" in text and "heads x head_dim" not in text
    frozen = compiled(text, "f.vit")
    assert frozen.decisions == 0 and arch_of(frozen.checked) == arch


def test_the_graph_marks_joint_attention_nodes() -> None:
    p = compiled(VIT + "blocks 0..1 { heads x head_dim: {2, 3} x {16, 32} }\nblocks 2..3 { heads: {2, 3} }\n")
    nodes = dict(p.graph.graph.nodes(data=True))
    assert [nodes[f"blocks.{i}.attention"]["joint"] for i in range(6)] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert nodes["blocks.0.attention"]["heads"] == [2, 3] and nodes["blocks.0.attention"]["head_dim"] == [
        16,
        32,
    ]
    dot = to_dot(p.graph.graph)
    assert dot.count("heads x head_dim: 4 pairs") == 2


def test_compile_lists_joint_blocks(tmp_path) -> None:
    path = tmp_path / "j.vit"
    path.write_text(
        VIT + "blocks 0..1 { heads x head_dim: {2, 3} x {16, 32} }\nblocks 2..3 { heads: {2, 3} }\n"
    )
    result = CliRunner().invoke(app, ["compile", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│")}
    assert "{2, 3} × {16, 32}" in rows["0"] and "{2, 3} × {16, 32}" in rows["1"]
    assert "{2, 3}; 32" in rows["2"] and "×" not in rows["2"]
    assert "3; 32" in rows["4"]
    assert "searched as one joint choice" in result.output


# ---------------------------------------------------------------- OFB's default grids
def half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def expect_embed(D: int) -> tuple[int, ...]:
    """⌈D/2⌉, ⌈D/2⌉ + s, ... up to D, and D; s = min(D/32, 12) floored, at least 1 (written without range())."""
    s = max(1, math.floor(min(Fraction(D, 32), Fraction(12))))
    out, w = [], math.ceil(Fraction(D, 2))
    while w <= D:
        out.append(w)
        w += s
    return tuple(out if out[-1] == D else [*out, D])


def expect_heads(H: int) -> tuple[int, ...]:
    return tuple(n for n in range(1, H + 1) if n % 2 == 0 or n == H)


def expect_eighths(n: int) -> tuple[int, ...]:
    """{n/4, n/4 + n/8, ..., n} rounded half up, at least 1."""
    return tuple(sorted({max(1, half_up(Fraction(n, 4) + k * Fraction(n, 8))) for k in range(7)}))


def test_ofb_defaults_on_the_tiny_vit() -> None:
    p = compiled(VIT + "search ofb { }\n")
    assert p.space.embed == (tuple(range(48, 97, 3)),) == (expect_embed(96),)
    for plan in p.space.plans:
        assert plan.heads == (2, 3) == expect_heads(3)
        assert plan.head_dim == (8, 12, 16, 20, 24, 28, 32) == expect_eighths(32)
        assert plan.joint
        assert plan.ffn.widths == tuple(range(96, 385, 48)) == expect_eighths(384)
        assert plan.attention == ("msa",)  # OFB does not search ops: no default there
    assert p.warnings == []
    # the defaults point at the strategy's name
    span = p.checked.origins["blocks.3.head_dim"]
    assert (span.line, span.column) == (VIT_LINES + 1, 8)
    assert p.checked.origins["embed"] == span == p.checked.origins["blocks.0.ffn"]


def test_ofb_defaults_on_a_tiny_swin() -> None:
    p = compiled(SWIN + "search ofb { }\n")
    g = p.space.geometry
    assert g.dims == (16, 32, 64)
    assert p.space.embed == (tuple(range(8, 17)), tuple(range(16, 33)), tuple(range(32, 65, 2)))
    assert p.space.embed == tuple(expect_embed(D) for D in g.dims)
    heads = {0: (1,), 1: (2,), 2: (2, 4)}
    for plan in p.space.plans:
        b = plan.geom
        assert plan.heads == heads[b.stage] == expect_heads(b.heads)
        assert plan.head_dim == (4, 6, 8, 10, 12, 14, 16) == expect_eighths(b.head_dim)
        assert plan.ffn.widths == expect_eighths(b.hidden)
        assert plan.joint
    assert p.space.plans[-1].ffn.widths == tuple(range(64, 257, 32))
    assert p.checked.origins["stages.2.embed"].line == SWIN.count("\n") + 1


def test_declared_dimensions_keep_their_declarations() -> None:
    p = compiled(
        VIT
        + "embed: 64..96 step 16\n"
        + "blocks all { ffn: ratios {1, 4} }\n"
        + "block 1 { heads: 3 }\n"  # fixed, and only heads: head_dim gets the default, not joint
        + "block 2 { head_dim: {16, 32} }\n"
        + "block 3 { heads x head_dim: 3 x 32 }\n"
        + "block 4 { ffn: per neuron }\n"
        + "search ofb { }\n"
    )
    s = p.space
    assert s.embed == ((64, 80, 96),)
    assert [pl.ffn.widths for pl in s.plans] == [(96, 384)] * 4 + [None] + [(96, 384)]
    grid = expect_eighths(32)
    assert shapes(p) == [
        ((2, 3), grid, True),
        ((3,), grid, False),
        ((2, 3), (16, 32), False),
        ((3,), (32,), True),
        ((2, 3), grid, True),
        ((2, 3), grid, True),
    ]
    search_line = VIT_LINES + 7
    assert p.checked.origins["blocks.1.head_dim"].line == search_line
    assert p.checked.origins["blocks.1.heads"].line == VIT_LINES + 3


def test_swin_stage_embed_declared_in_one_stage_only() -> None:
    p = compiled(SWIN + "stage 1 { embed: 32 }\nsearch ofb { }\n")
    assert p.space.embed == (expect_embed(16), (32,), expect_embed(64))


@pytest.mark.parametrize("strategy", ["spvit", "magnitude", "upvit", "dimap", "random"])
def test_other_strategies_get_no_defaults(strategy: str) -> None:
    p = compiled(VIT + f"blocks all {{ ffn: ratios {{2, 4}} }}\nsearch {strategy} {{ }}\n")
    assert p.space.embed == ((96,),)
    assert shapes(p) == [((3,), (32,), False)] * 6
    assert [pl.ffn.widths for pl in p.space.plans] == [(192, 384)] * 6


def test_the_effective_strategy_decides_after_extends() -> None:
    files = {"base.vit": VIT + "search ofb { epochs = 2 }\n", "spvit.vit": VIT + "search spvit { }\n"}
    loader = files.__getitem__
    derived = check(
        parse('extends "base.vit"\nblocks all { ffn: width 96 }\nsearch { epochs = 3 }\n', "d.vit"),
        loader=loader,
    )
    assert derived.search.strategy == "ofb"
    assert derived.space.embed == (expect_embed(96),)
    assert all(pl.ffn.widths == (96,) and pl.joint for pl in derived.space.plans)
    assert derived.origins["embed"].path == "base.vit"  # named in the base: its span is there
    switched = check(parse('extends "base.vit"\nsearch spvit { }\n', "d.vit"), loader=loader)
    assert switched.space.embed == ((96,),) and not any(pl.joint for pl in switched.space.plans)
    to_ofb = check(parse('extends "spvit.vit"\nsearch ofb { }\n', "d.vit"), loader=loader)
    assert to_ofb.space.embed == (expect_embed(96),)


def test_a_frozen_spec_of_an_ofb_search_is_exactly_its_point() -> None:
    p = compiled(VIT + "budget { flops <= 50% }\nsearch ofb { }\n")
    arch = p.bounds().cheapest["flops"]
    frozen = compiled(emit(freeze(p.checked, arch, {"strategy": "ofb"})), "f.vit")
    assert frozen.decisions == 0 and arch_of(frozen.checked) == arch
    # a hand-written frozen spec that still says `search ofb` and leaves dimensions unstated: no defaults
    text = 'frozen { strategy = "ofb" }\n' + VIT + "block 0 { heads: 2; head_dim: 16 }\nsearch ofb { }\n"
    hand = compiled(text, "h.vit")
    assert hand.decisions == 0 and hand.frozen
    point = arch_of(hand.checked)
    assert point.embed == (96,)
    assert (point.blocks[0].heads, point.blocks[0].head_dim) == (2, 16)
    assert all((b.heads, b.head_dim, b.ffn) == (3, 32, 384) for b in point.blocks[1:])


def test_compile_shows_the_filled_grids(tmp_path) -> None:
    path = tmp_path / "ofb.vit"
    path.write_text(VIT + "search ofb { }\n")
    result = CliRunner().invoke(app, ["compile", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "embedding widths: 48..96 step 3" in result.output
    assert result.output.count("{2, 3} × 8..32 step 4") == 6
    assert result.output.count("7 widths 96..384") == 6
    plain = CliRunner().invoke(app, ["compile", str(path), "--json"])
    assert '"decisions": 19' in plain.stdout  # embed + 6 × (heads, head_dim, ffn)


@pytest.mark.parametrize(
    ("decl", "kinds"),
    [
        ("blocks all { attention: one of {skip, msa} }", "attention"),
        ("blocks all { sparsity: 0..0.5 step 0.25 }", "sparsity"),
    ],
)
def test_ofb_warns_about_what_it_cannot_search(decl: str, kinds: str) -> None:
    p = compiled(VIT + decl + "\nsearch ofb { }\n")
    msgs = [w.message for w in p.warnings]
    assert any(f"strategy 'ofb' does not search {kinds}" in m for m in msgs), msgs
    from spvit_dsl.compile.program import unsearchable
    from spvit_dsl.compile.strategies import STRATEGIES

    assert unsearchable(STRATEGIES.get("ofb"), p.graph) == [kinds]
    clean = compiled(VIT + "search ofb { }\n")
    assert unsearchable(STRATEGIES.get("ofb"), clean.graph) == []


# ---------------------------------------------------------------- properties of the grids
@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8192))
def test_embed_grid_properties(D: int) -> None:
    grid = defaults.ofb_embed(D)
    step = max(1, min(D // 32, 12))
    assert list(grid) == sorted(set(grid))
    assert 1 <= grid[0] and grid[-1] == D and 2 * grid[0] >= D and 2 * (grid[0] - 1) < D
    gaps = [b - a for a, b in zip(grid, grid[1:], strict=False)]
    assert all(g == step for g in gaps[:-1]) and all(0 < g <= step for g in gaps[-1:])
    assert grid == expect_embed(D)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 128))
def test_heads_grid_properties(H: int) -> None:
    grid = defaults.ofb_heads(H)
    assert list(grid) == sorted(set(grid)) and grid[-1] == H and grid[0] >= 1
    assert all(n % 2 == 0 for n in grid[:-1])  # step 2 from 2, the dense count last
    assert all(b - a == 2 for a, b in zip(grid, grid[1:-1], strict=False))
    assert grid == expect_heads(H) and (H != 1 or grid == (1,)) and (H < 2 or grid[0] == 2)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20000))
def test_eighths_grid_properties(n: int) -> None:
    for grid in (defaults.ofb_head_dim(n), defaults.ofb_ffn(n)):
        assert list(grid) == sorted(set(grid)) and grid[0] >= 1 and grid[-1] == n
        assert len(grid) <= 7
        assert grid[0] == max(1, half_up(Fraction(n, 4)))
        # the documented step n/8: every candidate is within half a unit of n/4 + k·n/8
        assert all(
            any(abs(w - (Fraction(n, 4) + k * Fraction(n, 8))) <= Fraction(1, 2) for k in range(7))
            for w in grid
        )
        assert grid == expect_eighths(n)
        if n % 8 == 0:
            assert grid == tuple(range(n // 4, n + 1, n // 8))


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([1, 2, 3, 4, 6]), st.sampled_from([8, 16, 24]), st.sampled_from([1, 2, 4]))
def test_check_fills_the_grids_of_any_dense_shape(heads: int, head_dim: int, mlp: int) -> None:
    dim = heads * head_dim
    text = (
        f"backbone vit_tiny_patch16_224 {{ image = 32; patch = 8; channels = 1; classes = 10; embed_dim = {dim}; "
        f"depth = 2; heads = {heads}; mlp_ratio = {mlp} }}\nsearch ofb {{ }}\n"
    )
    p = compiled(text)
    assert p.space.embed == (expect_embed(dim),)
    for plan in p.space.plans:
        assert (plan.heads, plan.head_dim, plan.joint) == (
            expect_heads(heads),
            expect_eighths(head_dim),
            True,
        )
        assert plan.ffn.widths == expect_eighths(dim * mlp)
