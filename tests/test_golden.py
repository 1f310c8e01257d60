"""Golden folders: tests/data/valid/<name>.vit beside <name>.expected.json (summary in both conventions,
decisions, warnings); tests/data/invalid/<name>.vit beside <name>.err (the exact rendered error).
Adding a case means adding a file; regenerate with ``pytest --regen-golden`` and read the diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spvit_dsl.compile.program import compile_file
from spvit_dsl.lang.errors import SpecError, SpvitError

DATA = Path(__file__).parent / "data"
VALID = sorted(p.name for p in (DATA / "valid").glob("*.vit") if not p.name.startswith("_"))
INVALID = sorted(p.name for p in (DATA / "invalid").glob("*.vit") if not p.name.startswith("_"))


def _golden(path: Path, actual: str, regen: bool) -> None:
    if regen or not path.exists():
        path.write_text(actual)
        if not regen:
            pytest.fail(f"golden file {path.name} was missing and has been written; review it")
    assert actual == path.read_text()


@pytest.mark.parametrize("name", VALID)
def test_valid(name: str, regen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA / "valid")
    paper = compile_file(name)
    exact = compile_file(name, convention="exact")
    expected = {
        "summary": paper.summary(),
        "exact": {k: exact.summary()[k] for k in ("flops", "params", "budgets")},
        "decisions": [[d.path, d.kind, len(d.choices)] for d in paper.graph.decisions()],
        "warnings": [w.render() for w in paper.warnings],
    }
    _golden(
        DATA / "valid" / name.replace(".vit", ".expected.json"), json.dumps(expected, indent=1) + "\n", regen
    )


@pytest.mark.parametrize("name", INVALID)
def test_invalid(name: str, regen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA / "invalid")
    with pytest.raises(SpvitError) as info:
        compile_file(name)
    exc = info.value
    rendered = exc.render() if isinstance(exc, SpecError) else f"error: {exc}"
    assert name in rendered or not isinstance(exc, SpecError)
    _golden(DATA / "invalid" / name.replace(".vit", ".err"), rendered + "\n", regen)


def test_every_invalid_error_points_at_its_file_with_a_caret() -> None:
    for name in INVALID:
        text = (DATA / "invalid" / name.replace(".vit", ".err")).read_text()
        first = text.splitlines()[0]
        assert first.split(":")[0].endswith(".vit"), (name, first)
        assert "^" in text, name
