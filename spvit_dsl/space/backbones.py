"""Backbone resolution (part of the *check* stage): a timm model name + the spec's overrides → :class:`Geometry`.

Input: a timm model name, optionally with a pretrained tag (``deit_small_patch16_224``,
``vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``swin_tiny_patch4_window7_224``, ...) and the overrides a user wrote
in the spec (``image``, ``classes``, ``channels``, ``embed_dim``, ``depth``, ``heads``, ``patch``, ``window``,
``mlp_ratio``, ``global_pool``, ``tag``). Output: the shape of every block of the dense backbone, plus the keyword
arguments that make ``timm.create_model(name, pretrained=False, **geometry.kwargs())`` build exactly that network.

Pure Python: ``space/timm_configs.json`` is a snapshot of timm 1.0.31 — every ``vit_*``, ``deit*`` and ``swin*`` name,
what each ViT-family model is made of (read from the model built on the meta device: sizes, class/register/
distillation tokens, pooling and its norms, layer scale, qkv bias, the FFN's kind, width and activation) or the
first feature spvit-dsl does not lower, and each name's pretrained tags with their class counts. Swin v1 and SwinV2
names are read from their pattern and the size table below (timm's ``swin_transformer.py`` and
``swin_transformer_v2.py`` factories); timm's own SwinV2-CR (``swinv2_cr_*``, ``swin_transformer_v2_cr.py``) from the
model built on the meta device (sizes, window, where its extra norms sit). Resolving a backbone never imports torch.
``python -m spvit_dsl.space._timm_snapshot`` rewrites the snapshot from the installed timm;
``tests/test_backbones.py`` checks every fact here against real timm modules built on the meta device.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Any

from ..lang.errors import did_you_mean
from ._others import PLAIN_VIT, other_refusal
from .geometry import BlockGeom, Family, Geometry

__all__ = [
    "OVERRIDE_KEYS",
    "BadOverride",
    "cr_extra_norms",
    "UnknownBackbone",
    "resolve",
    "POOLS",
    "default_tag",
    "refusal",
    "split_tag",
    "supported_names",
    "tags",
    "timm_names",
]

# --- what a name means (timm 1.0.31 factories) ---------------------------------------------------------------

_SWIN_RE = re.compile(r"^swin_(tiny|small|base|large)_patch(4)_window(\d+)_(\d+)$")
# SwinV2: ``window12to16_192to256`` was pre-trained at window 12 / image 192 and runs at window 16 / image 256
_SWINV2_RE = re.compile(r"^swinv2_(tiny|small|base|large)_window(?:\d+to)?(\d+)_(?:\d+to)?(\d+)$")

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
# SwinV2-CR: without a ``window_size`` argument timm derives the window from the image, ``max(1, grid // 8)``
# (``SwinTransformerV2Cr(window_ratio=8)``); spvit-dsl keeps the name's window and passes it whenever the two differ
_CR_WINDOW_RATIO = 8

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
    "global_pool",
    "tag",
)
POOLS: tuple[str, ...] = ("token", "avg")  # the ViT pooling spvit-dsl lowers (timm's global_pool)
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
    """The model name is not a backbone spvit-dsl can search (``suggestions``: close supported names; ``timm``:
    whether it is a real timm name, refused rather than misspelt)."""

    def __init__(self, name: str, message: str, suggestions: list[str], *, timm: bool = False) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.suggestions = suggestions
        self.timm = timm

    @property
    def hint(self) -> str:
        """'did you mean ...?' for a typo; the closest supported backbones for a real timm name that is refused."""
        if not self.suggestions:
            return ""
        names = self.suggestions[:3]
        if self.timm:
            return "the closest supported backbones: " + ", ".join(f"'{s}'" for s in names)
        return "did you mean " + " or ".join(f"'{s}'" for s in names) + "?"


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


# --- the timm snapshot ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    text = resources.files("spvit_dsl.space").joinpath("timm_configs.json").read_text(encoding="utf-8")
    raw: dict[str, Any] = json.loads(text)
    return raw


def _snapshot() -> dict[str, dict[str, Any]]:
    """``space/timm_configs.json``: timm name → facts (see :mod:`._timm_snapshot`)."""
    models: dict[str, dict[str, Any]] = _raw()["models"]
    return models


def _others() -> dict[str, str]:
    """Every other timm name (outside ``vit_*``, ``deit*``, ``swin*``) → its timm module."""
    others: dict[str, str] = _raw().get("others", {})
    return others


@lru_cache(maxsize=1)
def timm_names() -> list[str]:
    """timm's ``vit_*``, ``deit*`` and ``swin*`` model names (the snapshot in ``space/timm_configs.json``)."""
    return sorted(_snapshot())


