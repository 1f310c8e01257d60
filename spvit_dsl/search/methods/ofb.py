"""The ``ofb`` strategy (search stage, torch): OFB's bi-masks, progressive shrinking and masked image modelling.

OFB (Ye et al., "Once for Both", CVPR 2024, arXiv 2403.15835) learns *which* units matter and *how many* to keep in
one stage. Every searched unit group carries a bi-mask

    m_u = λ(t)·σ(S_u) + (1 − λ(t))·V(rank of u),   V(r) = Σ_c p_c · 1[r < k_c],   p = softmax(α) over active c,

where ``S`` is a learnable importance logit per unit, ``α`` are logits over the group's candidate sizes ``k_c`` and
units are ranked by ``S`` (rank 0: the largest). ``λ`` falls linearly 0.99 → 0.1 over the warm-up, then stays. The
loss adds ``budget_weight · ((F(E[k]) − F_target) / F_dense)²`` (``F``: the analytic cost of the expected kept
counts, :meth:`~spvit_dsl.supernet.Supernet.cost`), an adaptive one-hot term per group (:func:`onehot_loss`) with a
small L1 on ``σ(S)``, and progressive masked image modelling (:class:`PixelDecoder`, :func:`mim_loss`).
``shrinks_per_epoch`` times per epoch (3) the shrinking check drops candidates whose ``p ≤ threshold / K``,
physically shrinks a group to its largest surviving candidate (the top units by ``S``; tensors and optimizer moments
sliced), and when one candidate is left folds the group's mask into the weights and stops searching it. When every group has finished, the mask tokens and
decoder switch off and the run continues as fine-tuning.

Ours (docs/ofb.md): heads × per-head width as a joint choice is masked through the two separable masks with the
marginals of the joint ``p`` (the cost uses the exact expectation of the product); the embedding mask cannot fold
exactly (the masked LayerNorms weigh their statistics by it), so a finished embedding group drops its mask;
Swin support (per-stage embedding widths); a final budget projection (:func:`~..budget.project`) makes the frozen
network meet every budget whatever the loss reached; shrinking starts after the warm-up and never drops a candidate
that would leave the dearest network below 99% of the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...lang.errors import UsageError
from ...runtime.optim import adamw, param_groups
from ...space.cost import BlockCounts, Counts
from ...space.geometry import Geometry
from ...space.groups import UnitGroup, embed_path, value_of, with_value
from ...space.plan import LAYERS, FrozenArch, dense_arch
from ...supernet._shrink import replace_parameter
from ..budget import GroupSteps, project
from ..protocol import JSON, Batch, Decisions, SearchContext, Shrink, Strategy, register_implementation
from .magnitude import steps_from_scores, top_of

__all__ = [
    "Choice",
    "OfbStrategy",
    "PixelDecoder",
    "lambda_at",
    "mim_loss",
    "mim_ratio_at",
    "onehot_loss",
    "rank_values",
]

LAMBDA_START, LAMBDA_END = 0.99, 0.1
L1_ATTENTION, L1_OTHER = 4e-4, 1e-4  # OFB's L1 weights on σ(S): attention units, everything else
_EPS = 0.05  # keeps tan(π/2 − π·σ²/σ²_max) finite at exactly uniform or exactly one-hot p


# --- the formulas --------------------------------------------------------------------------------------------


def rank_values(p: Tensor, sizes: Tensor, units: int) -> Tensor:
    """``V(r) = Σ_c p_c · 1[r < k_c]`` for ranks ``r = 0 .. units − 1``: the probability that the kept count exceeds
    ``r``. ``p``: (K,) probabilities of the active candidates; ``sizes``: (K,) their kept counts. Returns (units,),
    non-increasing in ``r``; differentiable in ``p``."""
    r = torch.arange(units, device=p.device)
    return (p[None, :] * (r[:, None] < sizes.to(p.device)[None, :]).to(p.dtype)).sum(1)


def onehot_loss(p: Tensor, eps: float = _EPS) -> Tensor:
    """OFB's adaptive one-hot loss of a group's candidate probabilities ``p`` (K ≥ 2 active): the entropy of ``p``
    plus ``tan(π/2 − π·σ²/σ²_max) / K`` with ``σ² = Σ_c (p_c − 1/K)²`` and ``σ²_max = 1 − 1/K`` (its value at a
    one-hot ``p``). The second term tends to +∞ as ``p`` approaches uniform and to −∞ as it approaches one-hot (the
    ratio is squeezed affinely into [ε, 1 − ε] to stay finite, keeping its gradient; ε = 0.05 by default, ours: a
    smaller ε lets the first steps' huge gradients dominate Adam's second moment and freezes α). K = 1: zero."""
    k = p.numel()
    p = p.double()  # 1 − ratio near one-hot needs more than float32's 7 digits
    if k < 2:
        return p.sum() * 0.0
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    var = ((p - 1.0 / k) ** 2).sum()
    ratio = eps + (1.0 - 2.0 * eps) * var / (1.0 - 1.0 / k)  # squeezed into [ε, 1 − ε], gradient kept
    return entropy + torch.tan(math.pi / 2 - math.pi * ratio) / k


def lambda_at(progress: float, warmup: float) -> float:
    """λ at ``progress``: 0.99 falling linearly to 0.1 at ``warmup``, then constant (both in one unit: optimizer
    steps in the search, or fractions of the run)."""
    t = min(1.0, max(0.0, progress) / warmup) if warmup > 0 else 1.0
    return LAMBDA_END if t >= 1.0 else LAMBDA_START + (LAMBDA_END - LAMBDA_START) * t


def mim_ratio_at(progress: float, warmup: float, start: float, end: float) -> float:
    """The share of patch tokens masked at ``progress``: ``start`` rising linearly to ``end`` at ``warmup``."""
    t = min(1.0, max(0.0, progress) / warmup) if warmup > 0 else 1.0
    return end if t >= 1.0 else start + (end - start) * t


def mim_loss(pred: Tensor, images: Tensor, token_mask: Tensor, patch: int) -> Tensor:
    """L1 between the decoder's ``pred`` (B, C, H, W) and the locally normalised images on the masked patches.

    ``images`` (B, C, H, W); ``token_mask`` (B, gh, gw) bool, True where a patch token was replaced by the mask
    token; ``patch``: the patch size in pixels. Targets are normalised per patch (mean and variance over its
    C·patch² pixels, as MAE's normalised-pixel loss). Both tensors are cropped to the pixels the token grid covers.
    """
    b, c, _, _ = images.shape
    gh, gw = token_mask.shape[1:]
    h, w = gh * patch, gw * patch
    x = images[:, :, :h, :w].float().reshape(b, c, gh, patch, gw, patch)
    mean = x.mean(dim=(1, 3, 5), keepdim=True)
    var = x.var(dim=(1, 3, 5), keepdim=True, unbiased=False)
    target = ((x - mean) / (var + 1e-6).sqrt()).reshape(b, c, h, w)
    where = token_mask[:, None, :, None, :, None].expand(b, c, gh, patch, gw, patch).reshape(b, c, h, w)
    p = pred[:, :, :h, :w].float()
    count = where.sum().clamp_min(1)
    return ((p - target).abs() * where).sum() / count


class PixelDecoder(nn.Module):
    """OFB's light decoder: a 1×1 convolution from the final patch features (B, C, gh, gw) to ``stride²·channels``
    maps, then a pixel shuffle to (B, channels, gh·stride, gw·stride)."""

    def __init__(self, features: int, stride: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(features, stride * stride * channels, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.conv(x))


# --- the searched choices ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One softmax over candidate sizes: a single group (``paths`` of length 1) or heads × per-head width chosen
    jointly (``paths`` = (heads, head_dim), ``values`` the pairs). ``values[c][j]``: candidate ``c``'s kept count of
    ``paths[j]``."""

    name: str
    paths: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]

    @property
    def key(self) -> str:
        return self.name.replace(".", "__")


