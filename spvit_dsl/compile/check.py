"""Stage 2 — check: :class:`Spec` (AST) → :class:`Checked` (a resolved, validated search space).

Resolves ``extends`` (the base's declarations come first), merges backbone and search settings, applies scope
declarations in source order (a later declaration overrides an earlier one field by field), and validates every
name, index, width and unit against the backbone. Every problem is a :class:`SpecError` pointing at the spec.
Pure Python: no torch.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from .._registry import UnknownName
from ..lang import ast
from ..lang.errors import Span, SpecError, SpecWarning, did_you_mean
from ..lang.parse import parse
from ..space import backbones, defaults
from ..space.groups import block_path, embed_path, groups
from ..space.latency import DEVICES, PRECISIONS, LatencySetting
from ..space.ops import OPS, by_level
from ..space.plan import LAYERS, BlockPlan, DensityChoice, FfnChoice, Geometry, Space
from ..space.units import METRICS, Limit, UnitError, to_limit
from .strategies import RETIRED, SETTINGS, STRATEGIES, SettingValue, StrategyInfo, check_data

FIELDS = ("attention", "ffn", "heads", "head_dim", "sparsity", "embed")
WEIGHTS_WORDS = ("pretrained", "none")
BUDGET_SETTINGS = ("convention", "device", "threads", "batch", "precision")
LATENCY_SETTINGS = ("device", "threads", "batch", "precision")


@dataclass(frozen=True)
class BudgetItem:
    limit: Limit
    span: Span


@dataclass(frozen=True)
class SearchSettings:
    strategy: str
    values: dict[str, SettingValue]  # common and strategy settings, defaults filled in
    spans: dict[str, Span] = field(default_factory=dict, compare=False)


@dataclass
class Checked:
    """What the checker hands to the graph builder and to every later stage."""

    spec: ast.Spec  # the file as written
    space: Space
    weights: str  # "pretrained" | "none" | a checkpoint path (resolved against the spec's folder)
    weights_span: Span | None
    budgets: tuple[BudgetItem, ...]
    convention: str | None  # from the budget block; None: the default
    search: SearchSettings
    frozen: dict[str, object] | None  # the provenance header, or None
    origins: dict[str, Span]  # group path → span of the declaration that set it
    model: str = ""
    backbone_settings: tuple[ast.Setting, ...] = ()  # merged over the extends chain
    warnings: list[SpecWarning] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # path → text of every file read (for rendering)
    latency: LatencySetting | None = None  # where a latency budget is measured; None: no latency budget


Loader = Callable[[str], str]


MAX_SPEC_BYTES = 8 * 2**20  # a spec is a page of text; anything larger is the wrong file


def read_file(path: str) -> str:
    """The text of a spec file. OSError (with a readable ``strerror``) for a file that is missing, not a regular
    file (a folder, a FIFO, a device: reading them could block or never end), larger than ``MAX_SPEC_BYTES``, or
    not UTF-8 text (e.g. a checkpoint or model passed where a spec is expected)."""
    st = os.stat(path)  # before opening: opening a FIFO blocks until a writer appears
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file")
    if st.st_size > MAX_SPEC_BYTES:
        raise OSError(
            errno.EFBIG, f"{st.st_size / 2**20:.0f} MB is far too large for a .vit spec (a model file?)"
        )
    with open(path, "rb") as fh:
        data = fh.read(MAX_SPEC_BYTES + 1)
    return decode_spec(data)


_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding.lower())
    except UnicodeDecodeError:
        return False
    return True


def decode_spec(data: bytes) -> str:
    """Spec bytes → text: UTF-8, with or without a byte-order mark (dropped). OSError naming the line and column of
    the first byte that is not UTF-8, or the encoding a UTF-16/32 byte-order mark announces."""
    for bom, name in _BOMS.items():
        if data.startswith(bom) and _decodes(data, name):
            raise OSError(
                errno.EILSEQ, f"{name} text (it starts with a {name} byte-order mark): save it as UTF-8"
            )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data.count(b"\n", 0, start) + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        hint = (
            "save it as UTF-8" if start > 0 and b"\x00" not in data[:4096] else "a checkpoint or model file?"
        )
        raise OSError(
            errno.EILSEQ,
            f"not UTF-8 text: line {line}, column {col} has the byte 0x{data[start]:02x}; a .vit spec is UTF-8 "
            f"text ({hint})",
        ) from None


# ---------------------------------------------------------------- extends
MAX_EXTENDS = 32  # files in one extends chain


def _flatten(spec: ast.Spec, loader: Loader, sources: dict[str, str], chain: tuple[str, ...]) -> list[Any]:
    """The items of ``spec`` with its bases' items first (recursively)."""
    ext = [i for i in spec.items if i.kind == "extends"]
    _no_duplicates(ext, "extends")
    items: list[Any] = []
    if ext:
        base_path = os.path.normpath(os.path.join(os.path.dirname(spec.path), ext[0].path))
        if base_path in chain:
            raise SpecError(
                f"'{ext[0].path}' extends itself (cycle: {' -> '.join(chain + (base_path,))})", ext[0].span
            )
        if len(chain) >= MAX_EXTENDS:
            raise SpecError(
                f"'extends' chains more than {MAX_EXTENDS} files deep",
                ext[0].span,
                hint="a spec extends a base, which may extend another: a handful of levels, not hundreds",
            )
        try:
            text = loader(base_path)
        except OSError as exc:
            raise SpecError(
                f"cannot read '{ext[0].path}': {exc.strerror or exc}",
                ext[0].span,
                hint=f"paths are relative to the spec's folder ({os.path.dirname(spec.path) or '.'})",
            ) from None
        sources[base_path] = text
        base = parse(text, base_path)
        items = _flatten(base, loader, sources, chain + (base_path,))
        items = [i for i in items if i.kind != "frozen"]  # provenance belongs to one file only
    return items + [i for i in spec.items if i.kind != "extends"]


