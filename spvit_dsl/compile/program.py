"""The front-end driver: text → parse → check → build_graph → budget feasibility → :class:`Program`.

``compile_file`` is what ``spvit-dsl compile`` and every later command start from. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..lang import ast
from ..lang.errors import SpecError, SpecWarning, UsageError
from ..lang.parse import parse
from ..space.groups import FIELDS
from ..space.latency import LatencySetting
from ..space.plan import Convention, Space
from ..space.units import Limit, fmt_macs, fmt_metric, fmt_params
from .check import BudgetItem, Checked, check, read_file
from .graph import Bounds, SearchGraph, build_graph
from .strategies import StrategyInfo

DEFAULT_CONVENTION: Convention = "paper"


@dataclass(frozen=True)
class Budget:
    """A budget resolved against the space: its absolute limit and whether some network meets it."""

    limit: Limit
    absolute: float  # MACs, parameters or milliseconds
    feasible: bool
    span: Any = None  # Span in the spec, None when given on the command line
    # a frozen spec read in another convention: the one its budget was checked in (its own)
    checked_in: str = ""
    share: str = ""  # a latency budget given as a share of the dense network's, once resolved: what it was

    @property
    def metric(self) -> str:
        return self.limit.metric

    @property
    def pending(self) -> bool:
        """A share of the dense latency not yet resolved (no table read yet: :meth:`Program.with_latency`)."""
        return self.metric == "latency" and self.limit.relative

    def describe(self) -> str:
        if self.pending:
            return f"latency <= {self.limit.text} (of the dense network's predicted latency)"
        if self.share:
            return f"latency <= {self.limit.text} ({self.share})"
        value = fmt_metric(self.metric, self.absolute)
        return f"{self.metric} <= {self.limit.text}" + (f" ({value})" if self.limit.relative else "")


@dataclass
class Program:
    checked: Checked
    graph: SearchGraph
    convention: Convention
    budgets: tuple[Budget, ...]
    source: str
    warnings: list[SpecWarning] = field(default_factory=list)

    @property
    def spec(self) -> ast.Spec:
        return self.checked.spec

    @property
    def space(self) -> Space:
        return self.checked.space

    @property
    def latency(self) -> LatencySetting | None:
        """Where the latency budget is measured (the budget block's settings, defaults for a ``--budget 8ms``
        flag); ``None`` when no budget is a latency."""
        if not any(b.metric == "latency" for b in self.budgets):
            return None
        return self.checked.latency or LatencySetting()

    @property
    def path(self) -> str:
        return self.checked.spec.path

    def bounds(self, convention: Convention | None = None) -> Bounds:
        return self.graph.bounds(convention or self.convention)

    @property
    def decisions(self) -> int:
        return len(self.graph.decisions())

    @property
    def frozen(self) -> bool:
        return self.decisions == 0

    @property
    def feasible(self) -> bool:
        return all(b.feasible for b in self.budgets)

    def with_latency(self, table: Any) -> Program:
        """This program with every latency budget given as a share (``latency <= 60%``) turned into milliseconds:
        the share of the dense network's latency as ``table`` (a :class:`~spvit_dsl.space.latency.LatencyTable` of
        this space, or None) predicts it. The frozen spec then records the milliseconds. Raises
        :class:`UsageError` when the table cannot price the dense network (the space's embedding widths stop below
        the backbone's)."""
        if table is None or not any(b.pending for b in self.budgets):
            return self
        g = self.space.geometry
        try:
            dense = table.arch_ms(g, self.space.dense())
        except (KeyError, ValueError):
            raise UsageError(
                "a latency budget given as a share of the dense network needs the dense network in the latency "
                "table, and this space's embedding widths stop below the backbone's: write milliseconds "
                f"('spvit-dsl latency {self.path}' prints the space's predictions)"
            ) from None
        out = []
        for b in self.budgets:
            if b.pending:
                ms = b.limit.value * dense
                limit = Limit("latency", ms, False, f"{ms:.6g}ms")
                share = f"{b.limit.text} of the dense network's predicted {dense:.4g} ms"
                b = replace(b, limit=limit, absolute=ms, share=share)
            out.append(b)
        return replace(self, budgets=tuple(out))

    def summary(self) -> dict[str, Any]:
        """The ``compile --json`` object."""
        b = self.bounds()
        g = self.space.geometry
        return {
            "spec": self.path,
            "backbone": g.model,
            "family": g.family,
            "convention": self.convention,
            "frozen": self.frozen,
            "decisions": self.decisions,
            "space_size_log10": round(self.graph.size_log10(), 4),
            "flops": {k: round(getattr(b.macs, k) / 1e9, 6) for k in ("min", "max", "dense")},
            "params": {k: round(getattr(b.params, k) / 1e6, 6) for k in ("min", "max", "dense")},
            "budgets": [_budget_json(x) for x in self.budgets],
            **({"latency_setting": self.latency.as_dict()} if self.latency else {}),
            "feasible": self.feasible,
        }


def _budget_json(b: Budget) -> dict[str, Any]:
    lim = b.limit
    if b.pending:  # a share of the dense latency: milliseconds once a table is read
        return {"metric": "latency", "limit": round(lim.value * 100, 6), "unit": "%", "absolute": None}
    if lim.metric == "latency":  # predicted at search time; compile knows only the limit
        return {
            "metric": "latency",
            "limit": round(lim.value, 6),
            "unit": "ms",
            "absolute": round(lim.value, 6),
        }
    if lim.relative:
        limit, unit = round(lim.value * 100, 6), "%"
    else:
        limit, unit = (
            (round(lim.value / 1e9, 6), "G") if lim.metric == "flops" else (round(lim.value / 1e6, 6), "M")
        )
    absolute = b.absolute / 1e9 if lim.metric == "flops" else b.absolute / 1e6
    return {
        "metric": lim.metric,
        "limit": limit,
        "unit": unit,
        "absolute": round(absolute, 6),
        "feasible": b.feasible,
    } | ({"checked_in": b.checked_in} if b.checked_in else {})


def compile_text(
    text: str,
    path: str = "<string>",
    *,
    convention: Convention | None = None,
    budgets: list[Limit] | None = None,
    loader: Any = read_file,
) -> Program:
    """Compile spec text. ``budgets`` (from ``--budget`` flags) replace the spec's budgets of the same metric."""
    try:
        checked = check(parse(text, path), loader=loader, source=text)
        graph = build_graph(checked.space)
        conv: Convention = convention or checked.convention or DEFAULT_CONVENTION  # type: ignore[assignment]
        items = _merge_budgets(checked.budgets, budgets or [])
        own: Convention = checked.convention or DEFAULT_CONVENTION  # type: ignore[assignment]
        if checked.frozen is not None and conv != own:
            resolved, warnings = _frozen_budgets(items, graph, own, conv)
        else:
            resolved, warnings = _resolve_budgets(items, graph.bounds(conv), conv)
    except SpecError as exc:
        raise exc.with_source(text) if exc.span is None or exc.span.path == path else exc from None
    warnings += _unsupported(checked, graph) + _blind(checked)
    return Program(checked, graph, conv, tuple(resolved), text, checked.warnings + warnings)


def _blind(checked: Checked) -> list[SpecWarning]:
    """A ViT space where no block can run msa: its class token never reads the image (see ``reads_image``)."""
    space = checked.space
    g = space.geometry
    if g.reads_patches or any("msa" in p.attention for p in space.plans):
        return []
    return [
        SpecWarning(
            "no block can run msa: the class token reads the image only through attention, so every image gets "
            "the same logits",
            checked.origins.get("blocks.0.attention"),
            hint="allow msa in at least one block, e.g. attention: one of {conv3x3, msa}",
        )
    ]


def _unsupported(checked: Checked, graph: SearchGraph) -> list[SpecWarning]:
    """Decisions the chosen strategy cannot search: fine to compile and price, refused by ``search``."""
    from .strategies import STRATEGIES  # noqa: PLC0415

    info = STRATEGIES.get(checked.search.strategy)
    kinds = unsearchable(info, graph)
    if not kinds:
        return []
    return [
        SpecWarning(
            f"strategy '{info.name}' does not search {', '.join(kinds)}; the space compiles and is priced, "
            f"but 'spvit-dsl search' will refuse it",
            None,
            hint=f"'{info.name}' searches: {', '.join(sorted(FIELDS[k] for k in info.decisions))}",
        )
    ]


def unsearchable(info: StrategyInfo, graph: SearchGraph) -> list[str]:
    """The fields (as the language names them) a space decides that ``info``'s strategy cannot search."""
    return sorted({FIELDS[d.kind] for d in graph.decisions() if d.kind not in info.decisions})


def compile_file(path: str, **kw: Any) -> Program:
    try:
        text = read_file(path)
    except OSError as exc:
        raise UsageError(f"cannot read spec '{path}': {exc.strerror or exc}") from None
    return compile_text(text, path, **kw)


def _merge_budgets(items: tuple[BudgetItem, ...], flags: list[Limit]) -> list[tuple[Limit, Any]]:
    out = [(b.limit, b.span) for b in items if b.limit.metric not in {f.metric for f in flags}]
    return out + [(f, None) for f in flags]


def _frozen_budgets(
    items: list[tuple[Limit, Any]], graph: SearchGraph, own: Convention, conv: Convention
) -> tuple[list[Budget], list[SpecWarning]]:
    """A frozen spec read in another convention than its own (``compile FROZEN --convention exact``): its FLOPs
    budgets were met in ``own``, the convention the search priced, so they are checked there; each is carried into
    ``conv`` at this one network's own ratio of the two (it meets the carried limit exactly when it meets its own),
    so the flag changes what is shown, never the verdict."""
    resolved, warnings = _resolve_budgets(items, graph.bounds(own), own)
    ratio = graph.bounds(conv).of("flops").min / graph.bounds(own).of("flops").min
    carried = [
        replace(b, absolute=b.absolute * ratio, checked_in=own) if b.limit.metric == "flops" else b
        for b in resolved
    ]
    return carried, warnings


def _resolve_budgets(
    items: list[tuple[Limit, Any]], bounds: Bounds, conv: Convention
) -> tuple[list[Budget], list[SpecWarning]]:
    out, warnings = [], []
    for limit, span in items:
        if (
            limit.metric == "latency"
        ):  # priced by a measured table, at search time (spvit_dsl.compact.latency)
            # a share of the dense latency stays pending (NaN) until Program.with_latency reads the table
            out.append(Budget(limit, float("nan") if limit.relative else limit.value, True, span))
            continue
        rng = bounds.of(limit.metric)
        absolute = limit.absolute(rng.dense)
        fmt = fmt_macs if limit.metric == "flops" else fmt_params
        unit = f" ({conv} convention)" if limit.metric == "flops" else ""
        if absolute < rng.min * (1 - 1e-12):
            over = (
                f"{(rng.min / absolute - 1) * 100:.3g}% over {fmt(absolute)}" if absolute > 0 else "over it"
            )
            if rng.min == rng.max:  # one network: a frozen spec (perhaps edited by hand)
                msg = f"budget {limit.metric} <= {limit.text} is not met: this network costs {fmt(rng.min)}{unit}, {over}"
                hint = "relax or remove the budget (a hand edit of a frozen spec may cost more than it was searched for)"
            else:
                msg = (
                    f"budget {limit.metric} <= {limit.text} cannot be met: the cheapest network in this space "
                    f"costs {fmt(rng.min)}{unit}, {over}"
                )
                hint = "widen the search space (smaller widths, a skip op, more sparsity) or relax the budget"
            if span is None:
                raise UsageError(msg + "; " + hint)
            raise SpecError(msg, span, hint=hint)
        if absolute >= rng.dense:
            warnings.append(
                SpecWarning(
                    f"budget {limit.metric} <= {limit.text} is at or above the dense network's {fmt(rng.dense)}{unit}: "
                    "every network in the space meets it",
                    span,
                )
            )
        out.append(Budget(limit, absolute, True, span))
    return out, warnings
