"""Frozen specs state every dimension: any point of a space that declares every dimension freezes to a spec that
compiles with zero decisions and gives back exactly that point and its cost (pure Python)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from spvit_dsl.compile.diff import diff
from spvit_dsl.compile.freeze import arch_of, freeze
from spvit_dsl.compile.program import compile_text
from spvit_dsl.lang.emit import emit
from spvit_dsl.space.cost import arch_cost
from spvit_dsl.space.plan import BlockArch, Density, FrozenArch

VIT = """backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; classes = 10; embed_dim = 48; depth = 3; heads = 3 }
embed: 8..48
blocks all { attention: one of {skip, conv1x1, conv3x3, msa}; heads: 1..3; head_dim: 1..16; ffn: per neuron;
             sparsity: 0..0.9 step 0.05 }
search magnitude { }
"""
SWIN = """backbone swin_tiny_patch4_window7_224 { image = 32; patch = 2; embed_dim = 16; depth = (2, 2); heads = (1, 2); window = 4; classes = 10 }
stage 0 { embed: 4..16 }
stage 1 { embed: 4..32 }
stage 1 { heads: one of {1, 2} }
blocks all { attention: one of {skip, conv3x3, msa}; head_dim: 1..16; ffn: per neuron;
             sparsity: {qkv: 0..0.5 step 0.25, fc2: 0..0.5 step 0.25} }
search random { }
"""


@st.composite
def points(draw, text: str):
    program = compile_text(text, "space.vit")
    space = program.space
    embed = tuple(draw(st.sampled_from(widths)) for widths in space.embed)
    blocks = []
    for p in space.plans:
        d = p.density
        density = Density(*(draw(st.sampled_from(v)) for v in (d.qkv, d.proj, d.fc1, d.fc2)))
        blocks.append(
            BlockArch(
                draw(st.sampled_from(p.attention)),
                draw(st.integers(0, p.geom.hidden)),
                draw(st.sampled_from(p.heads)),
                draw(st.sampled_from(p.head_dim)),
                density,
            )
        )
    return program, FrozenArch(tuple(blocks), embed).canonical()


@settings(max_examples=40, deadline=None)
@given(st.one_of(points(VIT), points(SWIN)))
def test_any_point_freezes_to_a_spec_that_gives_it_back(case):
    program, arch = case
    text = emit(freeze(program.checked, arch, {"source": "space.vit", "strategy": "test"}))
    frozen = compile_text(text, "frozen.vit")
    assert frozen.frozen and frozen.decisions == 0
    assert arch_of(frozen.checked) == arch
    g = program.space.geometry
    for convention in ("paper", "exact"):
        assert frozen.graph.cost(arch_of(frozen.checked), convention) == arch_cost(g, arch, convention)
    assert diff(program, frozen).member is True  # the frozen network is a point of its space


def test_a_sparse_density_round_trips_to_the_exact_kept_count():
    """Densities are kept/weights of the compact layer; the frozen text keeps enough digits to give the count back."""
    program = compile_text(VIT, "space.vit")
    g = program.space.geometry
    weights = 3 * (2 * 16) * 40  # qkv of a block at embed 40 with 2 heads of 16
    kept = 1231  # any count
    b = BlockArch("msa", 100, 2, 16, Density(qkv=kept / weights))
    arch = FrozenArch((b,) + program.space.largest().blocks[1:], (40,)).canonical()
    text = emit(freeze(program.checked, arch, {}))
    back = arch_of(compile_text(text, "frozen.vit").checked)
    assert round(back.blocks[0].density.qkv * weights) == kept
    assert arch_cost(g, back, "exact") == arch_cost(g, arch, "exact")


def test_another_convention_shows_a_frozen_specs_costs_but_checks_its_budget_in_its_own(tmp_path):
    """A frozen spec searched under `convention = paper` sits at its paper budget; `--convention exact` (which
    prices more: norms, biases, softmax) must not turn that into "budget not met", and an edit over the paper budget
    must still fail."""
    import re

    import pytest
    from _frozen import VIT_BACKBONE, pattern_arch, search_program

    from spvit_dsl.lang.errors import SpecError

    program = search_program(
        VIT_BACKBONE + "\nbudget { flops <= 90%; convention = paper }", tmp_path / "s.vit"
    )
    text = emit(
        freeze(program.checked, pattern_arch(program), {"source": "s.vit", "strategy": "test", "seed": 0})
    )
    paper = compile_text(text, "f.vit").bounds("paper").of("flops").min
    exact = compile_text(text, "f.vit", convention="exact").bounds("exact").of("flops").min
    assert exact > paper  # the case: met in paper, over the same limit in exact

    def at(limit: float) -> str:
        return re.sub(r"flops <= [^;}]+", f"flops <= {limit / 1e6:.6f}M", text)

    met = compile_text(at(paper), "f.vit", convention="exact")  # exactly at its paper budget
    (budget,) = met.budgets
    assert budget.checked_in == "paper" and budget.absolute == pytest.approx(
        exact
    )  # at the network's own ratio
    with pytest.raises(SpecError, match="is not met"):
        compile_text(at(paper * 0.99), "f.vit", convention="exact")
