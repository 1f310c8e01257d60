"""The pipeline is the folder tree: each stage package imports only itself and earlier stages, and the front end
(lang, space, compile) never imports torch — checked on every import statement of the package, lazy ones included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "spvit_dsl"
STAGES = ["lang", "space", "compile", "runtime", "supernet", "search", "compact", "train", "compare", "cli"]
FRONT_END = {"lang", "space", "compile"}
INFRASTRUCTURE = {"_io", "_registry"}  # importable from anywhere
# the deliberate exceptions: regenerating the shipped timm snapshot needs timm and torch (a developer command,
# python -m spvit_dsl.space._timm_snapshot; both import lazily, inside the functions)
TORCH_IN_FRONT_END = {
    ("space.backbones", "timm"),  # current_timm_names, for tests
    ("space._timm_snapshot", "timm"),
    ("space._timm_snapshot", "torch"),
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(name: str, path: Path) -> list[str]:
    """Absolute names of every module ``name`` imports (inside functions too), within and outside the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if name else []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append(node.module or "")
                continue
            base = here if is_pkg else here[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(["spvit_dsl", *base, *(node.module.split(".") if node.module else [])]).rstrip(
                "."
            )
            out.append(target)
            if node.module is None:  # from . import a, b: the names are modules
                out += [f"{target}.{alias.name}" for alias in node.names]
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "spvit_dsl" or len(parts) < 2:
        return None
    return parts[1]


@pytest.mark.parametrize(("name", "path"), _modules(), ids=[n or "spvit_dsl" for n, _ in _modules()])
def test_imports_flow_one_way(name: str, path: Path) -> None:
    own = name.split(".")[0] if name else ""
    if own not in STAGES:
        return  # the package root and the infrastructure modules
    for target in _imports(name, path):
        stage = _stage(target)
        if stage is None or stage in INFRASTRUCTURE:
            continue
        assert stage in STAGES, f"{name} imports {target}, which is in no stage package"
        assert STAGES.index(stage) <= STAGES.index(own), (
            f"{name} ({own}) imports {target} ({stage}): a later stage"
        )
        if own in FRONT_END:
            assert not target.startswith("spvit_dsl.") or _stage(target) in FRONT_END | INFRASTRUCTURE


@pytest.mark.parametrize(("name", "path"), [(n, p) for n, p in _modules() if n.split(".")[0] in FRONT_END])
def test_the_front_end_never_imports_torch(name: str, path: Path) -> None:
    for target in _imports(name, path):
        root = target.split(".")[0]
        if root in ("torch", "timm", "torchvision", "safetensors") and (name, root) not in TORCH_IN_FRONT_END:
            pytest.fail(f"{name} imports {target}")


def test_every_module_is_in_a_stage_package_or_infrastructure() -> None:
    roots = {n.split(".")[0] for n, _ in _modules() if n}
    assert roots <= set(STAGES) | INFRASTRUCTURE | {"__main__"}, roots - set(STAGES) - INFRASTRUCTURE


def test_compiling_and_the_cli_import_no_torch() -> None:
    code = (
        "import sys, spvit_dsl.cli, spvit_dsl.compile.program; "
        "from spvit_dsl.compile.program import compile_file; compile_file('examples/digits_tiny.vit'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
