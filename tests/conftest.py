from __future__ import annotations

import os

import pytest

os.environ.setdefault("TIMM_FUSED_ATTN", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One math thread per xdist worker, for torch here and every CLI subprocess a test starts: two workers with
    # torch's default (a thread per core) oversubscribe a 2-core machine, and small-tensor training then runs many
    # times slower. Tests that measure at a thread count (latency tables, benches) set theirs explicitly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden", action="store_true", help="rewrite golden files from the current output"
    )


@pytest.fixture
def regen(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Latency tables measured by tests go to a temporary folder, never to the user's cache."""
    import os

    os.environ["SPVIT_DSL_CACHE"] = str(tmp_path_factory.mktemp("spvit-cache"))
