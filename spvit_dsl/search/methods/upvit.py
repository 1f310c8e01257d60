"""The ``upvit`` strategy (search stage, torch): leave-one-out KL importance on a proxy set, structure-consistent
pruning of embedding channels, attention channels and FFN neurons, with regrouped heads.

Follows UP-ViT (Yu & Wu, "A Unified Pruning Framework for Vision Transformers", arXiv 2111.15127) where the paper
is specific, and says where it is not:

* **Units** (the paper): embedding channels of the residual stream (the ``embed`` group), attention channels (index
  j of the ``heads · head_dim`` channels removed from q, k and v together, plus proj's column j) and FFN neurons.
* **Score** (the paper): ``KL(teacher ‖ model without the unit)`` summed over a proxy set of ``proxy_per_class``
  training images per class (labels choose the images; the scores use none), with evaluation transforms. The
  teacher is the unpruned network; its log-probabilities are computed once per proxy batch. Higher KL = more
  important; the lowest are removed first.
* **Batched ablations** (ours): one forward pass scores ``units_per_pass`` units, each proxy image repeated once
  per unit with that unit masked for its copy (per-sample masks, :mod:`spvit_dsl.supernet.masks`); a block's units
  start from the tokens entering the block, computed once (ViT); no backward pass. Scores live in buffers the loop
  checkpoints after every proxy batch, so an interrupted scoring resumes at the next batch. Under torchrun the units
  are split across ranks (unit u on rank u mod world) and the scores summed at the end.
* **Allocation, uniform** (the paper): a space that fixes the target shape (``embed: 192``; ``heads: 3``,
  ``head_dim: 64``, ``ffn: width 768`` in every block) keeps the top units of each group. Attention channels are
  **regrouped**: the original heads are cut into as many contiguous groups as there are new heads, and in each
  group the ``head_dim`` channels of highest KL form one new head (ViT; the softmax scale stays ``1/√head_dim`` of
  the original heads). Swin heads carry a position bias per original head and are not regrouped: heads are kept
  by their summed channel scores, and the per-head channels by their scores summed over the kept heads.
* **Allocation, non-uniform** (our extension): when the space declares ranges, every unit's score is measured at
  the network's output, so scores compare across layers: each group's levels lose the scores of the units they
  drop (heads: the summed scores of a head's channels; per-head width: channel c's score summed over the heads),
  and the shared projection (:func:`..budget.project`) removes the least score per multiply-add saved until every
  budget holds, within 1% of the binding one. Then regrouping as above.

Groups left out by ``groups`` keep their largest units by L1 magnitude; the search says so.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ...lang.errors import UsageError
from ...runtime.data import Data, labels_of, per_class
from ...space.groups import UnitGroup, value_of
from ...space.plan import FrozenArch
from ..budget import project
from ..protocol import JSON, Batch, Decisions, SearchContext, Strategy, register_implementation
from .magnitude import steps_from_scores, top_of

__all__ = ["UpvitStrategy", "regroup"]

KINDS = ("embed", "attention", "ffn")  # what `groups` may name


def regroup(scores: Tensor, heads: int, new_heads: int, new_dim: int) -> Tensor:
    """UP-ViT's regrouping of one block's attention channels.

    ``scores``: (heads · head_dim,) channel scores, head-major. The original heads are split into ``new_heads``
    contiguous groups (as equal as possible); in each group the ``new_dim`` channels of highest score, ascending,
    form one new head. Returns (new_heads, new_dim) flat channel indices. ValueError: a group with fewer than
    ``new_dim`` channels, or more new heads than heads.
    """
    if not 1 <= new_heads <= heads:
        raise ValueError(f"cannot regroup {heads} heads into {new_heads}")
    head_dim = scores.numel() // heads
    rows = []
    for members in torch.tensor_split(torch.arange(heads), new_heads):
        channels = (members[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
        if channels.numel() < new_dim:
            raise ValueError(
                f"a group of {members.numel()} heads has {channels.numel()} channels, {new_dim} asked"
            )
        top = torch.sort(scores.cpu()[channels], descending=True, stable=True).indices[:new_dim]
        rows.append(torch.sort(channels[top]).values)
    return torch.stack(rows)


class _Scores(nn.Module):
    """The KL scores (float64 buffers, checkpointed by the loop): ``embed`` and per block ``attn_i``, ``ffn_i``."""

    def __init__(self, sizes: dict[str, int], device: torch.device) -> None:
        super().__init__()
        for name, size in sizes.items():
            self.register_buffer(name, torch.zeros(size, dtype=torch.float64, device=device))


@register_implementation
class UpvitStrategy(Strategy):
    """Leave-one-out KL scores on a proxy set, structure-consistent pruning (see the module docstring)."""

    name = "upvit"
    kind = "score"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        net, s = ctx.net, ctx.settings
        self.per_pass = int(s.get("units_per_pass", 32))
        if self.per_pass < 1:
            raise UsageError(f"units_per_pass must be at least 1, found {self.per_pass}")
        if int(s.get("proxy_per_class", 5)) < 1:
            raise UsageError(f"proxy_per_class must be at least 1, found {s.get('proxy_per_class')}")
        self.kinds = _kinds(str(s.get("groups", "all")))
        self.units: dict[str, tuple[str, int | None]] = {}  # buffer name → (what, block)
        sizes: dict[str, int] = {}
        for group in net.groups.values():
            if not _reduced(group) or _kind(group) not in self.kinds:
                continue
            if group.kind == "embed":
                if net.geometry.family == "swin":
                    raise UsageError(
                        "upvit scores the embedding channels of a ViT; Swin stage widths are not supported"
                    )
                sizes["embed"], self.units["embed"] = group.size, ("embed", None)
            elif group.kind == "ffn":
                sizes[f"ffn_{group.block}"], self.units[f"ffn_{group.block}"] = (
                    group.size,
                    ("ffn", group.block),
                )
            elif group.kind in ("heads", "head_dim"):
                assert group.block is not None
                attn = net.rows[group.block].attn
                sizes[f"attn_{group.block}"] = attn.attn_dim
                self.units[f"attn_{group.block}"] = ("attn", group.block)
        if not self.units:
            reduced = sorted({_kind(g) for g in net.groups.values() if _reduced(g)})
            if reduced:
                raise UsageError(
                    f"upvit has nothing to score: the space cuts {', '.join(reduced)}, which groups = "
                    f"'{s.get('groups')}' leaves out; add them to groups (or groups = all)"
                )
            raise UsageError(
                "upvit has nothing to score: the space keeps every embedding channel, head and FFN neuron (declare a "
                "target shape such as `embed: 192` and `heads: 3`, or ranges with a budget)"
            )
        self.scores = _Scores(sizes, ctx.device)
        self.proxy_indices: list[int] = []
        self.started = time.perf_counter()
        self.scored = 0  # unit evaluations since start (for units/s)
        self.total_units = sum(sizes.values())

    # --- state -------------------------------------------------------------------------------------------------

    def module(self) -> nn.Module:
        return self.scores

    def state_dict(self) -> dict[str, JSON]:
        return {"scored": self.scored}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        self.scored = int(state.get("scored", 0) or 0)  # type: ignore[arg-type]

    def metrics(self) -> dict[str, float]:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        return {"units_per_s": self.scored / elapsed}

    # --- scoring -----------------------------------------------------------------------------------------------

    def proxy(self, data: Data) -> Dataset:
        images = data.train_plain()
        self.proxy_indices = per_class(
            labels_of(images),
            int(self.ctx.settings.get("proxy_per_class", 5)),
            int(self.ctx.settings["seed"]),
        )
        return Subset(images, self.proxy_indices)

    def score_batches(self) -> int:
        data = self.ctx.data
        assert data is not None
        if not self.proxy_indices:
            self.proxy(data)
        return math.ceil(len(self.proxy_indices) / int(self.ctx.settings["batch_size"]))

    @torch.no_grad()
    def score(self, index: int, batch: Batch) -> None:
        net, ctx = self.ctx.net, self.ctx
        net.reset()
        net.board.clear()  # the teacher: every unit kept (fixed target widths included)
        x = batch.images
        teacher = F.log_softmax(net(x).double(), dim=-1)
        inputs = net.block_inputs(x)
        for name, (what, block) in self.units.items():
            size = self.scores.get_buffer(name).numel()
            mine = torch.arange(ctx.rank, size, ctx.world)
            for chunk in torch.split(mine, self.per_pass):
                kl = self._ablate(what, block, size, chunk, x, teacher, inputs)
                self.scores.get_buffer(name)[chunk.to(ctx.device)] += kl
                self.scored += int(chunk.numel())
        net.reset()

    def _ablate(
        self,
        what: str,
        block: int | None,
        size: int,
        chunk: Tensor,
        x: Tensor,
        teacher: Tensor,
        inputs: list[Tensor] | None,
    ) -> Tensor:
        """Summed KL over the proxy batch for each unit of ``chunk`` (of ``size`` units), removed one per copy of the
        batch."""
        net = self.ctx.net
        n, P = chunk.numel(), x.shape[0]
        mask = torch.ones(n, P, size, device=x.device, dtype=x.dtype)
        mask[torch.arange(n), :, chunk.to(x.device)] = 0
        mask = mask.view(n * P, size)
        try:
            if what == "embed":
                net.board.set("embed", mask)
            elif what == "ffn":
                net.board.set(f"blocks.{block}.ffn", mask)
            else:
                assert block is not None
                net.set_probe(block, mask)
            if inputs is not None and block is not None:
                tokens = inputs[block]
                logits = net.forward_from(block, tokens.repeat(n, *([1] * (tokens.dim() - 1))))
            else:
                logits = net(x.repeat(n, 1, 1, 1))
        finally:
            net.board.clear()
            if what == "attn" and block is not None:
                net.set_probe(block, None)
        student = F.log_softmax(logits.double(), dim=-1).view(n, P, -1)
        t = teacher[None]
        return (t.exp() * (t - student)).sum(-1).sum(-1)

    # --- the result --------------------------------------------------------------------------------------------

    def _gathered(self) -> dict[str, Tensor]:
        out = {name: buf.detach().clone() for name, buf in self.scores.named_buffers()}
        if self.ctx.world > 1 and dist.is_available() and dist.is_initialized():
            for t in out.values():
                dist.all_reduce(t)  # each rank scored its own units: the sum is every unit's score
        return {k: v.cpu() for k, v in out.items()}

    def finalize(self) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        net.reset()
        scores = self._gathered()
        space = ctx.program.space
        start = space.largest()
        decided = [g for g in net.groups.values() if g.decision]
        info: dict[str, JSON] = {"proxy_images": len(self.proxy_indices), "scored_units": self.total_units}
        if decided:
            steps = [steps_from_scores(g, net, self._group_scores(g, scores)) for g in decided]
            result = project(net.geometry, start, steps, ctx.targets, ctx.convention)
            arch = result.arch
            info |= {
                "derived_cost": dict(ctx.price(start)),
                "projected_cost": dict(result.cost),
                "removed": result.removed,
                "added": result.added,
            }
        else:
            arch = start  # the target shape the space fixes (the paper's uniform allocation)
        kept = self._kept(arch, scores)
        left = sorted({_kind(g) for g in net.groups.values() if _reduced(g)} - set(self.kinds))
        if left:
            info["notice"] = (
                f"upvit did not score {', '.join(left)} (groups = {ctx.settings.get('groups')}); those keep their "
                "largest units by L1 magnitude: add them to `groups` to score them"
            )
        full = net.kept_for(arch, kept)
        return Decisions(arch, {k: v.cpu() for k, v in full.items()}, info)

    def _group_scores(self, group: UnitGroup, scores: dict[str, Tensor]) -> Tensor:
        """A group's unit scores (for the projection's step losses); L1 magnitude where it was not scored."""
        i = group.block
        if group.kind == "embed" and "embed" in scores:
            return scores["embed"]
        if group.kind == "ffn" and f"ffn_{i}" in scores:
            return scores[f"ffn_{i}"]
        if group.kind in ("heads", "head_dim") and f"attn_{i}" in scores:
            assert i is not None
            attn = self.ctx.net.rows[i].attn
            per = scores[f"attn_{i}"].view(attn.num_heads, attn.head_dim)
            return per.sum(1) if group.kind == "heads" else per.sum(0)
        return self.ctx.net.unit_scores(group.path).cpu()

    def _kept(self, arch: FrozenArch, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        net = self.ctx.net
        kept: dict[str, Tensor] = {}
        for path, group in net.groups.items():
            count = int(value_of(arch, group)) if group.kind in ("embed", "ffn") else None
            if group.kind == "embed" and "embed" in scores and count is not None and count < group.size:
                kept[path] = top_of(scores["embed"], count)
            elif (
                group.kind == "ffn"
                and f"ffn_{group.block}" in scores
                and count is not None
                and count < group.size
            ):
                kept[path] = top_of(scores[f"ffn_{group.block}"], count)
        for r, b in zip(net.rows, arch.blocks, strict=True):
            s = scores.get(f"attn_{r.index}")
            attn = r.attn
            if s is None or (b.heads == attn.num_heads and b.head_dim == attn.head_dim) or b.op != "msa":
                continue
            if (
                attn.window
            ):  # Swin: heads by their channels' summed score, then channels summed over kept heads
                per = s.view(attn.num_heads, attn.head_dim)
                heads = top_of(per.sum(1), b.heads)
                if b.heads < attn.num_heads:
                    kept[f"blocks.{r.index}.heads"] = heads
                if b.head_dim < attn.head_dim:
                    kept[f"blocks.{r.index}.head_dim"] = top_of(per[heads].sum(0), b.head_dim)
            else:
                kept[f"blocks.{r.index}.head_dim"] = regroup(s, attn.num_heads, b.heads, b.head_dim)
        return kept


def _reduced(group: UnitGroup) -> bool:
    """Whether the space lets the group keep fewer units than it has (a range, or a fixed smaller width)."""
    return (
        group.kind in ("embed", "heads", "head_dim", "ffn")
        and min(int(c) for c in group.choices) < group.size
    )


def _kind(group: UnitGroup) -> str:
    return "attention" if group.kind in ("heads", "head_dim") else group.kind


def _kinds(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return KINDS
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UsageError(f"groups: expected 'all' or a comma list of {', '.join(KINDS)}, found '{text}'")
    return kinds
