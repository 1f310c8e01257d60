"""`weights = pretrained` without a network: weights already in the local Hugging Face cache load at once; weights
that are not there fail fast (seconds, not a minute of retries) with a hint naming the alternatives."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from spvit_dsl.lang.errors import UsageError
from spvit_dsl.space import backbones
from spvit_dsl.supernet import _timm

NAME = "vit_tiny_patch16_224"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network (whatever this machine has) and an empty cache in ``tmp_path``."""
    monkeypatch.setattr(_timm, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_missing_weights_fail_fast_with_the_alternatives(offline: Path) -> None:
    geometry = backbones.resolve(NAME, {})
    started = time.monotonic()
    with pytest.raises(UsageError, match="unreachable and they are not in the local cache") as err:
        _timm.create_backbone(geometry, "pretrained")
    assert "weights = none" in str(err.value)
    assert (
        time.monotonic() - started < 60
    )  # a hang guard only: without the fix this retries for about a minute


def test_cached_weights_load_without_a_network(offline: Path) -> None:
    repo = timm.create_model(NAME, pretrained=False).pretrained_cfg["hf_hub_id"]
    torch.manual_seed(3)
    state = timm.create_model(NAME, pretrained=False).state_dict()
    snapshot = offline / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    refs = offline / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    model = _timm.create_backbone(backbones.resolve(NAME, {}), "pretrained")
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