def _no_duplicates(items: list[Any], what: str) -> None:
    if len(items) > 1:
        first = items[0].span
        raise SpecError(
            f"duplicate {what} declaration (the first is at line {first.line})",
            items[1].span,
            hint=f"a file holds one {what} declaration",
        )


def _own(spec: ast.Spec, kind: str) -> list[Any]:
    items = spec.all(kind)
    _no_duplicates(items, kind if kind != "embed" else "embed")
    return items


# ---------------------------------------------------------------- backbone
def _merge_backbone(spec: ast.Spec, items: list[Any]) -> tuple[str, Span, dict[str, ast.Setting]]:
    _own(spec, "backbone")
    model, model_span, settings = None, spec.span, {}
    for bb in (i for i in items if i.kind == "backbone"):
        if bb.model is not None:
            model, model_span = bb.model, bb.model_span
        seen: set[str] = set()
        for s in bb.settings:
            if s.key in seen:
                raise SpecError(f"'{s.key}' is set twice in this backbone block", s.key_span)
            seen.add(s.key)
            settings[s.key] = s
    if model is None:
        span = next((i.span for i in items if i.kind == "backbone"), Span(path=spec.path))
        raise SpecError(
            "the spec declares no backbone model",
            span,
            hint="start with e.g. 'backbone deit_small_patch16_224 { weights = pretrained }'",
        )
    return model, model_span, settings


def _plain(value: ast.Value) -> object:
    if isinstance(value, ast.Num):
        if value.unit:
            raise SpecError(
                f"unexpected unit '{value.unit}' in '{value.text}'", value.span, hint="write a plain number"
            )
        return int(value.value) if value.is_int else value.value
    if isinstance(value, ast.TupleV):
        return tuple(_plain(v) for v in value.items)
    return value.value


def _geometry(model: str, model_span: Span, settings: dict[str, ast.Setting]) -> Geometry:
    overrides = {k: _plain(s.value) for k, s in settings.items() if k != "weights"}
    try:
        return backbones.resolve(model, overrides)
    except backbones.UnknownBackbone as exc:
        raise SpecError(str(exc), model_span, hint=exc.hint or None) from None
    except backbones.BadOverride as exc:
        s = settings.get(exc.key)
        span = (
            (s.value.span if getattr(exc, "on_value", True) else s.key_span) if s is not None else model_span
        )
        raise SpecError(str(exc), span, hint=getattr(exc, "hint", None)) from None


def _pretrained(
    model: str, geo: Geometry, settings: dict[str, ast.Setting], model_span: Span, weights_span: Span | None
) -> list[SpecWarning]:
    """What ``weights = pretrained`` cannot do, said at compile time: a name without weights (an error), a pooling
    override that moves the final norm (an error: the weights cannot load), a shape the weights do not have and a
    head of another class count (warnings). Swin's ``window`` and ``image`` load (timm resizes v1's relative-position
    table; the position-bias MLPs of SwinV2 and SwinV2-CR do not depend on the window); its ``heads`` do not (v1's
    table and the v2 logit scales and position-bias MLPs hold one entry per head). On SwinV2-CR ``depth`` also moves
    the ``norm3`` LayerNorms (timm places them by block index), one more reason its weights cannot load, and ``patch``
    cannot load either (timm's CR checkpoint filter, unlike the ViT, Swin v1 and SwinV2 ones, does not resample the
    patch embedding)."""
    shipped = backbones.tags(geo.model)
    if geo.tag not in shipped or geo.tag == "untrained":
        raise SpecError(
            f"timm has no pretrained weights for {geo.model}",
            weights_span or model_span,
            hint="use weights = none, or a checkpoint path in quotes",
        )
    pool = settings.get("global_pool")
    if pool is not None:
        base = _geometry(model, model_span, {k: s for k, s in settings.items() if k != "global_pool"})
        if (base.final_norm, base.fc_norm) != (geo.final_norm, geo.fc_norm):
            layer = "the pooled feature (fc_norm)" if geo.fc_norm else "every token (norm)"
            dropped = "drops their attention-pool head and " if base.global_pool == "map" else ""
            raise SpecError(
                f"the pretrained weights of {geo.model}.{geo.tag} were trained with global_pool = "
                f"{base.global_pool}; with {geo.global_pool} timm {dropped}normalises {layer} instead, a layer "
                "these weights do not have, so they cannot load",
                pool.value.span,
                hint="use weights = none, or a checkpoint trained with this pooling",
            )
    out = []
    shaped = ("embed_dim", "depth", "mlp_ratio", *(("heads",) if geo.family == "swin" else ()))
    for key in shaped:
        s = settings.get(key)
        if s is not None:
            out.append(
                SpecWarning(
                    f"{key} changes the shapes the pretrained weights {geo.model}.{geo.tag} were trained with: "
                    "loading them will fail",
                    s.value.span,
                    hint="use weights = none, or a checkpoint of this shape",
                )
            )
    reshaped = bool(out)  # the weights cannot load at all: nothing more to say about them
    classes, span = shipped[geo.tag], settings["classes"].value.span if "classes" in settings else model_span
    if classes != geo.num_classes:
        has = f"a {classes}-class head" if classes else "no classifier head"
        out.append(
            SpecWarning(
                f"the pretrained weights {geo.model}.{geo.tag} have {has}; a fresh {geo.num_classes}-class head is "
                "created (randomly initialised, trained by the search and fine-tuning)",
                span,
                hint=None if "classes" in settings else "set classes = N for your data",
            )
        )
    heads = settings.get("heads")
    if heads is not None and geo.family != "swin" and not reshaped:
        out.append(
            SpecWarning(
                f"heads changes how the pretrained weights {geo.model}.{geo.tag} split their attention channels: "
                "they load (the shapes do not change), but the network computes another function than the one "
                "they were trained as, until fine-tuning retrains it",
                heads.value.span,
                hint="keep the name's head count with pretrained weights, or use weights = none",
            )
        )
    patch = settings.get("patch")
    if patch is not None and geo.swin_v2_cr:
        out.append(
            SpecWarning(
                f"patch changes the patch embedding the pretrained weights {geo.model}.{geo.tag} were trained with, "
                "and timm's SwinV2-CR checkpoint filter does not resample it (ViT, Swin v1 and SwinV2 ones do): "
                "loading them will fail",
                patch.value.span,
                hint="use weights = none, or a checkpoint of this patch size",
            )
        )
    return out


