"""Backbone resolution (part of the *check* stage): a timm model name + the spec's overrides → :class:`Geometry`.

Input: a timm model name (``deit_small_patch16_224``, ``swin_tiny_patch4_window7_224``, ...) and the overrides a user
wrote in the spec (``image``, ``classes``, ``channels``, ``embed_dim``, ``depth``, ``heads``, ``patch``, ``window``,
``mlp_ratio``). Output: the shape of every block of the dense backbone, plus the keyword arguments that make
``timm.create_model(name, pretrained=False, **geometry.kwargs())`` build exactly that network.

Pure Python: the size tables below restate timm 1.0.31's model factories (``timm/models/vision_transformer.py``,
``deit.py``, ``swin_transformer.py``) and the list of timm names ships as ``space/timm_names.txt``, so resolving a
backbone never imports torch. ``python -m spvit_dsl.space.backbones --regen`` rewrites that list from the installed timm;
``tests/test_backbones.py`` checks every fact here against real timm modules built on the meta device.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..lang.errors import did_you_mean
from .geometry import BlockGeom, Family, Geometry

__all__ = [
    "OVERRIDE_KEYS",
    "BadOverride",
    "UnknownBackbone",
    "resolve",
    "supported_names",
    "timm_names",
]

# --- what a name means (timm 1.0.31 factories) ---------------------------------------------------------------

_VIT_RE = re.compile(r"^(deit|vit)_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$")
_DEIT_DISTILLED_RE = re.compile(r"^deit_(tiny|small|base)_distilled_patch(16)_(224|384)$")
_SWIN_RE = re.compile(r"^swin_(tiny|small|base|large)_patch(4)_window(\d+)_(\d+)$")

# size -> (embed_dim, depth, num_heads)
_VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
# size -> (embed_dim, depths, num_heads)
_SWIN_SIZES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_DEFAULT_CLASSES = 1000  # ImageNet-1k; always passed to timm (some default tags ship a 0-class head)
_DEFAULT_CHANNELS = 3
_DEFAULT_MLP_RATIO = 4.0

OVERRIDE_KEYS: tuple[str, ...] = (
    "image",
    "classes",
    "channels",
    "embed_dim",
    "depth",
    "heads",
    "patch",
    "window",
    "mlp_ratio",
)
# scalar spec key -> (_Config field, timm.create_model keyword); depth/heads are handled per family
_SCALAR_KEYS: dict[str, tuple[str, str]] = {
    "image": ("img_size", "img_size"),
    "classes": ("num_classes", "num_classes"),
    "channels": ("in_chans", "in_chans"),
    "embed_dim": ("embed_dim", "embed_dim"),
    "patch": ("patch_size", "patch_size"),
    "window": ("window_size", "window_size"),
    "mlp_ratio": ("mlp_ratio", "mlp_ratio"),
}


# Bounds on overrides, checked before anything is built: beyond them the compiler would build millions of graph
# nodes or price tensors no machine holds, so it says so instead of hanging or running out of memory.
LIMITS: dict[str, tuple[int, str]] = {
    "depth": (1024, "every block becomes part of the search graph"),
    "heads": (4096, "every head is a unit of the search"),
    "embed_dim": (65536, "every channel is a unit of the search"),
    "image": (16384, "the token grid of a larger image does not fit in memory"),
    "patch": (16384, "a patch cannot be larger than the largest image"),
    "channels": (4096, "input channels beyond this are not images"),
    "classes": (1_000_000, "a classifier head this large is not a vision transformer's"),
    "window": (16384, "a window cannot be larger than the largest image"),
}


def _bounded(key: str, value: int) -> int:
    limit, why = LIMITS[key]
    if value > limit:
        raise BadOverride(key, f"{key} {value} is beyond what spvit-dsl compiles (at most {limit:,}: {why})")
    return value


# --- errors --------------------------------------------------------------------------------------------------


class UnknownBackbone(ValueError):
    """The model name is not a backbone spvit-dsl can search (``suggestions``: close supported/timm names)."""

    def __init__(self, name: str, message: str, suggestions: list[str]) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.suggestions = suggestions

    @property
    def hint(self) -> str:
        if not self.suggestions:
            return ""
        return "did you mean " + " or ".join(f"'{s}'" for s in self.suggestions) + "?"


class BadOverride(ValueError):
    """An override the backbone cannot take.

    ``key`` is the spec key to point at, ``hint`` a suggestion (may be empty), ``on_value`` False when the key
    itself is wrong (an unknown override name) rather than its value.
    """

    def __init__(self, key: str, message: str, hint: str = "", *, on_value: bool = True) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.hint = hint
        self.on_value = on_value


# --- the timm name list --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def timm_names() -> list[str]:
    """timm's ``vit_*``, ``deit*`` and ``swin*`` model names (snapshot shipped in ``space/timm_names.txt``)."""
    text = resources.files("spvit_dsl.space").joinpath("timm_names.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@lru_cache(maxsize=1)
def supported_names() -> list[str]:
    """The timm names :func:`resolve` accepts: plain ViT/DeiT (incl. distilled DeiT) and Swin v1."""
    return sorted(n for n in timm_names() if _match(n) is not None)


def _match(name: str) -> tuple[str, re.Match[str]] | None:
    for kind, pattern in (("vit", _VIT_RE), ("deit_distilled", _DEIT_DISTILLED_RE), ("swin", _SWIN_RE)):
        m = pattern.match(name)
        if m:
            return kind, m
    return None


def _suggest(name: str) -> list[str]:
    """Close names from the supported set first, then from timm's list (deduplicated, at most 5)."""
    out: list[str] = []
    for pool in (supported_names(), timm_names()):
        for s in difflib.get_close_matches(name, pool, n=3, cutoff=0.6):
            if s not in out:
                out.append(s)
    return out[:5]


# --- the resolved configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """Every architecture number of the backbone, before block geometry is derived."""

    family: Family
    model: str
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: float
    window_size: int  # 0 for ViT
    prefix_tokens: int  # 0 for Swin


def _from_name(model: str) -> _Config:
    """The configuration a supported name stands for; :class:`UnknownBackbone` otherwise."""
    hit = _match(model)
    if hit is None or model not in timm_names():
        raise _unknown(model, hit is not None)
    kind, m = hit
    if kind == "swin":
        size, patch, window, img = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        dim, depths, heads = _SWIN_SIZES[size]
        family: Family = "swin"
        prefix = 0
    else:
        groups = (m.group(1), m.group(2), m.group(3)) if kind == "deit_distilled" else m.group(2, 3, 4)
        size, patch, img = groups[0], int(groups[1]), int(groups[2])
        dim, depth, num_heads = _VIT_SIZES[size]
        depths, heads, window, family = (depth,), (num_heads,), 0, "vit"
        prefix = 2 if kind == "deit_distilled" else 1  # cls (+ distillation) token
    return _Config(
        family,
        model,
        img,
        patch,
        _DEFAULT_CHANNELS,
        _DEFAULT_CLASSES,
        dim,
        depths,
        heads,
        _DEFAULT_MLP_RATIO,
        window,
        prefix,
    )


def _unknown(model: str, looks_supported: bool) -> UnknownBackbone:
    suggestions = _suggest(model)
    if model in timm_names():
        msg = (
            f"timm model '{model}' is not supported: spvit-dsl searches plain ViT/DeiT "
            "('vit_<size>_patch<P>_<img>', 'deit_<size>[_distilled]_patch16_<img>') and Swin v1 "
            "('swin_<size>_patch4_window<W>_<img>') backbones"
        )
        suggestions = [s for s in suggestions if s in supported_names()] or suggestions
    elif looks_supported:
        msg = f"'{model}' is not a timm model (timm has no such variant; pick a listed name and override 'image')"
    else:
        msg = f"unknown backbone '{model}'"
    return UnknownBackbone(model, msg, suggestions)


# --- overrides -----------------------------------------------------------------------------------------------


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadOverride(key, f"{key} must be a positive integer, found {value!r}")
    return value


def _int_tuple(key: str, value: object, example: str) -> tuple[int, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        what = "depth" if key == "depth" else "head count"
        raise BadOverride(
            key,
            f"a Swin backbone takes one {what} per stage, found the single value {value!r}",
            hint=f"write a tuple, e.g. {key} = {example}",
        )
    if not isinstance(value, (tuple, list)) or not value:
        raise BadOverride(key, f"{key} must be a tuple of positive integers, found {value!r}")
    values = tuple(_positive_int(key, v) for v in value)
    if key == "depth":
        _bounded(key, sum(values))
    return tuple(_bounded(key, v) for v in values)


def _vit_int(key: str, value: object) -> int:
    if isinstance(value, (tuple, list)):
        raise BadOverride(
            key,
            f"a ViT backbone takes a single {key} (the same for every block), found the tuple {tuple(value)!r}",
            hint="per-stage tuples apply to Swin backbones only",
        )
    return _bounded(key, _positive_int(key, value))


def _ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 64:
        raise BadOverride("mlp_ratio", f"mlp_ratio must be a positive number up to 64, found {value!r}")
    return float(value)


def _apply(cfg: _Config, overrides: dict[str, object]) -> _Config:
    """The configuration with the user's overrides applied (types checked, shapes not yet)."""
    changes: dict[str, object] = {}
    for key, value in overrides.items():
        if key not in OVERRIDE_KEYS:
            raise BadOverride(
                key,
                f"unknown backbone override '{key}'",
                hint=did_you_mean(key, OVERRIDE_KEYS),
                on_value=False,
            )
        if key == "mlp_ratio":
            changes["mlp_ratio"] = _ratio(value)
        elif key in ("depth", "heads"):
            field = "depths" if key == "depth" else "num_heads"
            if cfg.family == "swin":
                example = "(2, 2, 6, 2)" if key == "depth" else "(3, 6, 12, 24)"
                changes[field] = _int_tuple(key, value, example)
            else:
                changes[field] = (_vit_int(key, value),)
        elif key == "window" and cfg.family != "swin":
            raise BadOverride(key, "window applies to Swin backbones only (a ViT attends over all tokens)")
        else:
            changes[_SCALAR_KEYS[key][0]] = _bounded(key, _positive_int(key, value))
    return replace(cfg, **changes)  # type: ignore[arg-type]


def _blame(overrides: dict[str, object], *keys: str) -> str:
    """The key to point at: the first of ``keys`` the user wrote (else the first one)."""
    return next((k for k in keys if k in overrides), keys[0])


# --- shape checks and block geometry -------------------------------------------------------------------------


def _check_grid(cfg: _Config, overrides: dict[str, object]) -> int:
    """The patch grid side; the image must tile into whole patches."""
    if cfg.img_size % cfg.patch_size:
        lo = cfg.img_size - cfg.img_size % cfg.patch_size
        raise BadOverride(
            _blame(overrides, "image", "patch"),
            f"image {cfg.img_size} is not divisible by patch {cfg.patch_size}",
            hint=f"use a multiple of {cfg.patch_size}, e.g. {lo or cfg.patch_size} or {lo + cfg.patch_size}",
        )
    return cfg.img_size // cfg.patch_size


def _check_heads(dim: int, heads: int, overrides: dict[str, object], where: str = "") -> None:
    if dim % heads:
        divisors = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
        raise BadOverride(
            _blame(overrides, "heads", "embed_dim"),
            f"{heads} heads do not divide the width {dim}{where}",
            hint="heads must divide the width; divisors: " + ", ".join(map(str, divisors)),
        )


def _vit_blocks(cfg: _Config, overrides: dict[str, object]) -> tuple[BlockGeom, ...]:
    grid = _check_grid(cfg, overrides)
    (depth,), (heads,), dim = cfg.depths, cfg.num_heads, cfg.embed_dim
    _check_heads(dim, heads, overrides)
    return tuple(
        BlockGeom(
            index=i,
            stage=0,
            index_in_stage=i,
            dim=dim,
            heads=heads,
            head_dim=dim // heads,
            hidden=_hidden(dim, cfg.mlp_ratio, overrides),
            grid=(grid, grid),
            prefix_tokens=cfg.prefix_tokens,
        )
        for i in range(depth)
    )


def _hidden(dim: int, ratio: float, overrides: dict[str, object]) -> int:
    hidden = int(dim * ratio)  # timm's rounding (Block and SwinTransformerBlock)
    if hidden < 1:
        raise BadOverride(
            _blame(overrides, "mlp_ratio", "embed_dim"),
            f"mlp_ratio {ratio} leaves an empty FFN at width {dim}",
        )
    return hidden


def _stage_window(
    grid: int, window: int, stage: int, grids: list[int], overrides: dict[str, object]
) -> tuple[int, int]:
    """(window, shift) of a stage as timm 1.0.31 clamps them: a window covering the grid becomes the grid, unshifted.

    timm would zero-pad a grid the window does not tile; spvit-dsl refuses it (the convolution candidates and the
    cost model assume whole windows).
    """
    if grid <= window:
        return grid, 0
    if grid % window:
        fits = [w for w in range(2, max(grids) + 1) if all(g <= w or g % w == 0 for g in grids)]
        raise BadOverride(
            _blame(overrides, "window", "image", "patch"),
            f"stage {stage} has a {grid}x{grid} token grid that window {window} does not tile",
            hint="windows that tile every stage: " + ", ".join(map(str, fits[:8])) if fits else "",
        )
    return window, window // 2


def _stage_grids(cfg: _Config, overrides: dict[str, object]) -> list[int]:
    """The token-grid side of every Swin stage; patch merging halves it, so it must stay even."""
    grids = [_check_grid(cfg, overrides)]
    for s in range(1, len(cfg.depths)):
        if grids[-1] % 2:
            raise BadOverride(
                _blame(overrides, "image", "patch", "depth"),
                f"patch merging before stage {s} needs an even grid, found {grids[-1]}x{grids[-1]}",
                hint="the patch grid must halve evenly at every stage",
            )
        grids.append(grids[-1] // 2)
    return grids


def _swin_blocks(cfg: _Config, overrides: dict[str, object]) -> tuple[BlockGeom, ...]:
    if len(cfg.depths) != len(cfg.num_heads):
        raise BadOverride(
            _blame(overrides, "heads", "depth"),
            f"depth has {len(cfg.depths)} stages but heads has {len(cfg.num_heads)}",
            hint="give one head count per stage",
        )
    grids = _stage_grids(cfg, overrides)
    blocks: list[BlockGeom] = []
    for s, (depth, heads, grid) in enumerate(zip(cfg.depths, cfg.num_heads, grids, strict=True)):
        dim = cfg.embed_dim * 2**s
        _check_heads(dim, heads, overrides, f" of stage {s}")
        window, shift = _stage_window(grid, cfg.window_size, s, grids, overrides)
        blocks += [
            BlockGeom(
                index=len(blocks) + i,
                stage=s,
                index_in_stage=i,
                dim=dim,
                heads=heads,
                head_dim=dim // heads,
                hidden=_hidden(dim, cfg.mlp_ratio, overrides),
                grid=(grid, grid),
                prefix_tokens=0,
                window=window,
                shift=shift if i % 2 else 0,
            )
            for i in range(depth)
        ]
    return tuple(blocks)


def _timm_kwargs(cfg: _Config, overrides: dict[str, object]) -> tuple[tuple[str, object], ...]:
    """img_size and num_classes always; every other overridden value that differs from the name's default."""
    default = _from_name(cfg.model)
    kwargs: dict[str, object] = {"img_size": cfg.img_size, "num_classes": cfg.num_classes}
    for key in overrides:
        if key in ("depth", "heads"):
            field = "depths" if key == "depth" else "num_heads"
            value, base = getattr(cfg, field), getattr(default, field)
            if value != base:
                timm_key = field if cfg.family == "swin" else ("depth" if key == "depth" else "num_heads")
                kwargs[timm_key] = value if cfg.family == "swin" else value[0]
        elif key not in ("image", "classes"):
            field, timm_key = _SCALAR_KEYS[key]
            if getattr(cfg, field) != getattr(default, field):
                kwargs[timm_key] = getattr(cfg, field)
    return tuple(kwargs.items())


def resolve(model: str, overrides: dict[str, object] | None = None) -> Geometry:
    """Resolve a timm model name and the spec's overrides into the dense backbone's :class:`Geometry`.

    Raises :class:`UnknownBackbone` for a name outside :func:`supported_names` and :class:`BadOverride` for an
    override of the wrong type or one that breaks the network's shapes.
    """
    overrides = dict(overrides or {})
    cfg = _apply(_from_name(model), overrides)
    blocks = _swin_blocks(cfg, overrides) if cfg.family == "swin" else _vit_blocks(cfg, overrides)
    return Geometry(
        family=cfg.family,
        model=cfg.model,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        window_size=cfg.window_size,
        prefix_tokens=cfg.prefix_tokens,
        blocks=blocks,
        timm_kwargs=_timm_kwargs(cfg, overrides),
    )


# --- regenerating the name list (the only place timm is imported) ---------------------------------------------

_NAMES_FILE = Path(__file__).with_name("timm_names.txt")
_PATTERNS = ["vit_*", "deit*", "swin*"]


def current_timm_names() -> list[str]:
    """timm's current list for the patterns the snapshot covers (imports timm; for tests and ``--regen``)."""
    import timm  # noqa: PLC0415  (deliberately lazy: the module must stay torch-free)

    return sorted(timm.list_models(_PATTERNS))


def _regen() -> None:
    import timm  # noqa: PLC0415

    header = f"# timm {timm.__version__}: timm.list_models({_PATTERNS}); regenerate: python -m spvit_dsl.space.backbones --regen\n"
    _NAMES_FILE.write_text(header + "".join(n + "\n" for n in current_timm_names()), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regen"]:
        sys.exit("usage: python -m spvit_dsl.space.backbones --regen")
    _regen()
