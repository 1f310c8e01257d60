"""Saving and loading supernets (lowering stage, torch): one safetensors file, no pickle.

The file holds the supernet's full state dict (the timm model's parameters under their timm names, the conv ops'
mixing matrices and BatchNorms, the masks of groups fixed below their dense size; a strategy's own tensors, such as
SPViT's gate logits, live in the search checkpoint) and, in its string metadata:

* ``spvit_dsl.format`` — ``supernet/1``;
* ``spvit_dsl.spec`` — the spec text the supernet was compiled from (may be empty);
* ``spvit_dsl.space`` — the :class:`~spvit_dsl.space.plan.Space` as JSON (so loading needs no parser);
* ``spvit_dsl.lowering`` — JSON of the lowering options (convention, alpha, seed) and ``shrunk``: the original
  indices of the units left in every group a search physically shrank.

:func:`load_supernet` rebuilds the supernet with :func:`spvit_dsl.supernet.lower.lower` (random init) and loads the tensors
strictly, so outputs reproduce exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._io import write_atomic
from ..lang.errors import UsageError
from ..space.plan import BlockGeom, BlockPlan, DensityChoice, FfnChoice, Geometry, Space
from ._shrink import restore_shrunk
from .lower import lower
from .net import Supernet

__all__ = ["FORMAT", "load_supernet", "save_supernet", "space_from_json", "space_to_json"]

FORMAT = "supernet/1"


def space_to_json(space: Space) -> str:
    """The space as JSON (JSON-serialisable ``extras`` entries only)."""
    extras = {k: v for k, v in space.extras.items() if _jsonable(v)}
    data = {
        "geometry": asdict(space.geometry),
        "plans": [asdict(p) for p in space.plans],
        "embed": [list(w) for w in space.embed],
        "extras": extras,
    }
    return json.dumps(data, sort_keys=True)


def space_from_json(text: str) -> Space:
    """Inverse of :func:`space_to_json` (lists become tuples again)."""
    d = json.loads(text)
    g = dict(d["geometry"])
    if (
        "dist_token" not in g
    ):  # saved before registers: the prefix was the class token (+ DeiT's distillation token)
        g["dist_token"] = int(g.get("prefix_tokens", 1)) > 1
    g["blocks"] = tuple(_geom(b) for b in g["blocks"])
    g["depths"], g["num_heads"] = tuple(g["depths"]), tuple(g["num_heads"])
    g["timm_kwargs"] = tuple((k, _tuplify(v)) for k, v in g["timm_kwargs"])
    plans = tuple(_plan(p) for p in d["plans"])
    embed = tuple(tuple(w) for w in d["embed"])
    return Space(Geometry(**g), plans, embed, dict(d.get("extras", {})))


def _geom(b: dict[str, Any]) -> BlockGeom:
    return BlockGeom(**{**b, "grid": tuple(b["grid"])})


def _plan(p: dict[str, Any]) -> BlockPlan:
    ffn = p["ffn"]
    choice = FfnChoice(tuple(ffn["widths"]) if ffn["widths"] is not None else None, ffn["group"])
    return BlockPlan(
        _geom(p["geom"]),
        tuple(p["attention"]),
        choice,
        tuple(p["heads"]),
        tuple(p["head_dim"]),
        DensityChoice(**{k: tuple(v) for k, v in p["density"].items()}),
        joint=bool(p.get("joint", False)),
    )


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _jsonable(v: object) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def save_supernet(supernet: Supernet, path: str | Path, spec_text: str = "") -> None:
    """Write ``supernet`` to ``path`` as safetensors with the spec text and the space in the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in supernet.state_dict().items()}
    lowering = {
        "convention": supernet.convention,
        "alpha": supernet.alpha,
        "seed": supernet.seed,
        "shrunk": {p: v.tolist() for p, v in supernet.kept_index.items()},
    }
    metadata = {
        "spvit_dsl.format": FORMAT,
        "spvit_dsl.spec": spec_text,
        "spvit_dsl.space": space_to_json(supernet.space),
        "spvit_dsl.lowering": json.dumps(lowering),
    }
    write_atomic(str(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a saved supernet; :class:`UsageError` for a missing or foreign file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise UsageError(f"supernet file not found: {path}") from None
    except Exception as e:
        raise UsageError(f"{path} is not a safetensors file: {' '.join(str(e).split())}") from e
    if meta.get("spvit_dsl.format") != FORMAT:
        raise UsageError(f"{path} is not a spvit-dsl supernet (format {meta.get('spvit_dsl.format')!r})")
    return meta


def load_supernet(
    path: str | Path,
    space_factory: Callable[[str], Space] | None = None,
    *,
    device: torch.device | str | None = None,
) -> Supernet:
    """Rebuild a saved supernet. ``space_factory(spec_text)`` rebuilds the space from the stored spec (e.g. the
    compiler's parse + check); without it the stored space JSON is used."""
    meta = read_metadata(path)
    space = (
        space_factory(meta["spvit_dsl.spec"]) if space_factory else space_from_json(meta["spvit_dsl.space"])
    )
    opts = json.loads(meta["spvit_dsl.lowering"])
    net = lower(space, convention=opts["convention"], alpha=opts["alpha"], seed=opts["seed"], device=device)
    restore_shrunk(net, opts.get("shrunk", {}))
    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{path} does not match its space: {' '.join(str(e).split())[:300]}") from e
    return net