@lru_cache(maxsize=1)
def supported_names() -> list[str]:
    """The timm names :func:`resolve` accepts: ViTs whose every feature spvit-dsl lowers (plain ViT/DeiT, DeiT-III,
    CLIP, SigLIP with average pooling, DINOv2, register and average-pooling ViTs, ...), Swin v1, SwinV2 and timm's
    SwinV2-CR."""
    return sorted(n for n in timm_names() if refusal(n) is None)


def refusal(name: str) -> str | None:
    """Why the timm name ``name`` (no tag) is not supported, as a phrase naming the missing feature; None when it is
    supported or not a timm name of these families."""
    facts = _snapshot().get(name)
    if facts is None:
        return None
    if "swin" in facts and not facts.get("swin_v2_cr") and _swin_match(name) is None:
        return (
            "Swin-S3 (AutoFormerV2's per-stage window sizes)"
            if name.startswith("swin_s3")
            else ("a Swin layout outside timm's 'swin_<size>_patch4_window<W>_<img>' names")
        )
    refused: str | None = facts.get("refused")
    return refused


def _swin_match(name: str) -> tuple[str, int, int, int] | None:
    """(size, patch, window, image) of a Swin v1 or plain SwinV2 name; None for any other Swin layout."""
    m = _SWIN_RE.match(name)
    if m is not None:
        return m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    m = _SWINV2_RE.match(name)
    if m is not None:
        return m.group(1), 4, int(m.group(2)), int(m.group(3))
    return None


def split_tag(model: str) -> tuple[str, str]:
    """``'vit_base_patch16_224.augreg_in1k'`` → ``('vit_base_patch16_224', 'augreg_in1k')``; no tag → ``''``."""
    name, _, tag = model.partition(".")
    return name, tag


def tags(name: str) -> dict[str, int]:
    """The pretrained tags of a timm name, timm's default first, with the class count of each tag's head (0: none;
    timm's ``untrained`` tag: no weights at all)."""
    return {tag: classes for tag, classes in _snapshot().get(name, {}).get("tags", [])}


def _suggest(name: str) -> list[str]:
    """Close supported names (at most 5): a hint never offers a name that is itself refused. When no name is close
    as a string (``flexivit_base``), the supported names sharing most of its ``_``-separated words (``base``,
    ``patch14``, ``224``), the most similar first."""
    close = difflib.get_close_matches(name, supported_names(), n=5, cutoff=0.6)
    if close:
        return close
    words = set(name.split("_"))
    shared = {n: len(words & set(n.split("_"))) for n in supported_names()}
    similar = {n: difflib.SequenceMatcher(None, name, n).ratio() for n, k in shared.items() if k}
    return sorted(similar, key=lambda n: (-shared[n], -similar[n], n))[:5]


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
    hidden: int = 0  # the name's dense FFN width (ViT; 0: int(embed_dim · mlp_ratio))
    tag: str = ""
    # ViT token layout and norms (timm's VisionTransformer arguments; Swin keeps the defaults)
    class_token: bool = True
    reg_tokens: int = 0
    dist_token: bool = False
    no_embed_class: bool = False
    global_pool: str = "token"
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool = False
    layer_scale: bool = False
    qkv_bias: bool = True
    act: str = "GELU"
    ffn_glu: bool = False  # ViT: timm's packed SwiGLU FFN (mlp_ratio is then fc1's width / C: 2·hidden / C)
    patch_bias: bool = True
    swin_v2: bool = False  # Swin: SwinV2 blocks and patch merging
    swin_v2_cr: bool = False  # Swin: timm's SwinV2-CR (cosine-attention blocks, v1's merging, norm3)
    # SwinV2-CR's norm3 rule (timm's ``extra_norm_period`` and ``extra_norm_stage``; the last stage always ends with one)
    extra_norm_period: int = 0
    extra_norm_stage: bool = False

    @property
    def prefix_tokens(self) -> int:
        """Class, register and distillation tokens."""
        return int(self.class_token) + self.reg_tokens + int(self.dist_token)


# the ViT layout facts a Geometry carries as they are (the snapshot's keys, _Config's and Geometry's fields)
_LAYOUT = (
    "class_token", "reg_tokens", "dist_token", "no_embed_class", "global_pool", "pre_norm", "final_norm", "fc_norm",
    "act", "patch_bias",
)  # fmt: skip