def _weights(settings: dict[str, ast.Setting], spec_path: str) -> tuple[str, Span | None]:
    s = settings.get("weights")
    if s is None:
        return "none", None
    if isinstance(s.value, ast.Name):
        if s.value.value not in WEIGHTS_WORDS:
            raise SpecError(
                f"unknown weights '{s.value.value}'",
                s.value.span,
                hint="weights = pretrained, none, or a checkpoint path in quotes",
            )
        return s.value.value, s.value.span
    if isinstance(s.value, ast.Str):
        path = s.value.value
        if not os.path.isabs(path):
            path = os.path.normpath(os.path.join(os.path.dirname(s.span.path), path))
        return path, s.value.span
    raise SpecError("weights must be pretrained, none, or a checkpoint path in quotes", s.value.span)


# ---------------------------------------------------------------- number sets
def expand(ns: ast.NumSet, *, what: str, integer: bool) -> tuple[tuple[float, ...], Span]:
    """The numbers of a set, in order; ranges are inclusive and computed exactly (decimal arithmetic)."""
    for n in _nums(ns):
        if n.unit:
            raise SpecError(
                f"unexpected unit '{n.unit}' in '{n.text}'", n.span, hint=f"{what} are plain numbers"
            )
        if integer and not n.is_int:
            raise SpecError(f"{what} must be whole numbers, found '{n.text}'", n.span)
    if ns.form != "range":
        return tuple(n.value for n in ns.items), ns.span
    assert ns.start is not None and ns.stop is not None
    start, stop = Decimal(ns.start.text), Decimal(ns.stop.text)
    step = Decimal(ns.step.text) if ns.step is not None else Decimal(1)
    if step <= 0:
        raise SpecError(
            f"the step of a range must be positive, found '{ns.step.text if ns.step else step}'",
            (ns.step or ns.start).span,
        )
    if stop < start:
        raise SpecError(
            f"empty range {ns.start.text}..{ns.stop.text}: the end is below the start",
            ns.span,
            hint=f"an empty set leaves no candidate for {what}",
        )
    count = int((stop - start) / step) + 1
    if ns.step is None and start + (count - 1) * step != stop:  # `0..0.9` would silently mean {0}
        raise SpecError(
            f"the range {ns.start.text}..{ns.stop.text} needs a step: with the default step 1 it stops at "
            f"{start + (count - 1) * step}",
            ns.span,
            hint=f"e.g. {ns.start.text}..{ns.stop.text} step {_step_hint(start, stop)}",
        )
    if count > 100_000:
        raise SpecError(
            f"the range {ns.start.text}..{ns.stop.text} has {count} values", ns.span, hint="use a larger step"
        )
    return tuple(float(start + i * step) for i in range(count)), ns.span


def _step_hint(start: Decimal, stop: Decimal) -> str:
    """The step of the ends' last decimal place (``0..0.9`` → 0.1, ``0..0.95`` → 0.01)."""
    exponent = min(int(start.as_tuple().exponent), int(stop.as_tuple().exponent))
    return str(Decimal(1).scaleb(exponent))


def _nums(ns: ast.NumSet) -> list[ast.Num]:
    return list(ns.items) + [n for n in (ns.start, ns.stop, ns.step) if n is not None]


# ---------------------------------------------------------------- scopes → block plans
@dataclass
class _Draft:
    """Mutable per-block state while scopes are applied."""

    attention: tuple[str, ...]
    ffn: FfnChoice
    heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    density: dict[str, tuple[float, ...]]
    # heads x head_dim declared as one choice (a later plain heads: or head_dim: clears it)
    joint: bool = False


