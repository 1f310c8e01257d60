"""Search stage — budgets: the projection that makes them hold after a search.

Input: the program's resolved budgets, a point of the space and, for every unit group a strategy decided, the values
its levels stand for and a score per step (what is lost stepping down one level). Output: the level of every group
such that the network meets every budget and sits within 1% of the binding one. Pure Python (the analytic cost model
prices every move exactly): no torch. How a training strategy brings its network to the budget during the search
is its own business (SPViT: a scheduled price on its gates, :mod:`.methods.spvit_price`; OFB: a penalty); the
projection is the safety net that rounds, and the loop says so in one line when it did more than round.

**Projection** (:func:`project`) — works on levels of unit groups (embedding widths, heads, per-head widths, FFN
widths, op levels, densities) and on costs that do not simply add up (embedding width × FFN width, heads × per-head
width × tokens): every move is priced by the analytic cost model. While over any budget, step down the group whose
next step loses the least score per unit of (normalised) cost saved; then, while more than 1% under the binding
budget, step up the group with the most score per unit of cost that still fits every budget; when only coarse steps
are left, try one coarse step up paired with fine steps down elsewhere (a swap). Greedy by score per cost with
lazily re-priced moves, as in budgeted knapsack heuristics.
"""

from __future__ import annotations

import heapq
import math
import random as _random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..compile.program import Budget
from ..space import cost as cost_model
from ..space.geometry import Convention, Geometry
from ..space.groups import UnitGroup, with_value
from ..space.latency import LatencyTable
from ..space.plan import FrozenArch, reads_image

__all__ = ["GroupSteps", "Projection", "Target", "project", "targets_of"]

METRIC_FIELD = {"flops": "macs", "params": "params"}


@dataclass(frozen=True)
class Target:
    """One budget: ``metric`` ("flops" = multiply-adds, "params", or "latency" in milliseconds) at most ``limit``
    (absolute). A latency target carries the device's measured ``table`` that prices it."""

    metric: str
    limit: float
    text: str = ""
    table: LatencyTable | None = field(default=None, compare=False, repr=False)

    @property
    def field(self) -> str:
        return METRIC_FIELD[self.metric]


def targets_of(budgets: Iterable[Budget], latency: LatencyTable | None = None) -> list[Target]:
    """Targets from :class:`spvit_dsl.compile.program.Budget` objects (the tightest per metric).

    Raises ``ValueError`` for a latency budget without ``latency``, the table that prices it."""
    best: dict[str, Target] = {}
    for b in budgets:
        if b.metric == "latency" and latency is None:
            raise ValueError("a latency budget needs the device's latency table (spvit_dsl.compact.latency)")
        t = Target(b.metric, float(b.absolute), b.limit.text, latency if b.metric == "latency" else None)
        if t.metric not in best or t.limit < best[t.metric].limit:
            best[t.metric] = t
    return [best[m] for m in sorted(best)]


# --------------------------------------------------------------------------------------------- projection
@dataclass
class GroupSteps:
    """One unit group as the projection sees it.

    ``values[l]``: the group's value (kept count, op name, density) at level ``l``, cheapest first; ``level``: where it
    stands now; ``scores[l - 1]``: what stepping down from level ``l`` to ``l - 1`` loses (a gate logit, a sum of
    normalised magnitudes, ...; higher = more valuable). ``floor``: the lowest level it may take.
    """

    group: UnitGroup
    values: Sequence[int | float | str]
    level: int
    scores: list[float]
    floor: int = 0

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.values) - 1:
            raise ValueError(
                f"{self.group.path}: {len(self.values)} levels need {len(self.values) - 1} step scores"
            )
        if not self.floor <= self.level < len(self.values):
            raise ValueError(
                f"{self.group.path}: level {self.level} outside {self.floor}..{len(self.values) - 1}"
            )


@dataclass
class ProjectionResult:
    """The projected point, every group's level, its costs (metric → absolute) and how many steps were taken."""

    arch: FrozenArch
    levels: dict[str, int]
    cost: dict[str, float]
    removed: int
    added: int
    raised_msa: str | None = None  # the attention group made msa because the start point read no image

    def ratio(self, target: Target) -> float:
        return self.cost[target.metric] / target.limit


