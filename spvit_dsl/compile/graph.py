"""Stage 3 — build_graph: :class:`Space` → :class:`SearchGraph`, the compiler's IR (a networkx DiGraph).

Nodes follow the data: ``stem`` → per block ``blocks.{i}.attention`` → ``blocks.{i}.ffn`` (Swin adds
``stages.{s}.merge`` before stages 1..) → ``head``. Each node carries its candidates with their multiply-adds and
parameters in both cost conventions; decision nodes are the choices a search makes. The graph answers cost queries
for any point (:meth:`SearchGraph.cost`) and the min / max / dense over the space (:meth:`SearchGraph.bounds`),
and exports to JSON, GraphML and Graphviz dot. Pure Python: no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import product
from typing import Any

import networkx as nx

from ..space import cost
from ..space.plan import CONVENTIONS, BlockArch, BlockPlan, Convention, Cost, FrozenArch, Space


@dataclass(frozen=True)
class Decision:
    """One choice the search makes (the encoding an algorithm sees)."""

    name: str  # blocks.{i}.attention | blocks.{i}.ffn | blocks.{i}.heads | blocks.{i}.head_dim | blocks.{i}.density | embed
    kind: str  # attention | ffn | heads | head_dim | density | embed
    block: int | None
    candidates: tuple[Any, ...]
    group: int = 1  # FFN neurons per gate (granular FFN decisions)


@dataclass(frozen=True)
class Range:
    min: float
    max: float
    dense: float


@dataclass(frozen=True)
class Bounds:
    """Multiply-adds and parameters of the cheapest, the largest and the dense network of a space."""

    convention: Convention
    macs: Range
    params: Range
    cheapest: dict[str, FrozenArch]  # metric → the network attaining the minimum

    def of(self, metric: str) -> Range:
        return self.macs if metric == "flops" else self.params


class SearchGraph:
    def __init__(self, space: Space, graph: nx.DiGraph) -> None:
        self.space = space
        self.graph = graph
        self._bounds: dict[str, Bounds] = {}

    # -- the encoding
    def decisions(self) -> list[Decision]:
        return decisions(self.space)

    def size_log10(self) -> float:
        """log10 of the number of distinct frozen specs (a per-neuron FFN counts its distinct widths)."""
        return sum(math.log10(len(d.candidates)) for d in self.decisions())

    # -- costs
    def cost(self, arch: FrozenArch, convention: Convention) -> Cost:
        return cost.arch_cost(self.space.geometry, arch, convention)

    def dense_arch(self) -> FrozenArch:
        return self.space.dense()

    def bounds(self, convention: Convention) -> Bounds:
        if convention not in self._bounds:
            self._bounds[convention] = _bounds(self.space, convention)
        return self._bounds[convention]

    # -- export
    def to_dict(self) -> dict[str, Any]:
        data = nx.node_link_data(self.graph, edges="edges")
        return {"backbone": self.space.geometry.model, "nodes": data["nodes"], "edges": data["edges"]}

    def write(self, path: str) -> None:
        """Export by suffix: ``.json``, ``.graphml`` or ``.dot``."""
        from .._io import write_text

        if path.endswith(".json"):
            write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        elif path.endswith(".graphml"):
            write_text(path, "\n".join(nx.generate_graphml(_flat(self.graph))) + "\n")
        elif path.endswith(".dot"):
            write_text(path, to_dot(self.graph))
        else:
            raise ValueError(f"unknown graph format '{path}': use .json, .graphml or .dot")


# ---------------------------------------------------------------- decisions
def decisions(space: Space) -> list[Decision]:
    out = []
    if len(space.embed) > 1:
        out.append(Decision("embed", "embed", None, space.embed))
    for p in space.plans:
        i = p.geom.index
        fields = (
            ("attention", p.attention),
            ("ffn", p.ffn.candidates(p.geom.hidden)),
            ("heads", p.heads),
            ("head_dim", p.head_dim),
            ("density", p.density),
        )
        for kind, cands in fields:
            if len(cands) > 1:
                group = p.ffn.group if kind == "ffn" and p.ffn.granular else 1
                out.append(Decision(f"blocks.{i}.{kind}", kind, i, tuple(cands), group))
    return out


# ---------------------------------------------------------------- bounds
def _block_options(p: BlockPlan) -> list[BlockArch]:
    """Per block, the combinations that can be extreme: every op/heads/head_dim/density, FFN at its ends."""
    widths = p.ffn.candidates(p.geom.hidden)
    ffn_ends = sorted({widths[0], widths[-1]})
    return [
        BlockArch(op, w, h, d, r)
        for op, w, h, d, r in product(p.attention, ffn_ends, p.heads, p.head_dim, p.density)
    ]


def _bounds(space: Space, convention: Convention) -> Bounds:
    g = space.geometry
    options = [_block_options(p) for p in space.plans]
    best: dict[str, tuple[float, FrozenArch]] = {}
    worst: dict[str, float] = {}
    for embed in space.embed:
        costs = [
            [(cost.block_cost(cost.at_width(p.geom, embed, g.embed_dim), a, convention), a) for a in opts]
            for p, opts in zip(space.plans, options, strict=True)
        ]
        stem = cost.stem_head_cost(g, convention, embed)
        for metric, key in (("flops", lambda c: c.macs), ("params", lambda c: c.params)):
            low = tuple(min(block, key=lambda ca: key(ca[0]))[1] for block in costs)
            arch = FrozenArch(low, embed)
            value = key(cost.arch_cost(g, arch, convention))
            if metric not in best or value < best[metric][0]:
                best[metric] = (value, arch)
            high = key(stem) + sum(max(key(c) for c, _ in block) for block in costs)
            worst[metric] = max(worst.get(metric, 0.0), high)
    dense = cost.dense_cost(g, convention)
    return Bounds(
        convention,
        Range(best["flops"][0], worst["flops"], dense.macs),
        Range(best["params"][0], worst["params"], dense.params),
        {m: best[m][1] for m in best},
    )


# ---------------------------------------------------------------- the graph
def _costs(fn: Callable[[Convention], Cost], prefix: str = "") -> dict[str, float]:
    """``{prefix}macs_<convention>`` and ``{prefix}params_<convention>`` for both conventions."""
    out: dict[str, float] = {}
    for conv in CONVENTIONS:
        c = fn(conv)
        out[f"{prefix}macs_{conv}"] = c.macs
        out[f"{prefix}params_{conv}"] = c.params
    return out


def _attention_node(p: BlockPlan) -> dict[str, Any]:
    b = p.geom
    attrs: dict[str, Any] = dict(
        kind="attention",
        block=b.index,
        stage=b.stage,
        decision=len(p.attention) > 1,
        candidates=list(p.attention),
        heads=list(p.heads),
        head_dim=list(p.head_dim),
        density=list(p.density),
        dim=b.dim,
        tokens=b.tokens,
    )
    for op in p.attention:
        attrs |= _costs(partial(cost.block_op_cost, b, op), prefix=f"{op}_")
    return attrs


def _ffn_node(p: BlockPlan) -> dict[str, Any]:
    b = p.geom
    widths = p.ffn.candidates(b.hidden)

    def per_neuron(conv: Convention) -> Cost:
        return cost.block_ffn_cost(b, 1, conv) - cost.block_ffn_cost(b, 0, conv)

    return dict(
        kind="ffn",
        block=b.index,
        stage=b.stage,
        decision=len(widths) > 1,
        widths=[] if p.ffn.granular else list(widths),
        group=p.ffn.group if p.ffn.granular else 0,
        hidden=b.hidden,
        **_costs(per_neuron, prefix="unit_"),
    )


def build_graph(space: Space) -> SearchGraph:
    g = space.geometry
    graph = nx.DiGraph(backbone=g.model, family=g.family)
    graph.add_node(
        "stem",
        kind="stem",
        decision=len(space.embed) > 1,
        embed=list(space.embed),
        **_costs(partial(cost.stem_head_cost, g)),
    )
    prev = "stem"
    for p in space.plans:
        b = p.geom
        if g.family == "swin" and b.stage > 0 and b.index_in_stage == 0:
            node = f"stages.{b.stage}.merge"
            graph.add_node(node, kind="merge", decision=False, stage=b.stage)
            graph.add_edge(prev, node)
            prev = node
        att, ffn = f"blocks.{b.index}.attention", f"blocks.{b.index}.ffn"
        graph.add_node(att, **_attention_node(p))
        graph.add_node(ffn, **_ffn_node(p))
        graph.add_edge(prev, att, residual=True)
        graph.add_edge(att, ffn, residual=True)
        prev = ffn
    graph.add_node("head", kind="head", decision=False, num_classes=g.num_classes)
    graph.add_edge(prev, "head")
    return SearchGraph(space, graph)


def _flat(graph: nx.DiGraph) -> nx.DiGraph:
    """GraphML holds scalars only: lists become comma-separated strings."""
    out = nx.DiGraph()
    out.graph.update({k: str(v) for k, v in graph.graph.items()})
    for n, d in graph.nodes(data=True):
        out.add_node(n, **{k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in d.items()})
    out.add_edges_from(graph.edges(data=True))
    return out


def to_dot(graph: nx.DiGraph) -> str:
    lines = [
        f'digraph "{graph.graph.get("backbone", "spec")}" {{',
        "  rankdir=TB;",
        "  node [shape=box, fontsize=10];",
    ]
    for n, d in graph.nodes(data=True):
        label = n
        if d.get("kind") == "attention":
            label += "\\n" + " | ".join(d["candidates"])
        elif d.get("kind") == "ffn":
            label += (
                f"\\nwidths {d['widths'][0]}..{d['widths'][-1]}"
                if d["widths"]
                else f"\\ngroups of {d['group']}"
            )
        style = ', style="bold,filled", fillcolor="#fff2cc"' if d.get("decision") else ""
        lines.append(f'  "{n}" [label="{label}"{style}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges()]
    return "\n".join(lines + ["}"]) + "\n"