def select(sel: ast.Selector, geo: Geometry) -> list[int]:
    """Global block indices a selector names; raise when it leaves the backbone."""
    last = geo.depth - 1
    if sel.form == "all":
        return list(range(geo.depth))
    if sel.form in ("range", "block"):
        start, stop = sel.start, sel.stop if sel.form == "range" else sel.start
        assert start is not None and stop is not None
        _in_range(start, stop, last, sel.span, f"{geo.model} has blocks 0..{last}")
        return list(range(start, stop + 1))
    if geo.family != "swin":
        raise SpecError(
            "stage selectors apply to Swin backbones only",
            sel.span,
            hint=f"{geo.model} has one stage; write 'blocks 0..{last}'",
        )
    assert sel.stage is not None
    n_stages = len(geo.depths)
    if not 0 <= sel.stage < n_stages:
        raise SpecError(
            f"stage {sel.stage} is outside the backbone",
            sel.span,
            hint=f"{geo.model} has stages 0..{n_stages - 1} (numbered from 0)",
        )
    first = sum(geo.depths[: sel.stage])
    depth = geo.depths[sel.stage]
    if sel.form == "stage":
        return list(range(first, first + depth))
    start, stop = sel.start, sel.stop if sel.form == "stage_range" else sel.start
    assert start is not None and stop is not None
    _in_range(start, stop, depth - 1, sel.span, f"stage {sel.stage} has blocks 0..{depth - 1}")
    return list(range(first + start, first + stop + 1))


def _in_range(start: int, stop: int, last: int, span: Span, hint: str) -> None:
    if stop < start:
        raise SpecError(
            f"empty block range {start}..{stop}", span, hint="ranges are inclusive: write start..end"
        )
    if stop > last:
        raise SpecError(f"block {stop} is outside the backbone", span, hint=hint)


def _attention(choice: ast.Choice) -> tuple[str, ...]:
    v = choice.value
    if not isinstance(v, ast.Words):
        raise SpecError(
            "attention takes an op name or 'one of {...}'",
            v.span,
            hint="e.g. attention: one of {skip, conv1x1, conv3x3, msa}",
        )
    seen: set[str] = set()
    for w in v.words:
        try:
            OPS.get(w.value)
        except UnknownName as exc:
            raise SpecError(f"unknown op '{w.value}'", w.span, hint=exc.hint or None) from None
        if w.value in seen:
            raise SpecError(f"op '{w.value}' is listed twice", w.span)
        seen.add(w.value)
    return by_level([w.value for w in v.words])


def _ffn(choice: ast.Choice, hidden: int, dim: int) -> FfnChoice:
    v = choice.value
    if isinstance(v, ast.Words) and not v.one_of and v.words[0].value == "dense":
        return FfnChoice(widths=(hidden,))
    if not isinstance(v, ast.FfnSpec):
        raise SpecError(
            "ffn takes 'ratios S', 'ratio R', 'widths S', 'width W', 'per neuron', 'groups of N' or 'dense'",
            v.span,
            hint="e.g. ffn: ratios 0.5..4 step 0.5",
        )
    if v.form == "neuron":
        return FfnChoice(group=1)
    if v.form == "groups":
        assert v.number is not None
        n = v.number
        if n.unit or not n.is_int or not 1 <= n.value <= hidden:
            raise SpecError(f"a group size must be a whole number in 1..{hidden}, found '{n.text}'", n.span)
        return FfnChoice(group=int(n.value))
    if v.form in ("ratio", "width"):
        assert v.number is not None
        values, span = expand(
            ast.NumSet(form="one", items=(v.number,), span=v.number.span),
            what=f"ffn {v.form}s",
            integer=v.form == "width",
        )
    else:
        assert v.values is not None
        values, span = expand(v.values, what=f"ffn {v.form}", integer=v.form == "widths")
    widths = [_ffn_width(x, v.form.rstrip("s"), dim, hidden, span) for x in values]
    return FfnChoice(widths=tuple(sorted(set(widths))))


def _ffn_width(x: float, form: str, dim: int, hidden: int, span: Span) -> int:
    if form == "ratio":
        if x <= 0:
            raise SpecError(
                f"an FFN ratio must be positive, found {x:g}", span, hint="to drop an FFN, use 'width 0'"
            )
        width = int(round(x * dim))
        if width > hidden:
            raise SpecError(
                f"FFN ratio {x:g} gives width {width}, above the dense width {hidden} "
                f"(ratio {hidden / dim:g})",
                span,
            )
        return width
    if not 0 <= x <= hidden:
        raise SpecError(f"FFN width {int(x)} is outside 0..{hidden} (the dense width)", span)
    return int(x)


def _ints(v: ast.ChoiceValue, lo: int, hi: int, what: str, where: str = "") -> tuple[int, ...]:
    if not isinstance(v, ast.NumSet):
        raise SpecError(
            f"{what} takes a number, 'one of {{...}}' or a range",
            v.span,
            hint=f"e.g. {what}: one of {{2, 4}}",
        )
    values, span = expand(v, what=what, integer=True)
    for x in values:
        if not lo <= x <= hi:
            dense = f" (the dense count of {where})" if where else ""
            raise SpecError(f"{what} {int(x)} is outside {lo}..{hi}{dense}", span)
    return tuple(sorted({int(x) for x in values}))


def _densities(ns: ast.NumSet) -> tuple[float, ...]:
    """Sparsity values (fractions of zero weights in [0, 1)) → candidate densities, ascending."""
    values, span = expand(ns, what="sparsity", integer=False)
    for x in values:
        if not 0 <= x < 1:
            raise SpecError(f"sparsity {x:g} is outside [0, 1)", span)
    return tuple(sorted({round(1.0 - x, 12) for x in values}))


