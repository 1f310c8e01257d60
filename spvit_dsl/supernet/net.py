"""The supernet (lowering stage output, torch): a timm backbone whose every unit group carries a mask.

Input (from :func:`spvit_dsl.supernet.lower.lower`): the :class:`~spvit_dsl.space.plan.Space`, the patched timm model,
one :class:`BlockRow` per block and the shared :class:`~.masks.MaskBoard`. Output: a module a search strategy drives
— it sets masks (:meth:`Supernet.set_masks`) and ops (:meth:`Supernet.set_op`) before a forward, prices any
assignment of kept counts differentiably (:meth:`Supernet.cost`), reads unit magnitudes (:meth:`Supernet.unit_scores`)
and may physically shrink a group (:meth:`Supernet.shrink`). Method-agnostic: SPViT's gates, OFB's
bi-masks and UP-ViT's ablations live in their strategies (:mod:`spvit_dsl.search.methods`) and only write masks here.

A point with its kept units (:meth:`Supernet.set_arch`) sets hard 0/1 masks: the supernet then computes what the
compact network of that point computes (:mod:`spvit_dsl.compact`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..space import cost as cost_model
from ..space.groups import Slice, UnitGroup, block_path, groups, slices
from ..space.plan import BlockPlan, Convention, FrozenArch, Space
from .attention import UnifiedAttention
from .ffn import GatedMlp
from .masks import FixedMasks, MaskBoard

__all__ = ["BlockRow", "Supernet"]


@dataclass
class BlockRow:
    """One block of the supernet: its plan and its two masked modules."""

    plan: BlockPlan
    attn: UnifiedAttention
    mlp: GatedMlp

    @property
    def index(self) -> int:
        return self.plan.geom.index

    @property
    def hidden(self) -> int:
        return self.mlp.hidden


@dataclass(frozen=True)
class _Coupled:
    """A live tensor a group's units own: ``owner.name`` viewed along ``axis`` as (outer, units, inner)."""

    owner: nn.Module
    name: str
    axis: int
    outer: int = 1
    inner: int = 1

    @property
    def tensor(self) -> Tensor:
        return getattr(self.owner, self.name)