def _from_name(model: str) -> _Config:
    """The configuration a supported name stands for; :class:`UnknownBackbone` otherwise."""
    facts = _snapshot().get(model)
    if facts is None or refusal(model) is not None:
        raise _unknown(model)
    if facts.get("swin_v2_cr"):
        return _cr_config(model, facts)
    if "swin" in facts:
        match = _swin_match(model)
        assert match is not None  # refusal() checked it
        size, patch, window, img = match
        dim, depths, heads = _SWIN_SIZES[size]
        return _Config(
            "swin", model, img, patch, _DEFAULT_CHANNELS, _DEFAULT_CLASSES, dim, depths, heads,
            _DEFAULT_MLP_RATIO, window, class_token=False, global_pool="avg",  # Swin averages its last map
            swin_v2=bool(facts.get("swin_v2")),
        )  # fmt: skip
    dim, hidden, glu = facts["embed_dim"], facts["hidden"], facts["ffn_glu"]
    return _Config(
        "vit",
        model,
        facts["img_size"],
        facts["patch_size"],
        facts["in_chans"],
        _DEFAULT_CLASSES,
        dim,
        (facts["depth"],),
        (facts["num_heads"],),
        (2 if glu else 1) * hidden / dim,  # timm's mlp_ratio: fc1's width over C
        0,
        hidden=hidden,
        **{name: facts[name] for name in (*_LAYOUT, "layer_scale", "qkv_bias", "ffn_glu")},
    )


def _cr_config(model: str, facts: dict[str, Any]) -> _Config:
    """A SwinV2-CR name as the snapshot read it from timm's model: Swin v1's layout, no final norm (the last block's
    ``norm3`` normalises the last map)."""
    return _Config(
        "swin", model, facts["img_size"], facts["patch_size"], _DEFAULT_CHANNELS, _DEFAULT_CLASSES,
        facts["embed_dim"], tuple(facts["depths"]), tuple(facts["num_heads"]), facts["mlp_ratio"],
        facts["window_size"], class_token=False, global_pool="avg", final_norm=False, swin_v2_cr=True,
        extra_norm_period=facts["extra_norm_period"], extra_norm_stage=facts["extra_norm_stage"],
    )  # fmt: skip


def cr_extra_norms(depth: int, period: int, stage_end: bool) -> list[bool]:
    """Which blocks of a SwinV2-CR stage of ``depth`` blocks have the main-branch LayerNorm ``norm3``: every
    ``period``-th (0: none) and the stage's last when ``stage_end`` (timm's ``SwinTransformerV2CrStage._extra_norm``)."""
    return [bool(period and (i + 1) % period == 0) or (stage_end and i + 1 == depth) for i in range(depth)]


def _short(name: str, limit: int = 80) -> str:
    """A name as an error message quotes it: at most ``limit`` characters (a hostile spec can hold megabytes)."""
    return name if len(name) <= limit else name[:limit] + "…"


def _stem(name: str) -> str:
    """A timm name without its trailing image size: ``deit_small_patch16_384`` → ``deit_small_patch16``."""
    return re.sub(r"_\d+$", "", name)


def _unknown(model: str) -> UnknownBackbone:
    suggestions = _suggest(model)
    why = refusal(model)
    module = _others().get(model)
    if why is not None:
        msg = f"timm model '{model}' is not supported: spvit-dsl does not lower {why} yet"
    elif module is not None:
        feature = other_refusal(model, module, _raw().get("others_refused", {}))
        if feature == PLAIN_VIT:
            msg = (
                f"timm model '{model}' is not supported: spvit-dsl reads the configurations of timm's vit_*, deit* "
                "and swin* names only (timm builds this one as a plain VisionTransformer: start from the closest "
                "vit_* name and override its shape)"
            )
        elif feature is not None:
            msg = f"timm model '{model}' is not supported: spvit-dsl does not lower {feature} yet"
        else:  # no ViT is "close" to a ConvNet, whatever the shared words (convnext_tiny, swinv2_cr_tiny_224)
            suggestions = []
            msg = (
                f"timm model '{model}' is a convolutional network (timm's {module} family): spvit-dsl prunes timm's "
                "ViT, DeiT, DeiT-III, CLIP, SigLIP, DINOv2, Swin v1, SwinV2 and SwinV2-CR backbones (docs/language.md, "
                "'Supported backbones')"
            )
    elif _stem(model) in {_stem(n) for n in supported_names()}:
        msg = f"'{_short(model)}' is not a timm model (timm has no such variant; pick a listed name and override 'image')"
    else:
        msg = f"unknown backbone '{_short(model)}'"
    return UnknownBackbone(model, msg, suggestions, timm=why is not None or module is not None)