def _sparsity(choice: ast.Choice) -> dict[str, tuple[float, ...]]:
    """``sparsity: S`` (every sparsifiable layer) or ``sparsity: {qkv: S, fc1: S}`` (the named layers only)."""
    v = choice.value
    if isinstance(v, ast.NumSet):
        values = _densities(v)
        return {layer: values for layer in LAYERS}
    if not isinstance(v, ast.LayerMap):
        raise SpecError(
            "sparsity takes a number, 'one of {...}', a range, or a map per layer",
            v.span,
            hint="e.g. sparsity: 0..0.5 step 0.1, or sparsity: {qkv: 0.25, fc1: 0.5}",
        )
    out: dict[str, tuple[float, ...]] = {}
    for entry in v.entries:
        layer = entry.layer.value
        if layer not in LAYERS:
            raise SpecError(f"unknown layer '{layer}'", entry.layer.span, hint=did_you_mean(layer, LAYERS))
        if layer in out:
            raise SpecError(f"layer '{layer}' is listed twice", entry.layer.span)
        out[layer] = _densities(entry.values)
    return out


def _where(geo: Geometry, block: int) -> str:
    b = geo.blocks[block]
    return f"block {block}, stage {b.stage}" if geo.family == "swin" else f"block {block}"


def _apply(choice: ast.Choice, draft: _Draft, geo: Geometry, block: int) -> list[str]:
    """Apply one choice to one block; return the group paths it set."""
    b = geo.blocks[block]
    field = choice.field
    if choice.joint is not None:
        assert isinstance(choice.value, ast.Pair)  # the grammar gives a joint choice a pair of number sets
        draft.heads = _ints(choice.value.left, 1, b.heads, "heads", _where(geo, block))
        draft.head_dim = _ints(choice.value.right, 1, b.head_dim, "head_dim", _where(geo, block))
        draft.joint = True
        return [block_path(block, "heads"), block_path(block, "head_dim")]
    if field == "attention":
        draft.attention = _attention(choice)
    elif field == "ffn":
        draft.ffn = _ffn(choice, b.hidden, b.dim)
    elif field == "heads":
        draft.heads = _ints(choice.value, 1, b.heads, "heads", _where(geo, block))
        draft.joint = False  # a plain declaration replaces its side and ends the joint choice
    elif field == "head_dim":
        draft.head_dim = _ints(choice.value, 1, b.head_dim, "head_dim", _where(geo, block))
        draft.joint = False
    elif field == "sparsity":
        layers = _sparsity(choice)
        draft.density.update(layers)
        return [block_path(block, layer) for layer in layers]
    else:
        raise SpecError(f"unknown field '{field}'", choice.field_span, hint=did_you_mean(field, FIELDS))
    return [block_path(block, field)]


JOINT = ("heads", "head_dim")  # the one pair of fields a joint choice may name, in this order


def _joint_names(choice: ast.Choice) -> None:
    """A joint choice names ``heads x head_dim``; anything else is a located error."""
    assert choice.joint is not None
    pair = (choice.field, choice.joint.value)
    if pair == JOINT:
        return
    if set(pair) == set(JOINT):
        raise SpecError(
            f"write the joint choice as 'heads x head_dim', not '{choice.label}'",
            choice.field_span,
            hint="the left number set is the head counts, the right one the per-head widths",
        )
    wrong, span, want = (
        (choice.field, choice.field_span, "heads")
        if choice.field != "heads"
        else (choice.joint.value, choice.joint.span, "head_dim")
    )
    close = did_you_mean(wrong, [want])
    hint = (
        close
        if close.startswith("did you mean")
        else f"declare '{wrong}' on its own line ('{wrong}: ...')"
        if wrong in FIELDS
        else "the pair is 'heads x head_dim'"
    )
    raise SpecError(
        f"'{choice.label}' cannot be searched jointly: the one joint choice is 'heads x head_dim'",
        span,
        hint=hint,
    )


def _stage_embed(scope: ast.Scope, choice: ast.Choice, geo: Geometry) -> tuple[int, tuple[int, ...]]:
    """``stage S { embed: ... }``: the candidate residual widths of one Swin stage."""
    if geo.family != "swin":
        raise SpecError(
            "a ViT has one embedding width: declare it at the top level",
            choice.field_span,
            hint=f"write 'embed: ...' outside any block declaration (dense width {geo.embed_dim})",
        )
    if scope.selector.form != "stage":
        raise SpecError(
            "an embedding width belongs to a whole stage",
            scope.selector.span,
            hint="declare it in 'stage S { embed: ... }'",
        )
    stage = scope.selector.stage
    assert stage is not None
    select(scope.selector, geo)  # the stage exists
    return stage, _widths(choice.value, geo.stage_dim(stage), f"stage {stage}")


def _plans(
    spec: ast.Spec, items: list[Any], geo: Geometry
) -> tuple[tuple[BlockPlan, ...], dict[int, tuple[int, ...]], dict[str, Span], list[SpecWarning]]:
    drafts = [
        _Draft(("msa",), FfnChoice(widths=(b.hidden,)), (b.heads,), (b.head_dim,), {}) for b in geo.blocks
    ]
    stage_embed: dict[int, tuple[int, ...]] = {}
    origins: dict[str, Span] = {}
    origin_sel: dict[str, tuple[ast.Selector, str]] = {}
    warnings: list[SpecWarning] = []
    for scope in (i for i in items if i.kind == "scope"):
        blocks = select(scope.selector, geo)
        seen: dict[str, ast.Choice] = {}
        for choice in scope.choices:
            if choice.joint is not None:
                _joint_names(choice)
            for name in JOINT if choice.joint is not None else (choice.field,):
                if name in seen:
                    raise SpecError(
                        f"'{name}' is set twice in this declaration (first at line {seen[name].span.line})",
                        choice.field_span,
                    )
                seen[name] = choice
            if choice.field == "embed":
                stage, widths = _stage_embed(scope, choice, geo)
                stage_embed[stage] = widths
                paths = [embed_path(geo, stage)]
            else:
                paths = [path for i in blocks for path in _apply(choice, drafts[i], geo, i)]
            for key in paths:
                _conflict(scope, choice, origin_sel.get(key), origins.get(key), len(blocks), warnings)
                origins[key] = choice.span
                origin_sel[key] = (scope.selector, scope.selector.span.path)
    plans = tuple(
        BlockPlan(b, d.attention, d.ffn, d.heads, d.head_dim, DensityChoice(**d.density), d.joint)
        for b, d in zip(geo.blocks, drafts, strict=True)
    )
    return plans, stage_embed, origins, warnings