class Supernet(nn.Module):
    """The masked supernet over a timm backbone (see the module docstring and docs/supernet.md)."""

    def __init__(
        self,
        space: Space,
        model: nn.Module,
        rows: list[BlockRow],
        board: MaskBoard,
        *,
        convention: Convention = "exact",
        seed: int = 0,
        alpha: float = 0.0,
        masked: frozenset[str] | None = None,
    ) -> None:
        super().__init__()
        self.space = space
        self.model = model
        self.convention: Convention = convention
        self.alpha = alpha
        self.seed = seed
        self.__dict__["_rows"] = rows  # modules already registered inside `model`
        self.__dict__["board"] = board
        self.groups: dict[str, UnitGroup] = {g.path: g for g in groups(space)}
        # the groups some module reads a mask of (lowering wires only those that may keep less than all units)
        self.masked: frozenset[str] = (
            masked
            if masked is not None
            else frozenset(p for p, g in self.groups.items() if g.kind != "attention")
        )
        self.fixed = (
            FixedMasks()
        )  # masks of groups fixed below their dense size (restored by reset; in state dicts)
        self.kept_index: dict[str, Tensor] = {}  # original indices still present per shrunk group

    @property
    def rows(self) -> list[BlockRow]:
        return self.__dict__["_rows"]

    @property
    def board(self) -> MaskBoard:
        return self.__dict__["board"]

    @property
    def geometry(self):  # noqa: ANN201 (Geometry; avoids a circular annotation import in docs)
        return self.space.geometry

    def forward(self, x: Tensor) -> Tensor:
        try:
            return self.model(x)
        finally:
            self._release()

    @torch.no_grad()
    def block_inputs(self, x: Tensor) -> list[Tensor] | None:
        """The tokens entering every block for images ``x`` under the current masks (one forward), so that ablations
        of a block's units can start there (:meth:`forward_from`). ``None`` for a Swin (stages, not one sequence)."""
        blocks = getattr(self.model, "blocks", None)
        if self.geometry.family == "swin" or blocks is None:
            return None
        seen: list[Tensor] = []
        hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for b in blocks]
        try:
            self(x)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def forward_from(self, block: int, tokens: Tensor) -> Tensor:
        """Logits from the tokens entering ``block`` (ViT; see :meth:`block_inputs`): the remaining blocks, the final
        norm and the head, under the current masks."""
        m = self.model
        try:
            h = tokens
            for b in list(m.blocks)[block:]:  # type: ignore[arg-type]
                h = b(h)
            return m.forward_head(m.norm(h))  # type: ignore[operator]
        finally:
            self._release()

    def _release(self) -> None:
        """After a forward, keep the masks' values but not their autograd graph (the graph of the forward keeps
        what backward needs), so the modules hold no graph between steps and stay deep-copyable."""
        for path, mask in self.board.items():
            if mask is not None and mask.requires_grad:
                self.board.set(path, mask.detach())
        for r in self.rows:
            if r.attn._weight is not None:
                r.attn._weight = r.attn._weight.detach()

    # --- choices for the next forward ----------------------------------------------------------------------

    def set_masks(self, masks: Mapping[str, Tensor | None]) -> None:
        """Set group masks by path (``None``: every unit kept).

        Shapes: ``(units,)`` for the batch or ``(B, units)`` per sample for a structured group (``units``: its
        current :meth:`size`); the weight's current shape ``(out, in)`` for a ``weights`` group. ValueError: an
        unknown path, a group no module reads a mask of (``attention``: use :meth:`set_op`; a group the space fixes
        at its dense size), or a wrong shape.
        """
        for path, mask in masks.items():
            if path not in self.groups:
                raise ValueError(
                    f"unknown unit group '{path}' (groups: {', '.join(sorted(self.groups))[:200]} ...)"
                )
            if mask is None:
                continue
            group = self.groups[path]
            if group.kind == "attention":
                raise ValueError(f"{path}: an attention group has no mask (choose its op with set_op)")
            if path not in self.masked:
                raise ValueError(f"{path}: the space keeps this group whole, so no module reads its mask")
            want = tuple(self._layer_weight(group).shape) if group.kind == "weights" else (self.size(path),)
            shape = tuple(mask.shape)
            if shape != want and not (group.structured and len(shape) == 2 and shape[1:] == want):
                raise ValueError(f"{path}: a mask of shape {shape}, expected {want}")
        self.board.update(masks)

    def mask(self, path: str) -> Tensor | None:
        return self.board.get(path)

    def set_op(self, block: int, level: int, weight: Tensor | None = None) -> None:
        """Run the block's candidate ``level`` (index into its plan's ops) next, with a straight-through weight."""
        self.rows[block].attn.choose(level, weight)

    def reset(self) -> None:
        """Every unit kept (fixed groups at their fixed masks); every block at its top candidate op, its original
        heads and no channel probe."""
        self.board.clear()
        self.board.update(self.fixed.as_dict())
        for r in self.rows:
            r.attn.choose(len(r.plan.attention) - 1)
            r.attn.set_regroup(None)
            r.attn.probe = None

    def set_probe(self, block: int, mask: Tensor | None) -> None:
        """A per-sample mask over the block's ``heads · head_dim`` attention channels (B, H·d), head-major: a 0
        removes channel j from q, k and v and proj's column j for that sample (UP-ViT's attention units; the
        batched ablations of its scoring). ``None``: off. ValueError: a wrong shape."""
        attn = self.rows[block].attn
        if mask is not None and (mask.dim() != 2 or mask.shape[1] != attn.attn_dim):
            raise ValueError(
                f"blocks.{block}: a probe of shape {tuple(mask.shape)}, expected (B, {attn.attn_dim})"
            )
        attn.probe = mask

    # --- points --------------------------------------------------------------------------------------------

    def set_arch(self, arch: FrozenArch, kept: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Hard 0/1 masks and ops for ``arch``; ``kept``: kept indices by group path (missing groups: the largest
        units by :meth:`unit_scores`). Returns the kept indices used, for every group below its dense size."""
        if len(arch.blocks) != len(self.rows):
            raise ValueError(f"the architecture has {len(arch.blocks)} blocks, the supernet {len(self.rows)}")
        full = self.kept_for(arch, kept)
        self.reset()
        self.board.update(
            {path: self.mask_of(path, index) for path, index in full.items() if not _regrouped(path, index)}
        )
        for r, b in zip(self.rows, arch.blocks, strict=True):
            if b.op not in r.plan.attention:
                raise ValueError(
                    f"blocks.{r.index}.attention: '{b.op}' is not a candidate {r.plan.attention}"
                )
            r.attn.choose(r.plan.attention.index(b.op))
            index = full.get(f"blocks.{r.index}.head_dim")
            if index is not None and index.dim() == 2:
                r.attn.set_regroup(index)  # replaces the block's head and per-head-channel masks
                self.board.update({f"blocks.{r.index}.heads": None, f"blocks.{r.index}.head_dim": None})
        return full

    def kept_for(self, arch: FrozenArch, kept: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Kept indices of every group that ``arch`` keeps below its current size: ``kept`` where given (checked:
        as many units as ``arch`` says, all in range), else the top units by :meth:`unit_scores`.

        Structured groups get a 1-D index tensor, in the compact network's order: ``kept``'s order where given
        (an ordered list: unit ``index[k]`` becomes the compact network's unit ``k``), ascending where chosen here.
        ``weights`` groups get a bool mask of the weight's shape, among the weights of the kept rows and columns.
        ValueError: a wrong count, an index out of range or a repeated index.
        """
        from ..space.groups import value_of  # noqa: PLC0415

        kept = dict(kept or {})
        arch = arch.canonical()  # no weights masks on layers the point does not run
        out: dict[str, Tensor] = {}
        regrouped = self._regrouped_kept(arch, kept)
        out.update(regrouped)
        for path, group in self.groups.items():
            if group.kind in ("attention", "weights"):
                continue
            if (
                group.block is not None
                and f"blocks.{group.block}.head_dim" in regrouped
                and group.kind
                in (
                    "heads",
                    "head_dim",
                )
            ):
                continue  # the block's heads are regrouped: one (heads, head_dim) index for both
            count, size = int(value_of(arch, group)), self.size(path)
            if count > size or count < 0:
                raise ValueError(f"{path}: {count} units asked, the group has {size}")
            index = kept.get(path)
            given = index is not None
            fixed = self.fixed.get(path)
            if index is None and fixed is not None and int((fixed > 0).sum()) == count:
                index = torch.nonzero(fixed > 0).flatten()  # the units the search kept fixed
            if index is None:
                if count == size:
                    continue
                index = self.top_units(path, count)
            index = index.to(torch.long).flatten()
            if index.numel() != count or (count and (int(index.min()) < 0 or int(index.max()) >= size)):
                raise ValueError(f"{path}: the kept indices do not fit {count} of {size} units")
            if torch.unique(index).numel() != index.numel():
                raise ValueError(f"{path}: the kept indices repeat a unit")
            out[path] = index if given else torch.sort(index).values
        for path, group in self.groups.items():
            if group.kind == "weights":
                density = float(value_of(arch, group))
                if density >= 1:
                    continue  # dense, or a layer the point does not run (canonical)
                mask = kept.get(path)
                if mask is None:  # recomputed for this point: the count depends on the kept rows and columns
                    mask = self.top_weights(path, density, out)
                else:
                    self.check_weights_mask(group, mask.to(torch.bool), density, out)
                out[path] = mask.to(torch.bool)
        return out

    def _regrouped_kept(self, arch: FrozenArch, kept: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The 2-D ``blocks.{i}.head_dim`` entries of ``kept`` (regrouped heads, UP-ViT), checked against ``arch``:
        shape (heads, head_dim) of the point, channels in range and not repeated, and no ``blocks.{i}.heads`` entry
        beside it. ValueError otherwise."""
        out = {}
        for path, index in kept.items():
            if not _regrouped(path, index):
                continue
            i = self.groups[path].block
            assert i is not None
            b, attn = arch.blocks[i], self.rows[i].attn
            if tuple(index.shape) != (b.heads, b.head_dim):
                raise ValueError(
                    f"{path}: regrouped channels of shape {tuple(index.shape)}, the point has "
                    f"{b.heads} heads of {b.head_dim}"
                )
            if f"blocks.{i}.heads" in kept:
                raise ValueError(f"{path}: regrouped heads take no separate blocks.{i}.heads indices")
            flat = index.to(torch.long).flatten()
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= attn.attn_dim):
                raise ValueError(f"{path}: regrouped channels must lie in 0..{attn.attn_dim - 1}")
            if torch.unique(flat).numel() != flat.numel():
                raise ValueError(f"{path}: the regrouped channels repeat a channel")
            out[path] = index.to(torch.long)
        return out

    def mask_of(self, path: str, kept: Tensor) -> Tensor:
        """The 0/1 mask of a group from its kept indices (a weights group's kept mask is its mask)."""
        if self.groups[path].kind == "weights":
            return kept.to(self._dtype())
        mask = torch.zeros(self.size(path), dtype=self._dtype(), device=self._device())
        mask[kept.to(mask.device)] = 1
        return mask

    # --- sizes and magnitudes -----------------------------------------------------------------------------

    def size(self, path: str) -> int:
        """The group's current number of units (its dense size until :meth:`shrink`)."""
        index = self.kept_index.get(path)
        return self.groups[path].size if index is None else int(index.numel())

    def coupled(self, path: str) -> list[_Coupled]:
        """The live parameters and buffers a structured group's units own (timm's slices plus the supernet's own:
        the conv mixing matrix's rows for heads, the conv BatchNorms' channels for per-head channels)."""
        group = self.groups[path]
        out = []
        blocks = [self.rows[group.block]] if group.block is not None else []
        attn = blocks[0].attn if blocks else None
        heads = attn.num_heads if attn is not None else None
        head_dim = attn.head_dim if attn is not None else None
        for s in slices(self.geometry, group, heads=heads, head_dim=head_dim):
            owner, name = self._resolve(s)
            if getattr(owner, name, None) is not None:  # e.g. a qkv without bias
                out.append(_Coupled(owner, name, s.axis, s.outer, s.inner))
        if attn is not None and group.kind == "heads" and attn.max_kernel:
            out.append(_Coupled(attn, "mix", 0))
        if attn is not None and group.kind == "head_dim":
            for bn in attn.bns.values():
                out += [_Coupled(bn, n, 0) for n in ("weight", "bias", "running_mean", "running_var")]
        return out

    def _resolve(self, s: Slice) -> tuple[nn.Module, str]:
        module_path, _, name = s.tensor.rpartition(".")
        return self.model.get_submodule(module_path) if module_path else self.model, name

    @torch.no_grad()
    def unit_scores(self, path: str) -> Tensor:
        """L1 magnitude of every unit of a group: the sum of |value| over the parameter slices it owns (float64;
        buffers such as BatchNorm statistics are not weights and do not count).

        Shape: ``(units,)`` for structured groups; the weight's shape ``(out, in)`` for ``weights`` groups (|w| of
        each weight); ``(steps,)`` for ``attention`` groups, one score per op step down the block's single path —
        the L1 of the weights the step stops using (msa → conv: the query and key rows; conv → the next smaller
        conv: the mixing matrix's outer ring; the smallest conv → skip: the value and output projections). Entries
        line up with :meth:`unit_weights`.
        """
        return self._per_unit(path, lambda t: t.detach().abs().double())

    def unit_weights(self, path: str) -> Tensor:
        """How many weights each unit of :meth:`unit_scores` owns (same shape, float64): the L1 of an all-ones model.

        Divide a kind's summed scores by its summed weights for its mean |w| per weight, the scale on which units
        of different kinds (a channel of thousands of weights, one weight, an op step) compare.
        """
        return self._per_unit(path, lambda t: torch.ones_like(t, dtype=torch.float64))

    @torch.no_grad()
    def unit_sums(self, path: str, value: Callable[[Tensor], Tensor]) -> Tensor:
        """Like :meth:`unit_scores` with any per-weight score: ``value`` maps each parameter the group couples to a
        float64 tensor of its shape (e.g. LAMP scores; zeros for tensors that should not count), summed per unit."""
        return self._per_unit(path, value)

    def _per_unit(self, path: str, value: Callable[[Tensor], Tensor]) -> Tensor:
        group = self.groups[path]
        if group.kind == "weights":
            return value(self._layer_weight(group))
        if group.kind == "attention":
            return self._op_steps(group, value)
        total = torch.zeros(self.size(path), dtype=torch.float64, device=self._device())
        for c in self.coupled(path):
            if not isinstance(c.tensor, nn.Parameter):
                continue  # BatchNorm statistics: shrunk with their channel, but not weights to score
            view = value(c.tensor).movedim(c.axis, 0).reshape(c.outer, self.size(path), c.inner, -1)
            total += view.sum(dim=(0, 2, 3))
        return total

    def _op_steps(self, group: UnitGroup, value: Callable[[Tensor], Tensor]) -> Tensor:
        """One entry per step down the block's single path (see :meth:`unit_scores`), lowest step first."""
        assert group.block is not None
        attn = self.rows[group.block].attn
        D = attn.attn_dim
        qkv = value(attn.qkv.weight)
        qk, v_proj = qkv[: 2 * D].sum(), qkv[2 * D :].sum() + value(attn.proj.weight).sum()

        def used(op: str) -> Tensor:
            """What ``op`` computes with: msa the q, k, v rows and proj; a conv v, proj and its mixing window."""
            if op == "skip":
                return qk * 0
            if op == "msa":
                return qk + v_proj
            k, K = _kernel_of(op), attn.max_kernel
            o = (K - k) // 2
            mix = value(attn.mix).view(attn.num_heads, K, K)[:, o : o + k, o : o + k]
            return v_proj + mix.sum()

        ops = attn.candidates
        steps = [used(upper) - used(lower) for lower, upper in zip(ops, ops[1:], strict=False)]
        return torch.stack(steps).clamp_min(0) if steps else torch.zeros(0, dtype=torch.float64)

    def layers(self, block: int) -> dict[str, nn.Linear]:
        """The sparsifiable layers of a block by name (qkv, proj, fc1, fc2)."""
        r = self.rows[block]
        return {"qkv": r.attn.qkv, "proj": r.attn.proj, "fc1": r.mlp.fc1, "fc2": r.mlp.fc2}

    def layer_paths(self) -> dict[int, str]:
        """``id(linear)`` → the path of its weights group (``blocks.3.attn.qkv``)."""
        return {
            id(module): block_path(r.index, layer)
            for r in self.rows
            for layer, module in self.layers(r.index).items()
        }

    def _layer_weight(self, group: UnitGroup) -> Tensor:
        assert group.block is not None and group.layer is not None
        return self.layers(group.block)[group.layer].weight

    def top_units(self, path: str, count: int) -> Tensor:
        """The ``count`` units of largest :meth:`unit_scores` (ties: lower index first), ascending."""
        order = torch.sort(self.unit_scores(path), descending=True, stable=True).indices
        return torch.sort(order[:count]).values

    def top_weights(self, path: str, density: float, kept: Mapping[str, Tensor]) -> Tensor:
        """A bool mask keeping ``round(density · n)`` weights of largest |w| among the ``n`` weights of the kept rows
        and columns (``kept``: structured kept indices by path, e.g. from :meth:`kept_for`)."""
        group = self.groups[path]
        scores = self.unit_scores(path)
        allowed = self.structured_support(group, kept)
        n = int(allowed.sum())
        count = n if density >= 1 else round(density * n)
        masked = torch.where(allowed, scores, torch.full_like(scores, -1.0))
        order = torch.sort(masked.flatten(), descending=True, stable=True).indices[:count]
        out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        out[order] = True
        return out.view_as(scores)

    def check_weights_mask(
        self, group: UnitGroup, mask: Tensor, density: float, kept: Mapping[str, Tensor]
    ) -> None:
        """A given weights mask must have the layer's shape, lie in the kept rows and columns, and keep
        ``round(density · n)`` of their ``n`` weights (ValueError otherwise: e.g. widths changed after the search)."""
        weight = self._layer_weight(group)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"{group.path}: a weights mask of shape {tuple(mask.shape)}, the layer has {tuple(weight.shape)}"
            )
        support = self.structured_support(group, kept).to(mask.device)
        n = int(support.sum())
        if bool((mask & ~support).any()) or int(mask.sum()) != round(density * n):
            raise ValueError(
                f"{group.path}: the weights mask keeps {int((mask & support).sum())} of the kept rows' and columns' "
                f"{n} weights (and {int((mask & ~support).sum())} outside them); density {density:g} needs "
                f"{round(density * n)}"
            )

    def structured_support(self, group: UnitGroup, kept: Mapping[str, Tensor]) -> Tensor:
        """Bool mask over a layer's weight: the rows and columns its structured groups keep."""
        assert group.block is not None and group.layer is not None
        i, b = group.block, self.geometry.blocks[group.block]
        attn = self.rows[i].attn
        stage_embed = self._embed_path(b.stage)
        rows, cols = self._axis_keep(group, kept, i, attn, stage_embed)
        return rows[:, None] & cols[None, :]

    def _axis_keep(
        self, group: UnitGroup, kept: Mapping[str, Tensor], i: int, attn: UnifiedAttention, embed: str
    ) -> tuple[Tensor, Tensor]:
        weight = self._layer_weight(group)
        dev = weight.device
        e = _bool(kept.get(embed), self.size(embed), dev)
        heads = _bool(kept.get(f"blocks.{i}.heads"), attn.num_heads, dev)
        dims = _bool(kept.get(f"blocks.{i}.head_dim"), attn.head_dim, dev)
        inner = (heads[:, None] & dims[None, :]).flatten()
        ffn = _bool(kept.get(f"blocks.{i}.ffn"), self.rows[i].hidden, dev)
        return {
            "qkv": (inner.repeat(3), e),
            "proj": (e, inner),
            # a packed GLU's fc1: each neuron's value and gate rows
            "fc1": (ffn.repeat(self.geometry.blocks[i].fc1_per_neuron), e),
            "fc2": (e, ffn),
        }[group.layer or ""]

    def _embed_path(self, stage: int) -> str:
        return "embed" if self.geometry.family != "swin" else f"stages.{stage}.embed"

    # --- original and current unit indices (after shrinks) ---------------------------------------------------

    def _layer_axes(self, group: UnitGroup) -> tuple[Tensor, Tensor]:
        """For a weights group: the original row and column index of every current row and column of its layer."""
        assert group.block is not None and group.layer is not None
        i, b = group.block, self.geometry.blocks[group.block]

        def orig(path: str, size: int) -> Tensor:
            return self.kept_index.get(path, torch.arange(size))

        embed = orig(self._embed_path(b.stage), b.dim)
        heads, dims = orig(f"blocks.{i}.heads", b.heads), orig(f"blocks.{i}.head_dim", b.head_dim)
        inner = (heads[:, None] * b.head_dim + dims[None, :]).flatten()
        ffn = orig(f"blocks.{i}.ffn", b.hidden)
        D = b.heads * b.head_dim
        return {
            "qkv": (torch.cat([inner + t * D for t in range(3)]), embed),
            "proj": (embed, inner),
            "fc1": (torch.cat([ffn + t * b.hidden for t in range(b.fc1_per_neuron)]), embed),
            "fc2": (embed, ffn),
        }[group.layer]

    def to_original(self, kept: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Kept units given in the current (possibly shrunk) indexing → the dense backbone's indexing, which
        checkpoints store (a weights mask is scattered into the dense weight's shape)."""
        out = {}
        for path, index in kept.items():
            group = self.groups[path]
            if group.kind == "weights":
                rows, cols = self._layer_axes(group)
                full = torch.zeros(_dense_shape(self.geometry, group), dtype=torch.bool)
                full[rows[:, None], cols[None, :]] = index.cpu().to(torch.bool)
                out[path] = full
            elif _regrouped(path, index):
                self._check_unshrunk(path)
                out[path] = index
            elif path in self.kept_index:
                out[path] = self.kept_index[path][index.cpu()]  # in the given order
            else:
                out[path] = index
        for path, index in self.kept_index.items():  # a shrunk group kept whole: its remaining units
            out.setdefault(path, torch.sort(index).values)
        return out

    def to_current(self, kept: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`to_original`; a unit that a shrink removed is a ValueError."""
        out = {}
        for path, index in kept.items():
            group = self.groups[path]
            if group.kind == "weights":
                rows, cols = self._layer_axes(group)
                out[path] = index.cpu()[rows[:, None], cols[None, :]]
            elif _regrouped(path, index):
                self._check_unshrunk(path)
                out[path] = index
            elif path in self.kept_index:
                where = {int(u): k for k, u in enumerate(self.kept_index[path].tolist())}
                missing = [int(u) for u in index.tolist() if int(u) not in where]
                if missing:
                    raise ValueError(
                        f"{path}: units {missing[:5]} were removed by a shrink during the search"
                    )
                out[path] = torch.tensor([where[int(u)] for u in index.tolist()], dtype=torch.long)
            else:
                out[path] = index
        return out

    def _check_unshrunk(self, path: str) -> None:
        i = self.groups[path].block
        if f"blocks.{i}.heads" in self.kept_index or f"blocks.{i}.head_dim" in self.kept_index:
            raise ValueError(f"{path}: regrouped heads of a block whose heads were shrunk during the search")

    # --- cost ----------------------------------------------------------------------------------------------

    def cost(
        self, counts: cost_model.Counts, convention: Convention | None = None, metric: str = "macs"
    ) -> Tensor:
        """The analytic cost of an assignment of (expected) counts as a differentiable float64 tensor: ``macs``
        (multiply-adds) or ``params``. Products of counts are exact; at integer counts this is
        :func:`spvit_dsl.space.cost.arch_cost`."""
        if metric not in ("macs", "params", "flops"):
            raise ValueError(f"unknown cost metric '{metric}'; expected 'macs' or 'params'")
        value = cost_model.tally(self.geometry, counts, convention or self.convention).of(metric)
        if isinstance(value, Tensor):
            return value.to(torch.float64)
        return torch.tensor(float(value), dtype=torch.float64, device=self._device())

    # --- shrinking -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def shrink(self, path: str, keep: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Physically keep only the units ``keep`` (indices into the group's *current* units, in the order given) of
        a structured group: every coupled parameter and buffer is sliced, so are the moments of ``optimizers``
        and the masks on the board. :attr:`kept_index` records which original units remain."""
        from ._shrink import shrink_group  # noqa: PLC0415

        shrink_group(self, path, keep, list(optimizers))

    # --- helpers -------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def extra_repr(self) -> str:
        g = self.geometry
        decided = sum(1 for grp in self.groups.values() if grp.decision)
        return (
            f"backbone={g.model}, family={g.family}, blocks={g.depth}, decisions={decided}, "
            f"convention={self.convention}, seed={self.seed}"
        )


def _dense_shape(geometry, group: UnitGroup) -> tuple[int, int]:  # noqa: ANN001
    assert group.block is not None
    b = geometry.blocks[group.block]
    D = b.heads * b.head_dim
    fc1 = b.fc1_per_neuron * b.hidden  # a packed GLU's value and gate rows
    return {"qkv": (3 * D, b.dim), "proj": (b.dim, D), "fc1": (fc1, b.dim), "fc2": (b.dim, b.hidden)}[
        group.layer or ""
    ]


def _bool(index: Tensor | None, size: int, device: torch.device) -> Tensor:
    out = torch.ones(size, dtype=torch.bool, device=device)
    if index is not None:
        out[:] = False
        out[index.to(device)] = True
    return out


def _kernel_of(op: str) -> int:
    from ..space.ops import OPS  # noqa: PLC0415

    k = OPS.get(op).kernel
    assert k is not None
    return k


def _regrouped(path: str, index: Tensor) -> bool:
    """Whether a kept entry is a regrouped-heads index: ``blocks.{i}.head_dim`` as (heads, head_dim)."""
    return path.endswith(".head_dim") and index.dim() == 2