def _choices(net_groups: dict[str, UnitGroup], joint_blocks: set[int]) -> list[Choice]:
    """The searched choices of a space: every structured group with several candidates; heads and head_dim of a
    joint block become one choice over their product."""
    out: list[Choice] = []
    taken: set[str] = set()
    for path, g in net_groups.items():
        if path in taken or not g.decision or g.kind not in ("embed", "heads", "head_dim", "ffn"):
            continue
        if g.kind in ("heads", "head_dim") and g.block in joint_blocks:
            hp, dp = f"blocks.{g.block}.heads", f"blocks.{g.block}.head_dim"
            h, d = net_groups[hp], net_groups[dp]
            if h.decision and d.decision:
                pairs = tuple((int(a), int(b)) for a in h.choices for b in d.choices)
                out.append(Choice(f"blocks.{g.block}.attention_shape", (hp, dp), pairs))
                taken |= {hp, dp}
                continue
        out.append(Choice(path, (path,), tuple((int(v),) for v in g.choices)))
        taken.add(path)
    return out


class OfbTensors(nn.Module):
    """The strategy's own tensors: importance logits ``S`` per searched group (one per current unit), candidate
    logits ``α`` per choice, and for masked image modelling the mask token and the pixel decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.importance = nn.ParameterDict()
        self.logits = nn.ParameterDict()
        self.mask_token: nn.Parameter | None = None
        self.decoder: PixelDecoder | None = None


# --- the strategy -----------------------------------------------------------------------------------------------


@register_implementation
class OfbStrategy(Strategy):
    """OFB with the budget projection of spvit-dsl as the final guarantee (see the module docstring)."""

    name = "ofb"
    kind = "train"

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        s, net = ctx.settings, ctx.net
        joint = {p.geom.index for p in ctx.program.space.plans if p.joint}
        self.choices = _choices(net.groups, joint)
        self._check_ops()
        self.gen = torch.Generator().manual_seed(int(s["seed"]))
        self.tensors = OfbTensors()
        dev = ctx.device
        for ch in self.choices:
            alpha = torch.empty(len(ch.values))
            nn.init.trunc_normal_(
                alpha, std=0.01, a=-0.02, b=0.02, generator=self.gen
            )  # breaks ties between sizes
            self.tensors.logits[ch.key] = nn.Parameter(alpha.to(dev))
            for path in ch.paths:
                init = torch.empty(net.size(path))
                nn.init.trunc_normal_(init, std=0.2, a=-0.4, b=0.4, generator=self.gen)
                self.tensors.importance[path.replace(".", "__")] = nn.Parameter(init.to(dev))
        self.active: dict[str, list[bool]] = {ch.name: [True] * len(ch.values) for ch in self.choices}
        self.finished: list[str] = []
        self.pending: list[str] = []  # finished choices whose masks fold before the next step
        self.checks = 0
        self.lam = LAMBDA_START
        self.ratio = 0.0
        self._step_index = 0
        # the warm-up in optimizer steps, fixed at the start (a resume with more --epochs keeps its schedules)
        self.warm_steps = round(float(s["warmup_fraction"]) * ctx.total_steps)
        self.mim = bool(s["mim"]) and bool(self.choices)
        self._fold_lam = LAMBDA_START
        self._geometry_for_mim()
        self.opt_w = adamw(
            [
                *param_groups(net, float(s["weight_decay"])),
                {"params": list(self.tensors.importance.values()), "weight_decay": 0.0},
            ],
            lr=float(s["lr"]),
        )
        self.opt_a = adamw(
            list(self.tensors.logits.values()), lr=float(s["arch_lr"]), weight_decay=0.0, betas=(0.5, 0.999)
        )
        dec = [p for p in (self.tensors.mask_token,) if p is not None]
        if self.tensors.decoder is not None:
            dec += list(self.tensors.decoder.parameters())
        self.opt_d = (
            adamw(dec, lr=float(s["decoder_lr"]) or float(s["lr"]), weight_decay=0.0) if dec else None
        )
        self._token_mask: Tensor | None = None
        self._masking = False
        self._pred: Tensor | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if self.mim:
            self._hooks = [
                net.model.get_submodule("patch_embed").register_forward_hook(self._mask_tokens),
                net.model.get_submodule(_final_norm(net.geometry)).register_forward_hook(self._decode),
            ]
        self._costs: dict[str, float] = {}
        self._dense = ctx.price(dense_arch(net.geometry))

    # --- set-up --------------------------------------------------------------------------------------------

    def _check_ops(self) -> None:
        for ch in self.choices:
            g = self.ctx.net.groups[ch.paths[0]]
            if g.kind in ("heads", "head_dim") and g.block is not None:
                ops = self.ctx.net.rows[g.block].plan.attention
                if ops != ("msa",):
                    raise UsageError(
                        f"ofb searches heads and per-head widths of msa blocks; blocks.{g.block} runs {', '.join(ops)}"
                        ": declare `attention: msa` there, or search it with another strategy"
                    )

    def _geometry_for_mim(self) -> None:
        geo = self.ctx.net.geometry
        if not self.mim:
            return
        dev = self.ctx.device
        stride = geo.patch_size * (2 ** (geo.stages - 1) if geo.family == "swin" else 1)
        self.tensors.mask_token = nn.Parameter(torch.zeros(self.ctx.net.size(embed_path(geo, 0)), device=dev))
        last = self.ctx.net.size(embed_path(geo, geo.stages - 1))
        self.tensors.decoder = PixelDecoder(last, stride, geo.in_chans).to(dev)

    # --- state the loop checkpoints ------------------------------------------------------------------------

    def module(self) -> nn.Module:
        return self.tensors

    def generator(self) -> torch.Generator:
        return self.gen

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out: dict[str, torch.optim.Optimizer] = {"weights": self.opt_w, "arch": self.opt_a}
        if self.opt_d is not None:
            out["decoder"] = self.opt_d
        return out

    def state_dict(self) -> dict[str, JSON]:
        return {
            "active": {k: list(v) for k, v in self.active.items()},
            "finished": list(self.finished),
            "pending": list(self.pending),
            "fold_lambda": self._fold_lam,
            "checks": self.checks,
            "warm_steps": self.warm_steps,
            "sizes": {k.replace("__", "."): int(v.numel()) for k, v in self.tensors.importance.items()},
        }

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        """Restore the schedules and bring the strategy's tensors to the checkpoint's (shrunk) shapes; called by the
        loop before the tensors are loaded."""
        active, sizes = state.get("active", {}), state.get("sizes", {})
        assert isinstance(active, dict) and isinstance(sizes, dict)
        self.active = {k: [bool(b) for b in v] for k, v in active.items()}  # type: ignore[union-attr]
        self.finished = [str(x) for x in state.get("finished", [])]  # type: ignore[union-attr]
        self.pending = [str(x) for x in state.get("pending", [])]  # type: ignore[union-attr]
        self._fold_lam = float(state.get("fold_lambda", LAMBDA_START))  # type: ignore[arg-type]
        self.checks = int(state.get("checks", 0))  # type: ignore[arg-type]
        self.warm_steps = int(state.get("warm_steps", self.warm_steps))  # type: ignore[arg-type]
        for path, size in sizes.items():
            self._resize(path, torch.arange(int(size)))  # type: ignore[arg-type]

    def _resize(self, path: str, keep: Tensor) -> None:
        """Keep units ``keep`` (1-D, current unit indices) of the strategy's tensors over group ``path``: S; the mask
        token for stage 0's embedding; the decoder's input channels for the last stage's. Their optimizer moments
        are sliced with them."""
        geo, t = self.ctx.net.geometry, self.tensors
        keep = keep.to(torch.long)
        key = path.replace(".", "__")
        if key in t.importance:
            self._slice(t.importance, key, 0, keep)
        if t.mask_token is not None and path == embed_path(geo, 0):
            self._slice(t, "mask_token", 0, keep)
        if t.decoder is not None and path == embed_path(geo, geo.stages - 1):
            self._slice(t.decoder.conv, "weight", 1, keep)
            t.decoder.conv.in_channels = keep.numel()

    def _slice(self, owner: nn.Module, name: str, axis: int, keep: Tensor) -> None:
        """``owner.name`` cut to ``keep`` along ``axis`` (nothing when ``keep`` is every unit in order)."""
        old = owner._parameters[name]
        assert old is not None
        if old.shape[axis] == keep.numel() and torch.equal(keep, torch.arange(keep.numel())):
            return
        new = old.detach().index_select(axis, keep.to(old.device)).clone()
        replace_parameter(owner, name, new, list(self.optimizers().values()), axis, keep)

    # --- per step --------------------------------------------------------------------------------------------

    def _probs(self, ch: Choice) -> tuple[Tensor, list[int]]:
        """p over the choice's active candidates, and their indices."""
        idx = [c for c, a in enumerate(self.active[ch.name]) if a]
        logits = self.tensors.logits[ch.key]
        return torch.softmax(logits[idx], 0), idx

    def _scores(self, path: str) -> Tensor:
        return self.tensors.importance[path.replace(".", "__")]

    def mask_of(self, ch: Choice, j: int, lam: float) -> Tensor:
        """The bi-mask of ``ch.paths[j]`` over its current units (differentiable in S and α)."""
        p, idx = self._probs(ch)
        s = self._scores(ch.paths[j])
        sizes = torch.tensor([ch.values[c][j] for c in idx], dtype=torch.long)
        v = rank_values(p, sizes, s.numel())
        order = torch.argsort(s.detach(), descending=True, stable=True)
        per_unit = v.new_zeros(v.shape).index_put((order,), v)  # unit order[r] has rank r
        return lam * torch.sigmoid(s) + (1.0 - lam) * per_unit

    def searching(self) -> list[Choice]:
        return [ch for ch in self.choices if ch.name not in self.finished]

    def draw(self, training: bool) -> None:
        masks: dict[str, Tensor | None] = {}
        for ch in self.searching():
            for j, path in enumerate(ch.paths):
                masks[path] = self.mask_of(ch, j, self.lam)
        self.ctx.net.set_masks(masks)
        self._pred = None
        self._token_mask = None
        self._masking = training and self.mim and bool(self.searching()) and self.ratio > 0

    def _draw_tokens(self, batch: int, grid: tuple[int, int]) -> Tensor:
        """Which patch tokens the mask token replaces this step: (B, gh, gw) bool, max(1, round(ratio·N)) per image, drawn
        from the strategy's generator (checkpointed)."""
        gh, gw = grid
        n = gh * gw
        count = max(1, round(self.ratio * n))
        order = torch.rand(batch, n, generator=self.gen).argsort(1)
        mask = torch.zeros(batch, n, dtype=torch.bool)
        mask.scatter_(1, order[:, :count], True)
        return mask.view(batch, gh, gw).to(self.ctx.device)

    def _mask_tokens(self, _module: nn.Module, _args: object, out: Tensor) -> Tensor | None:
        """Forward hook on the patch embedding: replace the drawn tokens by the mask token (training steps while
        groups are searched). ``out``: ViT (B, N, C), Swin (B, H, W, C)."""
        token = self.tensors.mask_token
        if not self._masking or token is None:
            return None
        grid = (int(out.shape[1]), int(out.shape[2])) if out.dim() == 4 else _square(int(out.shape[1]))
        mask = self._draw_tokens(int(out.shape[0]), grid)
        self._token_mask = mask
        where = mask.view(out.shape[0], -1, 1) if out.dim() == 3 else mask[..., None]
        return torch.where(where, token.to(out.dtype), out)

    def _decode(self, _module: nn.Module, _args: object, out: Tensor) -> Tensor | None:
        """Forward hook on the final norm (:func:`_final_norm`): decode the patch features of a masked step into
        pixels. The output gains ``0 · Σ pred``, so the decoder is part of the forward's graph (DDP finds its gradients
        from the output)."""
        if self._token_mask is None or self.tensors.decoder is None:
            return None
        if out.dim() == 3:  # ViT: (B, prefix + N, C); SwinV2-CR's norm3: (B, H·W, C), no prefix
            tokens = out[:, self.ctx.net.geometry.prefix_tokens :]
            gh, gw = _square(tokens.shape[1])
            fmap = tokens.reshape(out.shape[0], gh, gw, -1)
        else:  # Swin: (B, H, W, C)
            fmap = out
        self._pred = self.tensors.decoder(fmap.permute(0, 3, 1, 2).to(self.tensors.decoder.conv.weight.dtype))
        return out + 0.0 * self._pred.sum().to(out.dtype)

    def before_step(self, epoch: float) -> None:
        ctx = self.ctx
        self._step_index = round(epoch * max(1, ctx.steps_per_epoch))
        self.lam = lambda_at(self._step_index, self.warm_steps)
        s = ctx.settings
        self.ratio = mim_ratio_at(
            self._step_index, self.warm_steps, float(s["mim_start"]), float(s["mim_end"])
        )
        if self.pending:
            self._fold_pending()

    def expected_counts(self, arch: FrozenArch) -> Counts:
        """Counts with every searched group at its expected kept count ``E[k] = Σ p_c k_c`` (joint heads × per-head
        width: heads at ``E[h]`` and per-head width at ``E[h·d] / E[h]``, so their product is exact); every other
        dimension as in ``arch`` (the derived network)."""
        net = self.ctx.net
        embed: list[object] = list(arch.embed)
        per_block: dict[int, dict[str, object]] = {}
        for ch in self.searching():
            p, idx = self._probs(ch)
            vals = torch.tensor([ch.values[c] for c in idx], dtype=torch.float64, device=p.device)
            pd = p.double()
            g = net.groups[ch.paths[0]]
            if len(ch.paths) == 2:
                eh = (pd * vals[:, 0]).sum()
                ehd = (pd * vals[:, 0] * vals[:, 1]).sum()
                per_block.setdefault(int(g.block or 0), {}).update(heads=eh, head_dim=ehd / eh)
                continue
            e = (pd * vals[:, 0]).sum()
            if g.kind == "embed":
                embed[g.stage] = e
            else:
                per_block.setdefault(int(g.block or 0), {})[g.kind] = e
        blocks = []
        for i, b in enumerate(arch.blocks):
            over = per_block.get(i, {})
            blocks.append(
                BlockCounts(
                    {b.op: 1},
                    over.get("heads", b.heads),
                    over.get("head_dim", b.head_dim),
                    over.get("ffn", b.ffn),
                    {layer: b.density.of(layer) for layer in LAYERS},
                )
            )
        return Counts(embed, blocks)

    def extra_loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        ctx, s = self.ctx, self.ctx.settings
        terms: list[Tensor] = []
        searching = self.searching()
        derived = self.derived()
        if searching and ctx.targets:
            counts = self.expected_counts(derived)
            for t in ctx.targets:
                f = ctx.expected_cost(counts, t)
                gap = (f - t.limit) / self._dense[t.metric]
                terms.append(float(s["budget_weight"]) * gap * gap)
        for ch in searching:
            p, _ = self._probs(ch)
            terms.append(float(s["onehot_weight"]) * onehot_loss(p).double())
            for path in ch.paths:
                kind = ctx.net.groups[path].kind
                coef = L1_ATTENTION if kind in ("heads", "head_dim") else L1_OTHER
                terms.append(coef * torch.sigmoid(self._scores(path)).sum().double())
        if self._pred is not None and self._token_mask is not None:
            geo = ctx.net.geometry
            loss = mim_loss(self._pred, batch.images, self._token_mask, geo.patch_size)
            with torch.no_grad():
                task = F.cross_entropy(logits.float(), batch.targets)
                scale = float(task) / max(float(loss), 1e-8)
            terms.append((scale * loss).double())
        self._pred = None
        self._costs = {m: float(v) for m, v in self.ctx.price(derived).items()}
        return torch.stack(terms).sum().float() if terms else None

    def step(self) -> None:
        self.opt_w.step()
        self.opt_a.step()
        if self.opt_d is not None and self.mim and self.searching():
            self.opt_d.step()

    # --- progressive shrinking ------------------------------------------------------------------------------

    def shrinks(self) -> list[Shrink]:
        ctx = self.ctx
        per_epoch = max(1, int(ctx.settings["shrinks_per_epoch"]))
        done = self._step_index + 1
        due = done * per_epoch // max(1, ctx.steps_per_epoch)
        if due <= self.checks:
            return []
        self.checks = due
        if self._step_index < self.warm_steps:  # ours: choices wait until α shapes the masks (λ at its floor)
            return []
        return self.check()

    @torch.no_grad()
    def check(self) -> list[Shrink]:
        """One progressive-shrinking check: drop unlikely candidates, shrink groups whose largest candidate fell,
        finish groups with one candidate left (their masks fold before the next step)."""
        ctx, net = self.ctx, self.ctx.net
        if ctx.world > 1 and dist.is_available() and dist.is_initialized():
            for p in self.tensors.logits.values():  # identical decisions on every rank
                dist.all_reduce(p.data)
                p.data /= ctx.world
        threshold = float(ctx.settings["shrink_threshold"])
        cuts: list[Shrink] = []
        for ch in self.searching():
            p, idx = self._probs(ch)
            k = len(idx)
            best = idx[int(torch.argmax(p))]
            unlikely = sorted((pc, c) for c, pc in zip(idx, p.tolist(), strict=True) if pc <= threshold / k)
            for _, c in unlikely:
                if c == best:
                    continue
                before = self._dearest()
                self.active[ch.name][c] = False
                if not self._still_reachable(before, self._dearest()):
                    self.active[ch.name][c] = True  # dropping it would put the budget out of reach
            alive = [c for c, a in enumerate(self.active[ch.name]) if a]
            for j, path in enumerate(ch.paths):
                top = max(ch.values[c][j] for c in alive)
                if top < net.size(path):
                    cuts.append(Shrink(path, top_of(self._scores(path).detach().cpu(), top)))
            if len(alive) == 1:
                self.finished.append(ch.name)
                self.pending.append(ch.name)
                self._fold_lam = self.lam
        self._agree(cuts)  # before anything is cut
        for cut in cuts:
            self._resize(cut.path, cut.keep)
        return cuts

    def _agree(self, cuts: list[Shrink]) -> None:
        """Under DDP, every rank must take the same shrinking decisions (they follow from the all-reduced α and
        the DDP-averaged S); a difference is an internal error, raised before any tensor is cut."""
        ctx = self.ctx
        if ctx.world <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        mine = repr((self.active, self.finished, [(c.path, c.keep.tolist()) for c in cuts]))
        seen: list[object] = [None] * ctx.world
        dist.all_gather_object(seen, mine)
        if len(set(map(str, seen))) != 1:
            raise RuntimeError("internal error: data-parallel ranks took different OFB shrinking decisions")

    def _dearest(self) -> dict[str, float]:
        """The cost (metric → value) of the dearest network the active candidates still allow."""
        net = self.ctx.net
        hi = self.ctx.program.space.largest()
        for ch in self.choices:
            large = max((ch.values[c] for c, a in enumerate(self.active[ch.name]) if a), key=math.prod)
            for j, path in enumerate(ch.paths):
                hi = with_value(hi, net.groups[path], large[j])
        return self.ctx.price(hi)

    def _still_reachable(self, before: dict[str, float], after: dict[str, float]) -> bool:
        """Whether a drop keeps a network within 1% under the budgets reachable: the dearest network the active
        candidates allow (``before``/``after`` the drop: metric → cost) must stay at or above 99% of the budget it
        meets last (the largest cost/limit ratio; the others are met on the way down). A shrink removes units for
        good, so the final projection could not add them back; cheaper networks always stay reachable, since the
        projection may take any candidate below a group's size. Only a drop that takes that network from reachable
        to out of reach is refused."""
        if not self.ctx.targets:
            return True

        def binding(cost: dict[str, float]) -> float:
            return max(cost[t.metric] / t.limit for t in self.ctx.targets)

        return not (binding(after) < 0.99 <= binding(before))

    @torch.no_grad()
    def _fold_pending(self) -> None:
        for name in self.pending:
            ch = next(c for c in self.choices if c.name == name)
            for j, path in enumerate(ch.paths):
                mask = self.mask_of(ch, j, self._fold_lam)
                self.fold(path, mask)
        self.pending = []

    @torch.no_grad()
    def fold(self, path: str, mask: Tensor) -> None:
        """Fold a group's per-unit ``mask`` into the layers that read it, so the network computes without the mask
        what it computed with it, and clear the mask. FFN neuron: fc2's column; head: proj's columns of the head;
        per-head channel: its query row of qkv (and bias; SwinV2: its key row too) and proj's columns. The embedding
        mask weighs the masked LayerNorms' statistics and cannot fold exactly: it is dropped."""
        net = self.ctx.net
        g = net.groups[path]
        m = mask.detach()
        if g.kind == "ffn":
            fc2 = net.rows[int(g.block or 0)].mlp.fc2
            fc2.weight.mul_(m.to(fc2.weight.dtype)[None, :])
        elif g.kind in ("heads", "head_dim"):
            attn = net.rows[int(g.block or 0)].attn
            h, d = attn.num_heads, attn.head_dim
            per = m.repeat_interleave(d) if g.kind == "heads" else m.repeat(h)
            attn.proj.weight.mul_(per.to(attn.proj.weight.dtype)[None, :])
            if g.kind == "head_dim":
                # the query rows; SwinV2's cosine attention also the key rows (its key norm would see them)
                k_rows = per if attn.cosine else per.new_ones(h * d)
                rows = torch.cat([per, k_rows, per.new_ones(h * d)]).to(attn.qkv.weight.dtype)
                attn.qkv.weight.mul_(rows[:, None])
                if attn.qkv.bias is not None:
                    attn.qkv.bias.mul_(rows)
                q_bias = getattr(attn, "q_bias", None)  # SwinV2 keeps q's bias apart (k has none)
                if attn.cosine and q_bias is not None:
                    q_bias.mul_(per.to(q_bias.dtype))
        net.set_masks({path: None})

    # --- what the strategy would choose now ----------------------------------------------------------------

    def derived(self) -> FrozenArch:
        """Every searched group at its most likely active candidate (a finished group: its last one)."""
        arch = self.ctx.program.space.largest()
        net = self.ctx.net
        for ch in self.choices:
            p, idx = self._probs(ch)
            best = idx[int(torch.argmax(p.detach()))]
            for j, path in enumerate(ch.paths):
                arch = with_value(arch, net.groups[path], ch.values[best][j])
        return arch

    def costs(self) -> dict[str, float]:
        return dict(self._costs) if self._costs else super().costs()

    def metrics(self) -> dict[str, float]:
        out = {"lambda": self.lam, "searching": float(len(self.searching()))}
        if self.mim and self.searching():
            out["mim_ratio"] = self.ratio
        return out

    # --- the end of the search -----------------------------------------------------------------------------

    def _steps(self, arch: FrozenArch) -> list[GroupSteps]:
        """Each searched group as projection levels: its candidates up to its current size; a step down loses the
        σ(S) of the units ranked between two levels."""
        net, out = self.ctx.net, []
        for ch in self.choices:
            for j, path in enumerate(ch.paths):
                size = net.size(path)
                values = sorted({v[j] for v in ch.values if v[j] <= size})
                current = int(value_of(arch, net.groups[path]))
                if len(values) < 2 or current not in values:
                    continue
                scores = torch.sigmoid(self._scores(path).detach().cpu().double())
                out.append(steps_from_scores(net.groups[path], net, scores, values, values.index(current)))
        return out

    def finalize(self) -> Decisions:
        ctx, net = self.ctx, self.ctx.net
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.pending:
            self._fold_pending()
        derived = self.derived()
        result = project(net.geometry, derived, self._steps(derived), ctx.targets, ctx.convention)
        arch = result.arch
        left = self.searching()
        for ch in left:  # fold what the network was trained with (the embedding mask cannot fold: dropped)
            for j, path in enumerate(ch.paths):
                self.fold(path, self.mask_of(ch, j, self.lam))
        kept: dict[str, Tensor] = {}
        for ch in self.choices:
            for path in ch.paths:
                count = int(value_of(arch, net.groups[path]))
                if count < net.size(path):
                    kept[path] = top_of(self._scores(path).detach().cpu(), count)
        net.reset()
        full = net.kept_for(arch, kept)
        info: dict[str, JSON] = {
            "derived_cost": dict(ctx.price(derived)),
            "projected_cost": dict(result.cost),
            "removed": result.removed,
            "added": result.added,
            "raised_msa": result.raised_msa,
            "finished_groups": len(self.choices) - len(left),
            "groups": len(self.choices),
        }
        undecided = [ch.name for ch in left if float(self._probs(ch)[0].max()) < 0.9]
        if undecided:
            names = ", ".join(undecided[:4]) + (
                f" and {len(undecided) - 4} more" if len(undecided) > 4 else ""
            )
            info["notice"] = (
                f"ofb: {len(undecided)} of {len(self.choices)} choices were still undecided at the end ({names}: no "
                "candidate at p ≥ 0.9); the frozen network takes each one's most likely size. Train longer "
                "(--epochs) or raise arch_lr for the search to decide."
            )
        return Decisions(arch, {k: v.cpu() for k, v in full.items()}, info)


def _square(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise UsageError(f"ofb's masked image modelling needs a square token grid, got {n} patch tokens")
    return side, side


def _final_norm(geometry: Geometry) -> str:
    """The module whose output is the backbone's last feature map: ``norm``, or SwinV2-CR's last block's ``norm3``
    (it has no model-level norm)."""
    return f"{geometry.blocks[-1].module}.norm3" if geometry.swin_v2_cr else "norm"