def _conflict(
    scope: ast.Scope,
    choice: ast.Choice,
    prev: tuple[ast.Selector, str] | None,
    prev_span: Span | None,
    n_blocks: int,
    warnings: list[SpecWarning],
) -> None:
    """Same file, same selector, same field: a conflict. A broader later declaration over a narrower one: a warning."""
    if prev is None or prev_span is None or prev[1] != scope.selector.span.path:
        return
    sel = scope.selector
    if (prev[0].form, prev[0].stage, prev[0].start, prev[0].stop) == (
        sel.form,
        sel.stage,
        sel.start,
        sel.stop,
    ):
        raise SpecError(
            f"'{choice.label}' of these blocks is already declared at line {prev_span.line}",
            choice.field_span,
            hint="merge the two declarations, or derive a variant with 'extends'",
        )
    narrower = prev[0].form in ("block", "stage_block") or (
        prev[0].form.endswith("range") and sel.form in ("all", "stage")
    )
    msg = f"this '{choice.label}' overrides the more specific declaration at line {prev_span.line}"
    if narrower and n_blocks > 1 and not any(w.message == msg for w in warnings):
        warnings.append(
            SpecWarning(msg, choice.field_span, hint="declarations apply in order: put general ones first")
        )


# ---------------------------------------------------------------- embed, budget, search, frozen
def _widths(value: ast.ChoiceValue, dense: int, where: str) -> tuple[int, ...]:
    if not isinstance(value, ast.NumSet):
        raise SpecError(
            "embed takes a width, 'one of {...}' or a range", value.span, hint="e.g. embed: 192..384 step 12"
        )
    values, span = expand(value, what="embedding widths", integer=True)
    for x in values:
        if not 1 <= x <= dense:
            raise SpecError(
                f"embedding width {int(x)} is outside 1..{dense} (the dense width of {where})", span
            )
    return tuple(sorted({int(x) for x in values}))


def _embed(
    items: list[Any], geo: Geometry, stage_embed: dict[int, tuple[int, ...]]
) -> tuple[tuple[int, ...], ...]:
    """The candidate residual widths of every stage: a ViT's top-level ``embed``, a Swin's ``stage S { embed }``."""
    embeds = [i for i in items if i.kind == "embed"]
    if embeds and geo.family == "swin":
        raise SpecError(
            "a Swin backbone has one embedding width per stage",
            embeds[-1].span,
            hint="declare them in stage declarations, e.g. 'stage 0 { embed: 64..96 step 16 }'",
        )
    if embeds:
        return (_widths(embeds[-1].value, geo.embed_dim, geo.model),)
    return tuple(stage_embed.get(s, (geo.stage_dim(s),)) for s in range(geo.stages))


def _budgets(
    spec: ast.Spec, items: list[Any]
) -> tuple[tuple[BudgetItem, ...], str | None, LatencySetting | None]:
    _own(spec, "budget")
    blocks = [i for i in items if i.kind == "budget"]
    if not blocks:
        return (), None, None
    budget = blocks[-1]  # a derived spec's budget replaces its base's
    out: list[BudgetItem] = []
    seen: dict[tuple[str, bool], ast.Constraint] = {}
    for c in budget.constraints:
        if c.metric not in METRICS:
            raise SpecError(
                f"unknown budget metric '{c.metric}'", c.metric_span, hint=did_you_mean(c.metric, METRICS)
            )
        try:
            limit = to_limit(c.metric, c.limit.value, c.limit.unit, c.limit.text)
        except UnitError as exc:
            raise SpecError(str(exc), c.limit.span, hint=exc.hint) from None
        key = (c.metric, limit.relative)
        if key in seen:
            raise SpecError(
                f"a second {'relative ' if limit.relative else ''}{c.metric} budget (the first is at line "
                f"{seen[key].span.line})",
                c.span,
                hint="keep the tighter one",
            )
        seen[key] = c
        out.append(BudgetItem(limit, c.limit.span))
    convention = None
    measured: dict[str, Any] = {}
    for s in budget.settings:
        if s.key not in BUDGET_SETTINGS:
            raise SpecError(
                f"unknown budget setting '{s.key}'", s.key_span, hint=did_you_mean(s.key, BUDGET_SETTINGS)
            )
        if s.key == "convention":
            if not isinstance(s.value, ast.Name) or s.value.value not in ("paper", "exact"):
                raise SpecError("convention is 'paper' or 'exact'", s.value.span)
            convention = s.value.value
            continue
        if not any(c.metric == "latency" for c in budget.constraints):
            raise SpecError(
                f"budget setting '{s.key}' says where a latency budget is measured, and this budget has none",
                s.key_span,
                hint="add one, e.g. latency <= 8ms, or remove the setting",
            )
        measured[s.key] = _latency_setting(s)
    latency = LatencySetting(**measured) if "latency" in {c.metric for c in budget.constraints} else None
    return tuple(out), convention, latency


