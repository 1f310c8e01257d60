"""Every ```vit example in docs/ compiles; every ```console command shown in README.md names a real command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spvit_dsl.compile.program import compile_text

ROOT = Path(__file__).parent.parent
BLOCK = re.compile(r"```vit\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str]]:
    out = []
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        if doc.exists():
            for i, m in enumerate(BLOCK.finditer(doc.read_text())):
                out.append((f"{doc.name}#{i}", m.group(1)))
    return out


@pytest.mark.parametrize(("name", "text"), _examples(), ids=[n for n, _ in _examples()])
def test_doc_example_compiles(name: str, text: str) -> None:
    program = compile_text(text, str(ROOT / "docs" / "example.vit"))
    assert program.space.geometry.depth > 0


def test_language_reference_lists_every_op_and_setting() -> None:
    from spvit_dsl.compile.strategies import COMMON, STRATEGIES
    from spvit_dsl.space.ops import OPS

    doc = (ROOT / "docs/language.md").read_text()
    for name in OPS.names():
        assert f"`{name}`" in doc
    for name in [*COMMON, *STRATEGIES.get("spvit").params]:
        assert f"`{name}`" in doc, name


PYTHON = re.compile(r"```python\n(.*?)```", re.S)


def _python_examples() -> list[tuple[str, str]]:
    out = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for i, m in enumerate(PYTHON.finditer(doc.read_text())):
            out.append((f"{doc.name}#py{i}", m.group(1)))
    return out


@pytest.mark.parametrize(("name", "code"), _python_examples(), ids=[n for n, _ in _python_examples()])
def test_doc_python_example_runs(
    name: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, name, "exec"), {"__name__": "__doc_example__"})
