"""The typed AST of a `.vit` spec: frozen pydantic models, every node with a :class:`Span`.

Stage: produced by :func:`spvit_dsl.lang.parse.parse`, consumed by :func:`spvit_dsl.compile.check.check` and
:func:`spvit_dsl.lang.emit.emit`. Nodes hold data only; behaviour lives in the stages. Sequences are tuples and node
families are discriminated unions on ``kind``. Comments ride along on the statements they precede
(``comments``) or end (``trailing``) so that ``spvit-dsl fmt`` keeps them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import Span


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    span: Span = Field(default_factory=Span)


class Commented(Node):
    comments: tuple[str, ...] = ()  # whole-line comments right before the statement (without "//")
    trailing: str | None = None  # a comment at the end of the statement's last line


# ---------------------------------------------------------------- values
class Num(Node):
    """A number as written, with its optional unit suffix (``3.3G`` → value 3.3, unit "G")."""

    kind: Literal["num"] = "num"
    text: str
    value: float
    unit: str = ""

    @property
    def is_int(self) -> bool:
        return (
            not self.unit
            and math.isfinite(self.value)  # 1e309 and 400-digit integers overflow to infinity
            and self.value == int(self.value)
            and "." not in self.text
            and "e" not in self.text.lower()
        )


class Str(Node):
    kind: Literal["str"] = "str"
    value: str


class Name(Node):
    kind: Literal["name"] = "name"
    value: str


class TupleV(Node):
    kind: Literal["tuple"] = "tuple"
    items: tuple[Value, ...]


Value = Annotated[Num | Str | Name | TupleV, Field(discriminator="kind")]
TupleV.model_rebuild()


class Setting(Commented):
    """``key = value`` inside backbone, search, budget and frozen blocks."""

    key: str
    key_span: Span = Field(default_factory=Span)
    value: Value


# ---------------------------------------------------------------- choice values
class NumSet(Node):
    """A set of numbers: one number, an explicit list, or an inclusive range with a step."""

    kind: Literal["numset"] = "numset"
    form: Literal["one", "list", "range"]
    items: tuple[Num, ...] = ()  # one / list
    start: Num | None = None  # range
    stop: Num | None = None
    step: Num | None = None  # None: step 1


class Words(Node):
    """An op name, or ``one of {a, b, ...}``."""

    kind: Literal["words"] = "words"
    words: tuple[Name, ...]
    one_of: bool = False


class FfnSpec(Node):
    """The FFN forms: ``ratios S``, ``ratio R``, ``widths S``, ``width W``, ``per neuron``, ``groups of N``."""

    kind: Literal["ffn"] = "ffn"
    form: Literal["ratios", "ratio", "widths", "width", "neuron", "groups"]
    values: NumSet | None = None  # ratios / widths
    number: Num | None = None  # ratio / width / groups


class LayerValues(Node):
    """One entry of a per-layer map: a layer name (qkv, proj, fc1, fc2) and its number set."""

    layer: Name
    values: NumSet


class LayerMap(Node):
    """``{qkv: S, proj: S, fc1: S, fc2: S}``: values per sparsifiable layer (any subset of the four)."""

    kind: Literal["layers"] = "layers"
    entries: tuple[LayerValues, ...]


class Pair(Node):
    """The value of a joint choice ``heads x head_dim: L x R``: one number set per field, searched as one choice
    over their product."""

    kind: Literal["pair"] = "pair"
    left: NumSet
    right: NumSet


ChoiceValue = Annotated[NumSet | Words | FfnSpec | LayerMap | Pair, Field(discriminator="kind")]


class Choice(Commented):
    """``field: value`` inside a scope (attention, ffn, heads, head_dim, sparsity, embed), or a joint choice
    ``field x joint: left x right`` (``heads x head_dim``), whose value is a :class:`Pair`."""

    field: str
    field_span: Span = Field(default_factory=Span)
    joint: Name | None = None  # the second field of a joint choice (``head_dim``), with its span
    value: ChoiceValue

    @property
    def label(self) -> str:
        """The left-hand side as written canonically: ``heads`` or ``heads x head_dim``."""
        return self.field if self.joint is None else f"{self.field} x {self.joint.value}"


class Selector(Node):
    """Which blocks a scope applies to. Ranges are inclusive at both ends; ``stage`` numbers Swin stages."""

    form: Literal["all", "range", "block", "stage", "stage_range", "stage_block"]
    stage: int | None = None
    start: int | None = None
    stop: int | None = None


class Scope(Commented):
    kind: Literal["scope"] = "scope"
    selector: Selector
    choices: tuple[Choice, ...] = ()


# ---------------------------------------------------------------- top-level items
class Extends(Commented):
    kind: Literal["extends"] = "extends"
    path: str


class Backbone(Commented):
    kind: Literal["backbone"] = "backbone"
    model: str | None = None
    model_span: Span = Field(default_factory=Span)
    settings: tuple[Setting, ...] = ()


class Embed(Commented):
    kind: Literal["embed"] = "embed"
    value: ChoiceValue


class Constraint(Commented):
    metric: str
    metric_span: Span = Field(default_factory=Span)
    limit: Num


class Budget(Commented):
    kind: Literal["budget"] = "budget"
    constraints: tuple[Constraint, ...] = ()
    settings: tuple[Setting, ...] = ()


class Search(Commented):
    kind: Literal["search"] = "search"
    strategy: str | None = None
    strategy_span: Span = Field(default_factory=Span)
    settings: tuple[Setting, ...] = ()


class Frozen(Commented):
    """The provenance header of a frozen spec (source, strategy, budget, achieved cost, seed, date, ...)."""

    kind: Literal["frozen"] = "frozen"
    settings: tuple[Setting, ...] = ()


Item = Annotated[Extends | Backbone | Embed | Scope | Budget | Search | Frozen, Field(discriminator="kind")]


class Spec(Node):
    """A whole file: its items in source order (order matters for scopes), plus comments at the end."""

    path: str = "<string>"
    items: tuple[Item, ...] = ()
    end_comments: tuple[str, ...] = ()

    def first(self, kind: str) -> Any:
        return next((i for i in self.items if i.kind == kind), None)

    def all(self, kind: str) -> list[Any]:
        return [i for i in self.items if i.kind == kind]


def strip_spans(obj: Any) -> Any:
    """A plain structure of a node without spans or path, for comparisons that ignore positions."""
    if isinstance(obj, BaseModel):
        return {
            k: strip_spans(getattr(obj, k))
            for k in type(obj).model_fields
            if not k.endswith("span") and k != "path"
        } | {"__type__": type(obj).__name__}
    if isinstance(obj, tuple | list):
        return [strip_spans(x) for x in obj]
    return obj


def same(a: Node, b: Node) -> bool:
    """Structural equality ignoring positions (the law ``parse(emit(spec)) == spec``)."""
    return strip_spans(a) == strip_spans(b)