def _latency_setting(s: ast.Setting) -> object:
    """The value of a budget's ``device`` / ``threads`` / ``batch`` / ``precision`` setting."""
    choices = {"device": DEVICES, "precision": PRECISIONS}
    if s.key in choices:
        if not isinstance(s.value, ast.Name) or s.value.value not in choices[s.key]:
            raise SpecError(f"{s.key} is one of {', '.join(choices[s.key])}", s.value.span)
        return s.value.value
    limit = 4096 if s.key == "batch" else 1024
    v = s.value
    if not isinstance(v, ast.Num) or v.unit or v.value != int(v.value) or not 1 <= v.value <= limit:
        raise SpecError(f"{s.key} is a whole number in 1..{limit}", v.span)
    return int(v.value)


def _search(spec: ast.Spec, items: list[Any]) -> SearchSettings:
    _own(spec, "search")
    strategy, strategy_span = "spvit", None
    settings: dict[str, ast.Setting] = {}
    for s in (i for i in items if i.kind == "search"):
        if s.strategy is not None:
            if (
                s.strategy != strategy
            ):  # a derived spec switching strategy: the base's settings were for the other
                settings = {}
            strategy, strategy_span = s.strategy, s.strategy_span
        for st in s.settings:
            settings[st.key] = st
    try:
        info = STRATEGIES.get(strategy)
    except UnknownName as exc:
        raise SpecError(
            f"unknown search strategy '{strategy}'", strategy_span, hint=exc.hint or None
        ) from None
    values = {k: p.default for k, p in info.settings().items()}
    spans: dict[str, Span] = {}
    for key, st in settings.items():
        values[key] = setting_value(st, info)
        spans[key] = st.value.span
    pair = info.misordered(values)
    if pair is not None:
        low, high = pair
        raise SpecError(
            f"'{low}' ({values[low]}) must not exceed '{high}' ({values[high]})",
            spans.get(high) or spans.get(low) or strategy_span,
            hint=f"{high}: {info.settings()[high].doc}",
        )
    if "data" in values:
        check_data(values, spans, strategy_span)
    return SearchSettings(strategy, values, spans)


MAX_SETTING = 1e9  # no count, rate or weight of a search is larger


def setting_value(st: ast.Setting, info: StrategyInfo) -> SettingValue:
    """A ``search`` setting checked against the strategy's table (type, range, choices); SpecError at the value."""
    table = info.settings()
    if st.key not in table:
        what = {"data_free": "reads no data and trains nothing", "score": "scores units and trains nothing"}
        hint = did_you_mean(st.key, table)
        own = ", ".join(sorted(info.params)) or "none"
        owners = sorted(
            n for n in STRATEGIES.names() if n != info.name and st.key in STRATEGIES.get(n).settings()
        )
        if st.key in RETIRED:
            hint = f"'{st.key}' was retired: {RETIRED[st.key]}"
        elif st.key in SETTINGS["train"] and info.kind in what:
            hint = f"'{info.name}' {what[info.kind]}; its settings: {', '.join(sorted(table))}"
        elif owners:  # another strategy's setting (gate_lr for ofb, warmup_epochs for ofb, ...)
            hint = f"'{st.key}' is a setting of {', '.join(owners)}; '{info.name}' adds: {own}"
        elif not hint.startswith("did you mean"):
            hint = f"'{info.name}' adds: {own} (and the settings of every {info.kind.replace('_', '-')} strategy)"
        raise SpecError(f"unknown setting '{st.key}' for strategy '{info.name}'", st.key_span, hint=hint)
    param = table[st.key]
    value = _plain(st.value)
    if param.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if param.type is bool and isinstance(st.value, ast.Name) and st.value.value in ("true", "false"):
        return st.value.value == "true"
    if param.type is str and isinstance(st.value, ast.Name | ast.Str):
        if param.choices and st.value.value not in param.choices:
            raise SpecError(
                f"'{st.key}' takes one of {', '.join(param.choices)}, found '{st.value.value}'",
                st.value.span,
                hint=did_you_mean(st.value.value, param.choices) or param.doc,
            )
        return st.value.value
    if not isinstance(value, param.type) or (param.type is int and isinstance(value, float)):
        raise SpecError(
            f"'{st.key}' takes "
            + (
                "true or false"
                if param.type is bool
                else f"one of {', '.join(param.choices)}"
                if param.choices
                else f"{param.type.__name__} values"
            )
            + f", found {_describe(st.value)}",
            st.value.span,
            hint=param.doc,
        )
    assert isinstance(value, int | float | str | bool)  # param.type is one of these
    if param.type in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise SpecError(f"'{st.key}' must be a finite number", st.value.span, hint=param.doc)
        if value < 0:
            raise SpecError(f"'{st.key}' must not be negative", st.value.span)
        if value > MAX_SETTING:
            raise SpecError(
                f"'{st.key}' = {value:.3g} is beyond any run (at most {MAX_SETTING:.0e})",
                st.value.span,
                hint=param.doc,
            )
        if param.bounds is not None and not param.bounds[0] <= value <= param.bounds[1]:
            lo, hi = param.bounds
            raise SpecError(
                f"'{st.key}' takes values from {lo:g} to {hi:g}, found {value:g}",
                st.value.span,
                hint=param.doc,
            )
    return value