def _with_tag(cfg: _Config, tag: str, overrides: dict[str, object]) -> _Config:
    """The tag's class count becomes the default ``classes``; an unknown tag is a :class:`BadOverride`."""
    known = tags(cfg.model)
    if tag not in known:
        options = ", ".join(t for t in known if t) or "none"
        raise BadOverride(
            "tag",
            f"timm has no pretrained tag '{_short(tag)}' for {cfg.model}",
            hint=(did_you_mean(tag, [t for t in known if t]) or f"its tags: {options}"),
        )
    classes = known[tag]
    return replace(cfg, tag=tag, num_classes=classes if classes > 0 else cfg.num_classes)


def default_tag(model: str) -> str:
    """The tag timm loads for an untagged name (its first pretrained config), or ``''``."""
    return next(iter(tags(model)), "")


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


def _pool(cfg: _Config, value: object) -> _Config:
    """``global_pool = token | avg`` on a ViT, with the norms timm places for it (snapshot ``norms_<pool>``); a
    name's own pooling (``map`` for SigLIP's attention pool) may be restated."""
    if cfg.family != "vit":
        raise BadOverride(
            "global_pool", "global_pool applies to ViT backbones (Swin always averages its last map)"
        )
    if value == cfg.global_pool:
        return cfg
    if value not in POOLS:
        raise BadOverride(
            "global_pool",
            f"global_pool must be token or avg, found {value!r}",
            hint="token (the class token) or avg",
        )
    if value == "token" and not cfg.class_token:
        hint = "keep global_pool = map (its attention pool), or use avg" if cfg.global_pool == "map" else None
        raise BadOverride(
            "global_pool",
            f"{cfg.model} has no class token to pool",
            hint=hint or "use global_pool = avg",
        )
    if value == "avg" and cfg.dist_token:
        raise BadOverride("global_pool", "a distilled DeiT's heads read its class and distillation tokens")
    final_norm, fc_norm = _snapshot()[cfg.model][f"norms_{value}"]
    return replace(cfg, global_pool=str(value), final_norm=final_norm, fc_norm=fc_norm)


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
        if key == "tag":
            continue  # resolve() applies it first
        if key == "global_pool":
            cfg = _pool(cfg, value)
        elif key == "mlp_ratio":
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
        options = [w for w in (lo, lo + cfg.patch_size) if 0 < w <= LIMITS["image"][0]] or [cfg.patch_size]
        raise BadOverride(
            _blame(overrides, "image", "patch"),
            f"image {cfg.img_size} is not divisible by patch {cfg.patch_size}",
            hint=f"use a multiple of {cfg.patch_size}, e.g. " + " or ".join(map(str, options)),
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
            hidden=_vit_hidden(cfg, overrides),
            grid=(grid, grid),
            prefix_tokens=cfg.prefix_tokens,
            layer_scale=cfg.layer_scale,
            qkv_bias=cfg.qkv_bias,
            ffn_glu=cfg.ffn_glu,
        )
        for i in range(depth)
    )


def _vit_hidden(cfg: _Config, overrides: dict[str, object]) -> int:
    """The name's own FFN width unless ``embed_dim`` or ``mlp_ratio`` changes it (then ``int(C · ratio)``, which
    :func:`_timm_kwargs` passes to timm as ``mlp_ratio`` so that timm computes the same width).

    timm's packed SwiGLU (``SwiGLUPacked``, DINOv2-g) takes ``int(C · ratio)`` as fc1's width and splits it into two
    halves (``GluMlp`` asserts it is even): its FFN has half as many neurons."""
    if "embed_dim" in overrides or "mlp_ratio" in overrides or not cfg.hidden:
        width = _hidden(cfg.embed_dim, cfg.mlp_ratio, overrides)
        if not cfg.ffn_glu:
            return width
        if width % 2:
            raise BadOverride(
                _blame(overrides, "mlp_ratio", "embed_dim"),
                f"{cfg.model}'s SwiGLU FFN splits fc1's int({cfg.embed_dim} · {cfg.mlp_ratio:g}) = {width} outputs "
                "into two equal halves: the width must be even",
                hint="pick an embed_dim or mlp_ratio whose product rounds down to an even number",
            )
        return width // 2
    return cfg.hidden