class Projection:
    """Greedy level moves under the budgets, priced exactly by the analytic cost model (see the module docstring).

    ``order="score"`` (default) ranks moves by score per normalised cost; ``order="random"`` picks uniformly among the
    legal moves (the ``random`` control strategy), with ``rng``.
    """

    def __init__(
        self,
        geometry: Geometry,
        arch: FrozenArch,
        steps: Sequence[GroupSteps],
        targets: Sequence[Target],
        convention: Convention,
        *,
        order: str = "score",
        rng: _random.Random | None = None,
    ) -> None:
        self.geometry, self.targets, self.convention = geometry, list(targets), convention
        self.table = next((t.table for t in self.targets if t.table is not None), None)
        self.metrics = ("flops", "params") + (("latency",) if self.table is not None else ())
        self.steps = {s.group.path: s for s in steps}
        self.order, self.rng = order, rng or _random.Random(0)
        self.arch = arch
        for s in steps:
            self.arch = with_value(self.arch, s.group, s.values[s.level])
        self._blocks = [self._block_cost(i) for i in range(geometry.depth)]
        self._stem = self._stem_cost(self.arch)
        self.removed = self.added = 0
        self.raised_msa: str | None = None
        self._read_image()

    def _read_image(self) -> None:
        """A ViT point with no msa block classifies every image alike (:func:`reads_image`): if the start point is
        one, raise the attention group whose msa step is worth the most (any, in random order) to msa; the budget
        phases then make room for it, and no move ever drops the last msa block."""
        if reads_image(self.geometry, self.arch):
            return
        options = [s for s in self.steps.values() if s.group.kind == "attention" and "msa" in s.values]
        if not options:
            return  # the space fixes every block's op: nothing to choose here
        if self.order == "random":
            pick = self.rng.choice(options)
        else:
            pick = max(options, key=lambda s: s.scores[s.values.index("msa") - 1])
        self.apply(pick.group.path, pick.values.index("msa"))
        self.added += 1
        self.raised_msa = pick.group.path

    # -- costs
    def _block_cost(self, i: int, arch: FrozenArch | None = None) -> dict[str, float]:
        a = arch or self.arch
        b = self.geometry.blocks[i]
        c = cost_model.block_cost(b, a.blocks[i], self.convention, a.embed[b.stage])
        out = {"flops": float(c.macs), "params": float(c.params)}
        if self.table is not None:
            out["latency"] = self.table.block_ms(
                b, a.blocks[i], a.embed[b.stage], self.table.scales_of(a.embed)
            )
        return out

    def _stem_cost(self, arch: FrozenArch) -> dict[str, float]:
        c = cost_model.stem_head_cost(self.geometry, self.convention, arch.embed)
        out = {"flops": float(c.macs), "params": float(c.params)}
        if self.table is not None:
            out["latency"] = self.table.stem_ms(arch.embed)
        return out

    @property
    def cost(self) -> dict[str, float]:
        return {m: self._stem[m] + sum(b[m] for b in self._blocks) for m in self.metrics}

    def _move(
        self, path: str, level: int
    ) -> tuple[FrozenArch, dict[int, dict[str, float]], dict[str, float]]:
        """The point, the changed blocks' costs and the stem cost if ``path`` moved to ``level``."""
        s = self.steps[path]
        arch = with_value(self.arch, s.group, s.values[level])
        if s.group.block is not None:
            return arch, {s.group.block: self._block_cost(s.group.block, arch)}, self._stem
        stage = s.group.stage
        # a latency table's calibration depends on every stage's width: re-price every block then
        moved = [b for b in self.geometry.blocks if b.stage == stage or self.table is not None]
        blocks = {b.index: self._block_cost(b.index, arch) for b in moved}
        return arch, blocks, self._stem_cost(arch)

    def delta(self, path: str, level: int) -> dict[str, float]:
        """metric → the cost change of moving ``path`` to ``level``."""
        _arch, blocks, stem = self._move(path, level)
        return {
            m: stem[m] - self._stem[m] + sum(c[m] - self._blocks[i][m] for i, c in blocks.items())
            for m in self.metrics
        }

    def apply(self, path: str, level: int) -> None:
        arch, blocks, stem = self._move(path, level)
        self.arch, self._stem = arch, stem
        for i, c in blocks.items():
            self._blocks[i] = c
        self.steps[path].level = level

    # -- helpers
    def over(self) -> list[Target]:
        cost = self.cost
        return [t for t in self.targets if cost[t.metric] > t.limit * (1 + 1e-12)]

    def binding_ratio(self) -> float:
        cost = self.cost
        return max((cost[t.metric] / t.limit for t in self.targets), default=0.0)  # no budget: a fixed shape

    def fits(self, delta: dict[str, float]) -> bool:
        cost = self.cost
        return all(cost[t.metric] + delta[t.metric] <= t.limit for t in self.targets)

    @staticmethod
    def weight(delta: dict[str, float], targets: Iterable[Target]) -> float:
        return sum(abs(delta[t.metric]) / t.limit for t in targets)

    def _down_key(self, path: str, over: list[Target], saving: bool = False) -> float | None:
        """The rank of ``path``'s next step down (lower first), None when it cannot or need not move. ``saving``:
        only a step that lowers the exceeded costs (their sum, each as a share of its limit) counts."""
        s = self.steps[path]
        if s.level <= s.floor:
            return None
        if s.group.kind == "attention" and s.values[s.level] == "msa" and self._last_msa():
            return None  # the class token's only way to read the image (reads_image)
        delta = self.delta(path, s.level - 1)
        w = -sum(delta[t.metric] / t.limit for t in over) if saving else self.weight(delta, over)
        if w <= 0:
            return None
        return self.rng.random() if self.order == "random" else s.scores[s.level - 1] / w

    def _last_msa(self) -> bool:
        """Whether dropping any msa block would leave a point that does not read the image."""
        if self.geometry.reads_patches:
            return False
        return sum(b.op == "msa" for b in self.arch.blocks) <= 1

    def _up_key(self, path: str) -> float | None:
        s = self.steps[path]
        if s.level >= len(s.values) - 1:
            return None
        w = self.weight(self.delta(path, s.level + 1), self.targets)
        if self.order == "random":
            return self.rng.random()
        return -math.inf if w <= 0 else -(s.scores[s.level] / w)

    def _free_up(self, over: list[Target], protect: frozenset[str]) -> str | None:
        """Take one step *up* that lowers an exceeded cost and raises none: a measured latency need not fall with
        the width (a narrower kernel can run slower), so the cheapest point is not always every group's lowest
        level. Returns the group moved, or None."""
        for path, s in self.steps.items():
            if path in protect or s.level + 1 >= len(s.values):
                continue
            d = self.delta(path, s.level + 1)
            if all(d[t.metric] <= 0 for t in self.targets) and any(d[t.metric] < 0 for t in over):
                self.apply(path, s.level + 1)
                self.added += 1
                return path
        return None

    # -- phases
    def remove(self, protect: frozenset[str] = frozenset()) -> int:
        """Step down until every budget holds (never the groups in ``protect``); ValueError when nothing is left."""
        removed = 0
        # a step down may raise a measured latency (a narrower kernel can run slower) and is still taken on the way
        # down (the next may save more); but a group a step up freed room in steps down in this call only where that
        # saves, else the two moves could undo each other for ever (seen on a busy machine's table): every group
        # then either only steps down or lowers the exceeded cost with each move, and the loop ends
        raised: set[str] = set()
        # a hang guard only: with several budgets a cost can fall for one and rise for another, and no proof holds
        limit = 8 * sum(len(s.values) for s in self.steps.values()) + 64
        moves = 0
        while over := self.over():
            moves += 1
            if moves > limit:
                raise ValueError(
                    f"the budget projection did not settle after {limit} moves (costs that rise and fall with the "
                    "width, as a latency table measured on a busy machine has): measure the table again on an idle "
                    "machine (`spvit-dsl latency SPEC --rebuild`)"
                )
            if (up := self._free_up(over, protect)) is not None:
                raised.add(up)
                continue
            keys = [
                (k, p)
                for p in self.steps
                if p not in protect and (k := self._down_key(p, over, p in raised)) is not None
            ]
            if not keys:
                names = ", ".join(f"{t.metric} <= {t.text or t.limit}" for t in over)
                kept_msa = " but the last msa block (without one a ViT's class token never reads the image)"
                raise ValueError(
                    f"the budget projection cannot meet {names}: no group left that lowers the cost"
                    + (kept_msa if self._last_msa() and any(b.op == "msa" for b in self.arch.blocks) else "")
                )
            heap = list(keys)
            heapq.heapify(heap)
            while heap and self.over() == over:
                key, path = heapq.heappop(heap)
                fresh = self._down_key(path, over, path in raised)
                if fresh is None:
                    continue
                if heap and fresh > heap[0][0] + 1e-12 and self.order != "random":
                    heapq.heappush(heap, (fresh, path))  # its price changed (an embedding move): re-rank it
                    continue
                self.apply(path, self.steps[path].level - 1)
                removed += 1
                moves += 1
                if (nxt := self._down_key(path, over, path in raised)) is not None:
                    heapq.heappush(heap, (nxt, path))
        self.removed += removed
        return removed

    def add(self, tolerance: float) -> int:
        """Step up the most valuable fitting moves until the binding budget is within ``tolerance``. A move that
        does not fit is dropped for the pass; another pass follows when a move lowered a cost (a measured latency
        need not grow with the width), since room may have opened for the dropped ones."""
        added = 0
        again = True
        while again:
            again = False
            heap = [(k, p) for p in self.steps if (k := self._up_key(p)) is not None]
            heapq.heapify(heap)
            while heap and self.binding_ratio() < 1.0 - tolerance:
                _key, path = heapq.heappop(heap)
                s = self.steps[path]
                if s.level >= len(s.values) - 1:
                    continue
                delta = self.delta(path, s.level + 1)
                if not self.fits(delta):
                    continue  # costs only grow from here in this pass
                fresh = self._up_key(path)
                if fresh is not None and heap and fresh > heap[0][0] + 1e-12 and self.order != "random":
                    heapq.heappush(heap, (fresh, path))
                    continue
                self.apply(path, s.level + 1)
                added += 1
                again = again or any(delta[t.metric] < 0 for t in self.targets)
                if (nxt := self._up_key(path)) is not None:
                    heapq.heappush(heap, (nxt, path))
        self.added += added
        return added

    def swap(self, tolerance: float, tries: int = 64) -> None:
        """When only coarse steps are left (e.g. an op level), take one that does not fit and make room with steps
        finer than the tolerance; keep the swap when the binding budget gets closer while every budget holds."""
        while self.binding_ratio() < 1.0 - tolerance:
            base = self.binding_ratio()
            options = [p for p in self.steps if self.steps[p].level < len(self.steps[p].values) - 1]
            options = [p for p in options if not self.fits(self.delta(p, self.steps[p].level + 1))]
            keys = {p: self._up_key(p) for p in options}
            options.sort(key=lambda p: math.inf if (k := keys[p]) is None else k)
            coarse = frozenset(p for p in self.steps if self._coarse(p, tolerance))
            for path in options[:tries]:
                saved = self._snapshot()
                self.apply(path, self.steps[path].level + 1)
                try:
                    self.remove(coarse | {path})
                    self.add(tolerance)
                    ok = not self.over() and self.binding_ratio() > base
                except ValueError:
                    ok = False
                if ok:
                    self.added += 1
                    break
                self._restore(saved)
            else:
                return

    def _coarse(self, path: str, tolerance: float) -> bool:
        s = self.steps[path]
        if s.level <= s.floor:
            return False
        delta = self.delta(path, s.level - 1)
        return any(abs(delta[t.metric]) > tolerance * t.limit for t in self.targets)

    def _snapshot(
        self,
    ) -> tuple[FrozenArch, dict[str, int], list[dict[str, float]], dict[str, float], int, int]:
        return (
            self.arch,
            {p: s.level for p, s in self.steps.items()},
            list(self._blocks),
            dict(self._stem),
            self.removed,
            self.added,
        )

    def _restore(
        self, snap: tuple[FrozenArch, dict[str, int], list[dict[str, float]], dict[str, float], int, int]
    ) -> None:
        self.arch, levels, self._blocks, self._stem, self.removed, self.added = snap
        for p, level in levels.items():
            self.steps[p].level = level

    def result(self) -> ProjectionResult:
        """The projected point (canonical: no sparsity on layers it does not run; the cost is unchanged)."""
        return ProjectionResult(
            self.arch.canonical(),
            {p: s.level for p, s in self.steps.items()},
            self.cost,
            self.removed,
            self.added,
            self.raised_msa,
        )


def project(
    geometry: Geometry,
    arch: FrozenArch,
    steps: Sequence[GroupSteps],
    targets: Sequence[Target],
    convention: Convention,
    *,
    tolerance: float = 0.01,
    fill: bool = True,
    order: str = "score",
    seed: int = 0,
) -> ProjectionResult:
    """Move the groups of ``steps`` (starting from their current levels; every other dimension as in ``arch``) so
    that every target holds and, with ``fill``, the binding one is within ``tolerance`` below its limit.

    Raises ``ValueError`` when no move can bring the cost under a budget (the budget is below what the decided groups
    can reach).
    """
    proj = Projection(geometry, arch, steps, targets, convention, order=order, rng=_random.Random(seed))
    proj.remove()
    if fill:
        proj.add(tolerance)
        proj.swap(tolerance)
    return proj.result()