def _describe(v: ast.Value) -> str:
    return {"num": "a number", "str": "a string", "name": "a name", "tuple": "a tuple"}[v.kind] + (
        f" '{v.text}'"
        if isinstance(v, ast.Num)
        else f" '{v.value}'"
        if isinstance(v, ast.Name | ast.Str)
        else ""
    )


def _frozen(spec: ast.Spec) -> dict[str, object] | None:
    headers = _own(spec, "frozen")
    if not headers:
        return None
    out: dict[str, object] = {}
    for s in headers[0].settings:
        v = s.value
        out[s.key] = v.text if isinstance(v, ast.Num) else _plain(v)
    return out


def _first_open(space: Space, origins: dict[str, Span]) -> tuple[str, Span | None] | None:
    """The first group of a frozen spec that still has several candidates: its display name and declaration."""
    for grp in groups(space):
        if grp.decision:
            if grp.kind == "embed":
                return grp.path, origins.get(grp.path)
            field = "sparsity" if grp.kind == "weights" else grp.kind
            return f"blocks[{grp.block}].{field}", origins.get(grp.path)
    return None


# ---------------------------------------------------------------- a strategy's default grids
def _strategy_span(items: list[Any]) -> Span:
    """Where the effective strategy is named (``search ofb``; with ``extends``, possibly in a base file)."""
    named = [i for i in items if i.kind == "search" and i.strategy is not None]
    return named[-1].strategy_span if named else Span()


def _ofb_defaults(space: Space, declared_embed: set[int], origins: dict[str, Span], span: Span) -> Space:
    """OFB's grids (:mod:`spvit_dsl.space.defaults`) for every dimension the spec leaves undeclared.

    Per stage (embedding width) and per block and field (heads, head_dim, ffn): a declaration, even of a single
    value, keeps its candidates. Heads and per-head width filled together form one joint choice. The filled groups
    get ``span`` (the strategy's name) as their origin."""
    geo = space.geometry
    embed = list(space.embed)
    for s in range(geo.stages):
        if s not in declared_embed and geo.global_pool != "map":  # an attention-pool head keeps its width
            embed[s] = defaults.ofb_embed(geo.stage_dim(s))
            origins[embed_path(geo, s)] = span
    plans = []
    for p in space.plans:
        b, i = p.geom, p.geom.index
        open_ = {f for f in ("heads", "head_dim", "ffn") if block_path(i, f) not in origins}
        changes: dict[str, Any] = {}
        if "heads" in open_:
            changes["heads"] = defaults.ofb_heads(b.heads)
        if "head_dim" in open_:
            changes["head_dim"] = defaults.ofb_head_dim(b.head_dim)
        if {"heads", "head_dim"} <= open_:
            changes["joint"] = True
        if "ffn" in open_:
            changes["ffn"] = FfnChoice(widths=defaults.ofb_ffn(b.hidden))
        for f in open_:
            origins[block_path(i, f)] = span
        plans.append(replace(p, **changes))
    return replace(space, plans=tuple(plans), embed=tuple(embed))


# strategy → the function that fills its default grids where a (non-frozen) spec declares nothing
STRATEGY_DEFAULTS: dict[str, Callable[[Space, set[int], dict[str, Span], Span], Space]] = {
    "ofb": _ofb_defaults
}


# ---------------------------------------------------------------- the stage
def check(spec: ast.Spec, *, loader: Loader = read_file, source: str | None = None) -> Checked:
    """Validate a parsed spec and resolve it into a :class:`Checked` space."""
    sources = {spec.path: source} if source is not None else {}
    items = _flatten(spec, loader, sources, (os.path.normpath(spec.path),))
    _own(spec, "embed")
    model, model_span, settings = _merge_backbone(spec, items)
    geo = _geometry(model, model_span, settings)
    weights, weights_span = _weights(settings, spec.path)
    plans, stage_embed, origins, warnings = _plans(spec, items, geo)
    if weights == "pretrained":
        warnings += _pretrained(model, geo, settings, model_span, weights_span)
    embed = _embed(items, geo, stage_embed)
    space = Space(geo, plans, embed)
    budgets, convention, latency = _budgets(spec, items)
    search = _search(spec, items)
    frozen = _frozen(spec)
    if search.strategy in STRATEGY_DEFAULTS and frozen is None:  # a frozen spec is exactly its point
        declared_embed = set(stage_embed) | ({0} if any(i.kind == "embed" for i in items) else set())
        space = STRATEGY_DEFAULTS[search.strategy](space, declared_embed, origins, _strategy_span(items))
    if geo.global_pool == "map" and space.embed[0] != (geo.embed_dim,):
        raise SpecError(
            f"{geo.model} pools with an attention-pool (MAP) head, whose width spvit-dsl does not prune yet: its "
            "embedding width cannot be searched",
            next((i.span for i in reversed(items) if i.kind == "embed"), None) or _strategy_span(items),
            hint=f"keep it dense: embed: {geo.embed_dim}",
        )
    if frozen is not None:
        open_ = _first_open(space, origins)
        if open_ is not None:
            raise SpecError(
                f"a frozen spec must fix every choice, but {open_[0]} is still open",
                open_[1] or headers_span(spec),
                hint="give exactly one candidate per field",
            )
    return Checked(
        spec,
        space,
        weights,
        weights_span,
        budgets,
        convention,
        search,
        frozen,
        origins,
        model,
        tuple(settings.values()),
        warnings,
        sources,
        latency,
    )


def headers_span(spec: ast.Spec) -> Span:
    f = spec.first("frozen")
    return f.span if f is not None else spec.span