def _hidden(dim: int, ratio: float, overrides: dict[str, object]) -> int:
    hidden = int(dim * ratio)  # timm's rounding (Block and SwinTransformerBlock)
    if hidden < 1:
        raise BadOverride(
            _blame(overrides, "mlp_ratio", "embed_dim"),
            f"mlp_ratio {ratio} leaves an empty FFN at width {dim}",
        )
    return hidden


def _stage_window(grid: int, window: int) -> tuple[int, int]:
    """(window, shift) of a stage as timm 1.0.31 sets them: a window covering the grid becomes the grid, unshifted;
    otherwise timm zero-pads the map to whole windows (bottom and right) inside each block's attention."""
    if grid <= window:
        return grid, 0
    return window, window // 2


def _stage_grids(cfg: _Config, overrides: dict[str, object]) -> list[int]:
    """The token-grid side of every Swin stage; patch merging halves it, zero-padding an odd grid first (timm), so
    stage s+1 sees ``ceil(grid / 2)``."""
    grids = [_check_grid(cfg, overrides)]
    for _ in range(1, len(cfg.depths)):
        grids.append((grids[-1] + 1) // 2)
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
        window, shift = _stage_window(grid, cfg.window_size)
        last = s == len(cfg.depths) - 1  # SwinV2-CR's last stage always ends with a norm3
        extra = cr_extra_norms(depth, cfg.extra_norm_period, cfg.extra_norm_stage or last)
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
                swin_v2=cfg.swin_v2 or cfg.swin_v2_cr,
                swin_v2_cr=cfg.swin_v2_cr,
                extra_norm=cfg.swin_v2_cr and extra[i],
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
        elif key == "global_pool":
            if cfg.global_pool != default.global_pool:
                kwargs["global_pool"] = cfg.global_pool
        elif key not in ("image", "classes", "tag"):
            field, timm_key = _SCALAR_KEYS[key]
            if getattr(cfg, field) != getattr(default, field):
                kwargs[timm_key] = getattr(cfg, field)
    if (
        cfg.family == "vit"
        and cfg.embed_dim != default.embed_dim
        and cfg.mlp_ratio != _DEFAULT_MLP_RATIO
        and "mlp_ratio" not in kwargs
    ):
        # a factory's own ratio (so400m: 3.7362) may not be hidden / embed_dim exactly: say ours
        kwargs["mlp_ratio"] = cfg.mlp_ratio
    if cfg.swin_v2_cr:  # timm derives a window from the image unless told: keep ours
        kwargs.pop("window_size", None)
        if cfg.window_size != max(1, cfg.img_size // cfg.patch_size // _CR_WINDOW_RATIO):
            kwargs["window_size"] = cfg.window_size
    return tuple(kwargs.items())


def _tagged(model: str, overrides: dict[str, object]) -> _Config:
    """The configuration of a name with its pretrained tag (``name.tag``, or ``tag = ...``, or timm's default)."""
    name, tag = split_tag(model)
    cfg = _from_name(name)
    if "tag" in overrides:
        value = overrides["tag"]
        if not isinstance(value, str) or not value:
            raise BadOverride("tag", f"tag must be a pretrained tag name, found {value!r}")
        if tag and value != tag:
            raise BadOverride("tag", f"the backbone name already says tag '{tag}'", hint="set the tag once")
        tag = value
    if not tag:
        tag = default_tag(name)
        if not tag:
            return cfg
    return _with_tag(cfg, tag, overrides)


def resolve(model: str, overrides: dict[str, object] | None = None) -> Geometry:
    """Resolve a timm model name and the spec's overrides into the dense backbone's :class:`Geometry`.

    Raises :class:`UnknownBackbone` for a name outside :func:`supported_names` and :class:`BadOverride` for an
    override of the wrong type or one that breaks the network's shapes.
    """
    overrides = dict(overrides or {})
    cfg = _apply(_tagged(model, overrides), overrides)
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
        tag=cfg.tag,
        swin_v2=cfg.swin_v2,
        swin_v2_cr=cfg.swin_v2_cr,
        **{name: getattr(cfg, name) for name in _LAYOUT},
    )


# --- the installed timm (for tests; regenerating the snapshot: python -m spvit_dsl.space._timm_snapshot) ---------


def current_timm_names() -> list[str]:
    """timm's current list for the patterns the snapshot covers (imports timm; for tests)."""
    import timm  # noqa: PLC0415  (deliberately lazy: the module must stay torch-free)

    from ._timm_snapshot import PATTERNS  # noqa: PLC0415

    return sorted(timm.list_models(PATTERNS))
