"""Stage 3 — build_graph: :class:`Space` → :class:`SearchGraph`, the compiler's IR (a networkx DiGraph).

Nodes follow the data: ``stem`` → per block ``blocks.{i}.attention`` → ``blocks.{i}.ffn`` (Swin adds
``stages.{s}.merge`` before stages 1..) → ``head``. Each node carries its candidates with their multiply-adds and
parameters in both cost conventions; decision nodes are the choices a search makes. An attention node holds both
the block's ``heads`` and ``head_dim`` candidates; ``joint`` marks them as one choice over their pairs. The graph
answers cost queries for any point (:meth:`SearchGraph.cost`) and the min / max / dense over the space
(:meth:`SearchGraph.bounds`), and exports to JSON, GraphML and Graphviz dot. Pure Python: no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import networkx as nx

from ..space import cost
from ..space.groups import UnitGroup, groups
from ..space.groups import decisions as space_decisions
from ..space.plan import (
    CONVENTIONS,
    BlockArch,
    BlockPlan,
    Convention,
    Cost,
    Density,
    FrozenArch,
    Space,
    reads_image,
)


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
    def groups(self) -> list[UnitGroup]:
        """Every prunable dimension of the space (fixed ones included)."""
        return groups(self.space)

    def decisions(self) -> list[UnitGroup]:
        """The groups with more than one candidate: what a search chooses."""
        return space_decisions(self.space)

    def size_log10(self) -> float:
        """log10 of the number of distinct frozen specs (a per-neuron FFN counts its distinct widths)."""
        return sum(math.log10(len(d.choices)) for d in self.decisions())

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


# ---------------------------------------------------------------- bounds
def _extreme(space: Space, convention: Convention, metric: str, pick: Any) -> FrozenArch:
    """The cheapest (``pick=min``) or largest (``max``) network for ``metric``.

    Every cost term grows with every count (widths, heads, per-head width, FFN width, density), so the extremes take
    every count at its end; only the op is chosen per block, which is exact because blocks add up once the widths are
    fixed.
    """
    embed = tuple(pick(widths) for widths in space.embed)
    blocks = []
    for p in space.plans:
        d = p.density
        density = Density(pick(d.qkv), pick(d.proj), pick(d.fc1), pick(d.fc2))
        widths = p.ffn.candidates(p.geom.hidden)
        base = BlockArch(p.attention[0], pick(widths), pick(p.heads), pick(p.head_dim), density)
        options = [BlockArch(op, base.ffn, base.heads, base.head_dim, density) for op in p.attention]
        dim = embed[p.geom.stage]
        blocks.append(pick(options, key=lambda a: cost.block_cost(p.geom, a, convention, dim).of(metric)))
    arch = FrozenArch(tuple(blocks), embed)
    if pick is min and not reads_image(space.geometry, arch):
        # the cheapest network that still reads the image: the one block where msa costs least extra runs it
        def extra(i: int) -> float:
            p, b = space.plans[i], arch.blocks[i]
            dim = embed[p.geom.stage]
            msa = cost.block_cost(p.geom, replace(b, op="msa"), convention, dim).of(metric)
            return msa - cost.block_cost(p.geom, b, convention, dim).of(metric)

        candidates = [i for i, p in enumerate(space.plans) if "msa" in p.attention]
        if candidates:
            i = min(candidates, key=extra)
            arch = arch.with_block(i, op="msa")
    return arch


def _bounds(space: Space, convention: Convention) -> Bounds:
    g = space.geometry
    dense = cost.dense_cost(g, convention)
    cheapest = {m: _extreme(space, convention, m, min) for m in ("flops", "params")}
    low = {m: cost.arch_cost(g, a, convention).of(m) for m, a in cheapest.items()}
    high = {
        m: cost.arch_cost(g, _extreme(space, convention, m, max), convention).of(m)
        for m in ("flops", "params")
    }
    return Bounds(
        convention,
        Range(low["flops"], high["flops"], dense.macs),
        Range(low["params"], high["params"], dense.params),
        cheapest,
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
        decision=len(p.attention) > 1 or len(p.heads) > 1 or len(p.head_dim) > 1,
        candidates=list(p.attention),
        heads=list(p.heads),
        head_dim=list(p.head_dim),
        joint=p.joint,  # heads x head_dim: one decision over the pairs, not two (see BlockPlan.joint)
        density_qkv=list(p.density.qkv),
        density_proj=list(p.density.proj),
        dim=b.dim,
        tokens=b.tokens,
    )
    for op in p.attention:
        arch = BlockArch(op, 0, b.heads, b.head_dim)
        attrs |= _costs(partial(_branch, b, arch), prefix=f"{op}_")
    return attrs


def _branch(b: Any, arch: BlockArch, convention: Convention) -> Cost:
    """The attention branch alone (norm1 included): the block at ``arch`` minus the block with a skip branch."""
    return cost.block_cost(b, arch, convention) - cost.block_cost(
        b, BlockArch("skip", arch.ffn, arch.heads, arch.head_dim), convention
    )


def _ffn_node(p: BlockPlan) -> dict[str, Any]:
    b = p.geom
    widths = p.ffn.candidates(b.hidden)

    def per_neuron(conv: Convention) -> Cost:
        one, zero = BlockArch("skip", 1, b.heads, b.head_dim), BlockArch("skip", 0, b.heads, b.head_dim)
        return cost.block_cost(b, one, conv) - cost.block_cost(b, zero, conv)

    return dict(
        kind="ffn",
        block=b.index,
        stage=b.stage,
        decision=len(widths) > 1 or len(p.density.fc1) > 1 or len(p.density.fc2) > 1,
        widths=[] if p.ffn.granular else list(widths),
        group=p.ffn.group if p.ffn.granular else 0,
        hidden=b.hidden,
        density_fc1=list(p.density.fc1),
        density_fc2=list(p.density.fc2),
        **_costs(per_neuron, prefix="unit_"),
    )


def build_graph(space: Space) -> SearchGraph:
    g = space.geometry
    graph = nx.DiGraph(backbone=g.model, family=g.family)
    graph.add_node(
        "stem",
        kind="stem",
        decision=any(len(w) > 1 for w in space.embed),
        embed=[list(w) for w in space.embed],
        **_costs(lambda conv: cost.stem_head_cost(g, conv)),
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
            if d.get("joint"):
                label += f"\\nheads x head_dim: {len(d['heads']) * len(d['head_dim'])} pairs"
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
