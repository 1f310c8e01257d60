"""The ``dimap`` strategy (search stage, torch): data-free, module-aware weight pruning.

Follows DIMAP ("Data-independent Module-Aware Pruning for Hierarchical Vision Transformers", ICLR 2024,
arXiv 2404.13648) where the paper is specific, and says where it is not:

* **Units** (the paper): single weights of the linear layers inside the blocks, ``qkv``, ``proj``, ``fc1`` and
  ``fc2`` (the ``weights`` unit groups ``blocks.3.attn.qkv``, ...). Patch embedding, patch merging, norms and the
  head are never pruned. **Modules** (the paper): QKV-M (every qkv), PRJ-M (every proj), MLP-M (every fc1 and fc2).
* **Score** (the paper; the LAMP score): sort a layer's weights by magnitude, ``|w(1)| ≥ |w(2)| ≥ …``;
  ``Imp(w(j)) = w(j)² / Σ_{i≤j} w(i)²``. Scores fall with rank inside a layer (magnitude order), and the largest
  weight of every layer scores 1: a threshold ≤ 1 never empties a layer.
* **Allocation** (the paper: one threshold per module; per-layer densities follow from it). The paper fixes a
  FLOPs-reduction target but does not say how it is split across modules. Ours: the three modules keep the same
  *fraction* of their weights, and the fraction is bisected until every budget holds with the binding one within
  1% (single-weight steps make that reachable). Why a common fraction and not one common threshold: LAMP scores of
  different modules are not on one scale (the paper's thresholds on Swin-S differ by 4× between modules), so a
  common fraction is the one scalar that splits the cut evenly across modules while the threshold of each module
  still decides which of its layers give up weights. ``scope = global`` puts every layer in one module (one
  threshold for the whole model, the paper's Table 4 ablation).
* **Density bounds** (ours): a layer's density stays within the range its ``sparsity`` declaration spans (the
  step of that declaration is ignored: DIMAP works at single-weight granularity) and keeps at least one weight.
* **2:4 semi-structured** (our extension, ``semi_structured = true``): each declared layer stays dense or keeps
  the 2 largest of every 4 consecutive weights of a row (density 0.5), the pattern GPU sparse kernels run; a layer
  loses the scores of the weights 2:4 removes, and the shared projection picks the layers.
* **Structured variant** (our extension): when the space declares ``ffn``, ``heads`` or ``head_dim`` instead of
  ``sparsity``, a unit's score is the sum of the LAMP scores of the weights it owns in qkv/proj (a head or per-head
  channel: its q, k, v rows and proj columns) or fc1/fc2 (an FFN neuron: its fc1 row and fc2 column), each divided by
  its module's mean score per weight; the shared projection (:func:`..budget.project`) then cuts the least score per
  unit of cost. The result is a dense, smaller network with a real speed-up.

Errors: :class:`~spvit_dsl.lang.errors.UsageError` when a space mixes ``sparsity`` with structured dimensions, or
when no network the space allows meets the budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...lang.errors import UsageError
from ...space.groups import UnitGroup, value_of, with_value
from ...space.plan import FrozenArch
from ...supernet import Supernet
from ..budget import GroupSteps, project
from ..protocol import JSON, Decisions, SearchContext, Strategy, register_implementation
from .magnitude import steps_from_scores

__all__ = ["MODULES", "Allocation", "DimapStrategy", "LayerScores", "allocate", "lamp_scores", "two_of_four"]

MODULES = {
    "qkv": "QKV-M",
    "proj": "PRJ-M",
    "fc1": "MLP-M",
    "fc2": "MLP-M",
}  # the paper's module of each layer
STRUCTURED = ("ffn", "heads", "head_dim")


def lamp_scores(weight: Tensor) -> Tensor:
    """The LAMP score of every weight of a layer (same shape, float64; Lee et al., ICLR 2021, as used by DIMAP).

    ``Imp(w(j)) = w(j)² / Σ_{i≤j} w(i)²`` over the weights sorted by magnitude, descending (ties: lower flat index
    first). Scores are in (0, 1] and non-increasing along that order; the largest weight scores 1. An all-zero layer
    scores 0 everywhere.
    """
    flat = weight.detach().flatten().double()
    sq, order = torch.sort(flat * flat, descending=True, stable=True)
    denom = torch.cumsum(sq, 0)
    sorted_scores = torch.where(denom > 0, sq / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    out = torch.empty_like(sorted_scores)
    out[order] = sorted_scores
    return out.view_as(weight)


def _ranked_lamp(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's LAMP scores in descending order (float32) and the flat weight index of each (one sort: the scores
    fall along the magnitude order, so sorting by |w| sorts them; ties: lower index first, as :func:`lamp_scores`)."""
    flat = weight.detach().flatten().float().cpu()
    sq, order = torch.sort(flat * flat, descending=True, stable=True)
    denom = torch.cumsum(sq.double(), 0)
    ranked = torch.where(denom > 0, sq.double() / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    small = torch.int32 if flat.numel() < 2**31 else torch.int64
    return ranked.float(), order.to(small)


def two_of_four(weight: Tensor) -> Tensor:
    """The 2:4 mask of a weight ``(out, in)`` with ``in % 4 == 0`` (bool, same shape): in every group of 4
    consecutive weights of a row, the 2 largest by magnitude (= by LAMP score) are kept (ties: the earlier one).
    The pattern of NVIDIA's sparse tensor cores (``torch.sparse.to_sparse_semi_structured``). ValueError otherwise."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(
            f"2:4 sparsity needs a 2-D weight whose rows split into groups of 4, got {tuple(weight.shape)}"
        )
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.view_as(weight)


@dataclass
class LayerScores:
    """One prunable layer: its group, its LAMP scores sorted descending (float32, for fast thresholds), its weight
    count and the kept-count bounds its ``sparsity`` declaration allows."""

    group: UnitGroup
    module: str
    ranked: Tensor  # (n,) LAMP scores, descending
    low: int  # fewest kept weights (≥ 1)
    high: int  # most kept weights (≤ n)
    order: Tensor | None = None  # flat weight indices in the order of ``ranked`` (for the kept mask)

    @property
    def n(self) -> int:
        return self.ranked.numel()

    def kept(self, threshold: float) -> int:
        """Weights scoring at least ``threshold``, clamped to ``[low, high]``."""
        # ranked is descending, so -ranked is ascending: entries >= t are those with -entry <= -t
        neg = -self.ranked
        count = int(torch.searchsorted(neg, torch.tensor([-threshold], dtype=neg.dtype), right=True))
        return min(self.high, max(self.low, count))


class Allocation:
    """Kept weights per layer for a kept fraction, with each module's scores sorted once (so a bisection step
    costs one index and a binary search per layer, not a sort: seconds on Swin-B's 88 M weights).

    ``scope="module"``: the paper's modules (QKV-M, PRJ-M, MLP-M); ``"global"``: one module of every layer.
    """

    def __init__(self, layers: list[LayerScores], scope: str = "module") -> None:
        modules: dict[str, list[LayerScores]] = {}
        for layer in layers:
            modules.setdefault("all" if scope == "global" else layer.module, []).append(layer)
        self.tables = {
            name: (members, torch.sort(torch.cat([m.ranked for m in members]), descending=True).values)
            for name, members in modules.items()
        }

    def thresholds(self, fraction: float) -> dict[str, float]:
        """Module → the LAMP score of its ``ceil(fraction · N)``-th best weight (N: the module's weights)."""
        out = {}
        for name, (_members, ranked) in self.tables.items():
            k = math.ceil(fraction * ranked.numel() - 1e-9)
            out[name] = math.inf if k <= 0 else float(ranked[min(k, ranked.numel()) - 1])
        return out

    def counts(self, fraction: float) -> dict[str, int]:
        """Group path → kept weights when every module keeps ``fraction`` of its weights: a layer keeps its weights
        scoring at least its module's threshold, within its bounds. Monotone: a larger fraction never keeps fewer
        weights in any layer."""
        thresholds = self.thresholds(fraction)
        return {
            layer.group.path: layer.kept(thresholds[name])
            for name, (members, _ranked) in self.tables.items()
            for layer in members
        }


def allocate(layers: list[LayerScores], fraction: float, scope: str = "module") -> dict[str, int]:
    """Kept weights per layer (group path → count) when every module keeps ``fraction`` of its weights
    (see :class:`Allocation`)."""
    return Allocation(layers, scope).counts(fraction)


@register_implementation
class DimapStrategy(Strategy):
    """Data-free LAMP scores, one threshold per module, bisected to the budget (see the module docstring)."""

    name = "dimap"
    kind = "data_free"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        kinds = {g.kind for g in ctx.net.groups.values() if g.decision}
        if "weights" in kinds and kinds & set(STRUCTURED):
            raise UsageError(
                "dimap prunes either single weights (sparsity) or rows (ffn, heads, head_dim), not both in one "
                "search: declare one of them"
            )
        if ctx.settings.get("semi_structured") and "weights" not in kinds:
            raise UsageError(
                "dimap semi_structured = true prunes weights: declare sparsity values, e.g. {0, 0.5}"
            )

    def finalize(self) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        decided = [g for g in net.groups.values() if g.decision]
        kinds = {g.kind for g in decided}
        scope = str(ctx.settings.get("scope", "module"))
        if "weights" in kinds:
            weights = [g for g in decided if g.kind == "weights"]
            if ctx.settings.get("semi_structured"):
                return self._semi_structured(weights, scope)
            return self._unstructured(weights, scope)
        return self._structured(decided, scope)

    # --- the paper: single weights ---------------------------------------------------------------------------

    def _layers(self, groups: list[UnitGroup], start: FrozenArch) -> list[LayerScores]:
        net = self.ctx.net
        out = []
        for g in groups:
            assert g.block is not None and g.layer is not None
            if start.blocks[g.block].op == "skip":
                continue  # a skipped block runs none of its layers
            ranked, order = _ranked_lamp(net.layers(g.block)[g.layer].weight)
            n = ranked.numel()
            densities = [float(d) for d in g.choices]
            low = max(1, round(min(densities) * n))  # the cost model's count of a density: round(d · n)
            high = min(n, max(low, round(max(densities) * n)))
            out.append(LayerScores(g, MODULES[g.layer], ranked, low, high, order))
        return out

    def _arch(self, start: FrozenArch, layers: list[LayerScores], counts: dict[str, int]) -> FrozenArch:
        blocks = list(start.blocks)
        for layer in layers:
            i, name = layer.group.block, layer.group.layer
            assert i is not None and name is not None
            density = 1.0 if counts[layer.group.path] >= layer.n else counts[layer.group.path] / layer.n
            blocks[i] = dataclasses.replace(
                blocks[i], density=dataclasses.replace(blocks[i].density, **{name: density})
            )
        return dataclasses.replace(start, blocks=tuple(blocks))

    def _fits(self, arch: FrozenArch) -> tuple[bool, float]:
        """(every budget holds, the largest cost ÷ limit ratio)."""
        cost = self.ctx.price(arch)
        ratio = max(cost[t.metric] / t.limit for t in self.ctx.targets) if self.ctx.targets else 0.0
        return ratio <= 1.0, ratio

    def _unstructured(self, groups: list[UnitGroup], scope: str) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        start = ctx.program.space.largest()  # layers the space fixes keep their declared density
        layers = self._layers(groups, start)
        allocation = Allocation(layers, scope)

        def point(fraction: float) -> FrozenArch:
            return self._arch(start, layers, allocation.counts(fraction))

        lo, hi = 0.0, 1.0
        fits, ratio = self._fits(point(hi))
        if not fits:
            fits, ratio = self._fits(point(lo))
            if not fits:
                raise UsageError(
                    f"dimap: the sparsest network this space allows costs {ratio:.2%} of the binding budget; "
                    "declare a wider sparsity range (e.g. sparsity: 0..0.95 step 0.05) or relax the budget"
                )
            for _ in range(64):  # invariant: point(lo) fits, point(hi) does not
                mid = (lo + hi) / 2
                if self._fits(point(mid))[0]:
                    lo = mid
                else:
                    hi = mid
                if hi - lo < 0.1 / max(1, sum(layer.n for layer in layers)):
                    break
        else:
            lo = 1.0
        counts = allocation.counts(lo)
        arch = point(lo)
        kept = {}
        for layer in layers:
            path = layer.group.path
            if counts[path] < layer.n:
                assert layer.order is not None
                mask = torch.zeros(layer.n, dtype=torch.bool)
                mask[layer.order[: counts[path]].long()] = True  # the largest |w| of the layer (LAMP's order)
                kept[path] = mask.view(
                    net.layers(layer.group.block or 0)[layer.group.layer or ""].weight.shape
                )
        info: dict[str, JSON] = {
            "derived_cost": dict(ctx.price(start)),
            "projected_cost": dict(ctx.price(arch)),
            "scope": scope,
            "kept_fraction": lo,
            "thresholds": {k: (None if math.isinf(v) else v) for k, v in allocation.thresholds(lo).items()},
        }
        return Decisions(arch, kept, info)

    # --- our extension: 2:4 semi-structured sparsity ----------------------------------------------------------

    def _semi_structured(self, groups: list[UnitGroup], scope: str) -> Decisions:
        """Each declared layer stays dense or becomes 2:4 (density 0.5, :func:`two_of_four`); a layer's step down
        loses the LAMP scores of the weights 2:4 removes, divided by its module's mean score per weight, and the
        shared projection picks the layers."""
        ctx, net = self.ctx, self.ctx.net
        start = ctx.program.space.largest()
        lamp = _row_lamp(net, scope)
        steps, masks, forced = [], {}, []
        for g in groups:
            assert g.block is not None and g.layer is not None
            weight = net.layers(g.block)[g.layer].weight
            if start.blocks[g.block].op == "skip" or weight.shape[1] % 4:
                continue  # not run, or rows that do not split into groups of 4
            if not any(abs(float(d) - 0.5) < 1e-9 for d in g.choices):
                raise UsageError(
                    f"dimap semi_structured: {g.path} cannot be 2:4 (density 0.5) in this space; declare 0.5 among "
                    "its sparsity values, e.g. sparsity: {0, 0.5}"
                )
            mask = two_of_four(weight)
            masks[g.path] = mask.cpu()
            if any(float(d) >= 1.0 for d in g.choices):  # dense or 2:4: a step the projection may take
                loss = float(lamp[id(weight)][~mask].sum())
                steps.append(GroupSteps(g, [0.5, 1.0], 1, [loss]))
            else:  # the space does not allow it dense: 2:4 it is
                forced.append(g)
        for g in forced:
            start = with_value(start, g, 0.5)
        if not steps and not forced:
            raise UsageError("dimap semi_structured: no declared layer has rows that split into groups of 4")
        cheapest = start
        for step in steps:
            cheapest = with_value(cheapest, step.group, 0.5)
        fits, ratio = self._fits(cheapest)
        if not fits:
            raise UsageError(
                f"dimap semi_structured: with every declared layer at 2:4 the network still costs {ratio:.2%} of "
                "the binding budget (2:4 halves only qkv, proj, fc1 and fc2); relax the budget or drop "
                "semi_structured for finer sparsity"
            )
        result = project(net.geometry, start, steps, ctx.targets, ctx.convention)
        kept = {
            g.path: masks[g.path]
            for g in [step.group for step in steps] + forced
            if float(value_of(result.arch, g)) < 1.0
        }
        info: dict[str, JSON] = {
            "derived_cost": dict(ctx.price(start)),
            "projected_cost": dict(result.cost),
            "removed": result.removed,
            "added": result.added,
            "pattern": "2:4",
            "scope": scope,
        }
        ratio = self._fits(result.arch)[1]
        if ratio < 0.99:
            info["notice"] = (
                f"note: 2:4 layers are all or nothing, so the network sits at {ratio:.2%} of the binding budget; "
                "declare finer sparsity without semi_structured to use the rest"
            )
        return Decisions(result.arch, kept, info)

    # --- our extension: rows -------------------------------------------------------------------------------------

    def _structured(self, groups: list[UnitGroup], scope: str) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        lamp = _row_lamp(net, scope)
        start = ctx.program.space.largest()
        steps, kept = [], {}
        for g in groups:
            if g.kind not in STRUCTURED:
                raise UsageError(
                    f"dimap cannot search {g.kind} ({g.path}): declare sparsity, ffn, heads or head_dim"
                )
            scores = net.unit_sums(
                g.path, lambda t: lamp[id(t)] if id(t) in lamp else t.new_zeros(t.shape).double()
            )
            steps.append(steps_from_scores(g, net, scores))
            kept[g.path] = scores
        result = project(net.geometry, start, steps, ctx.targets, ctx.convention)
        chosen = {}
        for g in groups:
            count = int(value_of(result.arch, g))
            if count < net.size(g.path):
                order = torch.sort(kept[g.path], descending=True, stable=True).indices[:count]
                chosen[g.path] = torch.sort(order).values.cpu()
        full = net.kept_for(result.arch, chosen)
        info: dict[str, JSON] = {
            "derived_cost": dict(ctx.price(start)),
            "projected_cost": dict(result.cost),
            "removed": result.removed,
            "added": result.added,
            "scope": scope,
        }
        return Decisions(result.arch, {k: v.cpu() for k, v in full.items()}, info)


def _row_lamp(net: Supernet, scope: str = "module") -> dict[int, Tensor]:
    """``id(weight)`` → its LAMP scores divided by its module's mean score per weight (float64; ``scope="global"``:
    by the mean over every layer)."""
    raw: dict[int, tuple[str, Tensor]] = {}
    for row in net.rows:
        for name, layer in net.layers(row.index).items():
            raw[id(layer.weight)] = ("all" if scope == "global" else MODULES[name], lamp_scores(layer.weight))
    totals: dict[str, list[float]] = {}
    for module, scores in raw.values():
        t = totals.setdefault(module, [0.0, 0.0])
        t[0] += float(scores.sum())
        t[1] += scores.numel()
    return {key: scores / (totals[m][0] / totals[m][1]) for key, (m, scores) in raw.items()}
