"""Laws of the front end: parse(emit(spec)) == spec, JSON round trips, frozen specs have no decisions, and
malformed input never raises anything but SpecError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spvit_dsl.compile.freeze import arch_of, freeze, provenance
from spvit_dsl.compile.program import compile_file, compile_text
from spvit_dsl.lang import ast
from spvit_dsl.lang.emit import emit
from spvit_dsl.lang.errors import SpecError, SpvitError
from spvit_dsl.lang.parse import parse

ROOT = Path(__file__).parent.parent
SPECS = sorted(
    [*ROOT.glob("specs/*.vit"), *ROOT.glob("examples/*.vit"), *(ROOT / "tests/data/valid").glob("*.vit")]
)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_emit_parse_round_trip(path: Path) -> None:
    spec = parse(path.read_text(), str(path))
    text = emit(spec)
    again = parse(text, str(path))
    assert ast.same(spec, again)
    assert emit(again) == text  # formatting is idempotent


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_json_round_trip(path: Path) -> None:
    spec = parse(path.read_text(), str(path))
    assert ast.Spec.model_validate_json(spec.model_dump_json()) == spec


def test_shipped_specs_are_formatted() -> None:
    for path in [*ROOT.glob("specs/*.vit"), *ROOT.glob("examples/*.vit")]:
        assert emit(parse(path.read_text(), str(path))) == path.read_text(), f"run: spvit-dsl fmt {path}"


def test_comments_survive_formatting() -> None:
    text = "// head\nbackbone deit_tiny_patch16_224 { }  // tail\nblocks all {\n  // inner\n  attention: msa\n}\n// end\n"
    out = emit(parse(text))
    for c in ("// head", "// tail", "// inner", "// end"):
        assert c in out


def test_ranges_are_inclusive_and_exact() -> None:
    p = compile_text("backbone deit_tiny_patch16_224 { }\nblocks 2..4 { ffn: ratios 0.1..0.3 step 0.1 }")
    widths = {round(0.1 * 192), round(0.2 * 192), round(0.3 * 192)}
    for plan in p.space.plans:
        expect = tuple(sorted(widths)) if 2 <= plan.geom.index <= 4 else (768,)
        assert plan.ffn.candidates(plan.geom.hidden) == expect


def test_later_declarations_override_field_by_field() -> None:
    p = compile_text(
        "backbone deit_tiny_patch16_224 { }\n"
        "blocks all { attention: one of {skip, msa}; ffn: ratios {1, 2} }\n"
        "block 3 { attention: conv1x1 }\n"
    )
    assert p.space.plans[3].attention == ("conv1x1",)
    assert p.space.plans[3].ffn.widths == (192, 384)  # untouched field keeps the earlier value
    assert p.space.plans[2].attention == ("skip", "msa")


def test_broader_later_declaration_warns() -> None:
    p = compile_text(
        "backbone deit_tiny_patch16_224 { }\nblock 3 { attention: msa }\nblocks all { attention: one of {skip, msa} }\n"
    )
    assert any("overrides the more specific declaration at line 2" in w.message for w in p.warnings)


def test_freeze_gives_a_spec_with_zero_decisions() -> None:
    p = compile_file(str(ROOT / "tests/data/valid/overrides.vit"))
    arch = p.graph.bounds("paper").cheapest["flops"]
    text = emit(freeze(p.checked, arch, {"source": "overrides.vit", "seed": 3}))
    frozen = compile_text(text, "frozen.vit")
    assert frozen.frozen and frozen.decisions == 0
    assert arch_of(frozen.checked) == arch
    assert frozen.graph.cost(arch, "paper") == p.graph.cost(arch, "paper")
    assert provenance(frozen.spec)["seed"] == "3"


def test_frozen_swin_uses_stage_selectors() -> None:
    p = compile_file(str(ROOT / "tests/data/valid/swin_stages.vit"))
    arch = p.graph.bounds("exact").cheapest["params"]
    text = emit(freeze(p.checked, arch, {}))
    assert "stage 3 block 1 {" in text
    assert arch_of(compile_text(text).checked) == arch


def test_cost_queries_do_not_import_torch() -> None:
    code = (
        "import sys; from spvit_dsl.compile.program import compile_file; "
        f"p = compile_file({str(ROOT / 'specs/swin_b.vit')!r}); p.bounds(); p.summary(); "
        "import spvit_dsl.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grammar_loads_from_the_installed_package() -> None:
    code = (
        "import importlib.resources as r, spvit_dsl.lang.parse as p; "
        "assert r.files('spvit_dsl.lang').joinpath('vit.lark').is_file(); "
        "print(p.grammar().options.parser)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "lalr"


# ---------------------------------------------------------------- fuzzing
VALID_TEXTS = [p.read_text() for p in SPECS if "extends" not in p.read_text()]
TOKENS = [
    "{",
    "}",
    ";",
    ":",
    "..",
    "=",
    "<=",
    "one of",
    "step",
    "0",
    "12",
    "3.3G",
    "70%",
    "msa",
    "skip",
    "ffn",
    "attention",
    "blocks",
    "block",
    "stage",
    "budget",
    "search",
    "ratios",
    "width",
    "per neuron",
    '"x"',
    "(",
    ")",
    ",",
    "all",
    "heads",
    "head_dim",
    "x",
    "×",
    "groups of",
    "frozen",
    "embed",
    "backbone",
    "\n",
    "//c\n",
    "-1",
    "1e400",
    "#",
]


def _compile_or_spec_error(text: str) -> None:
    try:
        compile_text(text, "fuzz.vit", loader=lambda p: (_ for _ in ()).throw(FileNotFoundError(2, "no", p)))
    except SpvitError as exc:
        assert isinstance(exc, SpecError), type(exc)
        rendered = exc.render()
        assert rendered.startswith("fuzz.vit:") or rendered.startswith("error:")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_TEXTS), st.integers(0, 10_000), st.integers(0, 40), st.sampled_from(TOKENS))
def test_mutated_specs_raise_only_spec_errors(text: str, pos: int, cut: int, token: str) -> None:
    pos %= len(text) + 1
    _compile_or_spec_error(text[:pos] + token + text[pos + cut :])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30))
def test_token_soup_raises_only_spec_errors(tokens: list[str]) -> None:
    _compile_or_spec_error(" ".join(tokens))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_random_text_raises_only_spec_errors(text: str) -> None:
    _compile_or_spec_error(text)


@pytest.mark.parametrize(
    ("choice", "hint"),
    [("sparsity: 0..0.9", "0..0.9 step 0.1"), ("ffn: ratios 1..3.5", "1..3.5 step 0.1")],
)
def test_a_fractional_range_without_a_step_is_refused_not_truncated(choice: str, hint: str) -> None:
    """With the default step 1, `0..0.9` would mean {0}: a located error with a step to use instead."""
    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.lang.errors import SpecError

    text = f"backbone deit_tiny_patch16_224 {{ }}\nblocks all {{ {choice} }}\n"
    with pytest.raises(SpecError, match="needs a step") as info:
        compile_text(text, "r.vit")
    assert info.value.span is not None and info.value.span.line == 2 and hint in (info.value.hint or "")
    assert compile_text(text.replace("}\n", "}\n", 1).replace(choice, choice + " step 0.5"), "ok.vit")


@pytest.mark.parametrize(
    "line",
    [
        "stage 1e400 { attention: msa }",
        "block 1e309 { attention: msa }",
        "blocks 0.." + "9" * 400 + " { attention: msa }",
        "blocks all { heads: " + "9" * 400 + " }",
        "budget { flops <= 1e309G }",
    ],
)
def test_numbers_that_overflow_to_infinity_are_spec_errors(line: str) -> None:
    """A number too large for a float (400 digits, 1e309) anywhere an integer is expected is a located spec error,
    not an OverflowError from converting infinity to an integer (found by the mutation fuzzer)."""
    text = f"backbone vit_tiny_patch16_224 {{ }}\n{line}\n"
    with pytest.raises(SpecError) as err:
        compile_text(text, "huge.vit")
    assert err.value.span is not None and err.value.span.line == 2


def test_an_infinite_backbone_setting_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="image"):
        compile_text("backbone vit_tiny_patch16_224 { image = 1e309 }\n", "huge.vit")
