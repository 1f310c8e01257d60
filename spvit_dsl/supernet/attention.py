"""The unified attention op of the supernet (lowering stage, torch): SPViT's candidates, with masked heads, per-head
channels, residual channels and weights.

Input: a timm ``Attention`` (ViT/DeiT) or ``WindowAttention`` (Swin) module, the block's candidate ops, its geometry
and the paths of its unit groups on the supernet's :class:`~.masks.MaskBoard`. Output: one module computing any
candidate from the *same* parameters (SPViT §1, single-path weight sharing):

* ``msa`` — the backbone's own attention, from ``qkv`` and ``proj`` (adopted under their timm names, so a dense
  state dict loads unchanged); Swin keeps its relative position bias and shifted-window mask. The softmax scale is
  always the *original* ``1/√head_dim`` (UP-ViT and OFB keep it when per-head channels are pruned). SwinV2 (Liu et
  al., CVPR 2022, as timm computes it): scaled cosine attention, ``cos(q, k) · exp(min(logit_scale, ln 100))`` per
  head plus ``16·sigmoid`` of the continuous position bias ``cpb_mlp(relative_coords_table)``; the qkv bias is
  ``q_bias``, zeros, ``v_bias``;
* ``conv{k}x{k}`` — a bottleneck conv built from the value and output projections: ``v`` is the last third of
  ``qkv`` (sliced at run time); a learnable mixing matrix ``mix`` (h × K², K the largest kernel among the
  candidates, initialised to ones) gives ``A = softmax(mix / alpha)`` over heads; kernel position ``p`` (row-major
  in the K × K window) is ``Σ_h A[h,p] · W_v[h]`` with bias ``Σ_h A[h,p] · b_v[h]``; a k × k conv uses the centre
  k × k positions of the same ``mix``, so conv1x1 ⊂ conv3x3 ⊂ conv5x5; the expansion is
  ``Σ_h (Σ_{p in k×k} A[h,p]) · W_o[:,h]`` plus ``proj.bias``; one fresh BatchNorm per conv op, then ReLU;
* ``skip`` — the attention branch contributes zero.

Masks (see :mod:`.masks`): a head's mask scales its output (proj's input columns), a per-head channel's mask scales
its query (the term it adds to every attention logit; for cosine attention its key too, which the key's norm would
otherwise see) and its output column, so a 0 removes the channel from q, k and v at once; the residual-channel mask scales proj's output rows; ``weights`` masks multiply qkv and proj. For a
conv op the head mask scales ``A`` and the channel mask the expansion's columns. With 0/1 masks the module equals
the compact attention with only the kept units.

Convs run on the patch-token map: for ViT the prefix (cls/distillation) tokens pass the branch unchanged (as in the
official code); for Swin they run on the full, unshifted (B, H, W, C) map (see :mod:`spvit_dsl.supernet._timm`).
Only the branch of the selected level is computed. During a SPViT search its output is multiplied by the level's
straight-through weight (forward value 1), folded into the branch's final projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from torch import Tensor, nn

from ..space.geometry import BlockGeom
from ..space.ops import OPS
from ._masked_ops import masked_linear
from .masks import MaskBoard, per_sample, scale_axis

__all__ = ["AttentionGroups", "UnifiedAttention", "window_bias"]


def _kernel(op: str) -> int:
    k = OPS.get(op).kernel
    assert k is not None, op
    return k


def _batch_view(mask: Tensor, rows: int, dims: int, dtype: torch.dtype) -> Tensor:
    """A per-sample mask (B, U) for an activation of ``dims`` dimensions whose batch is ``rows`` (Swin windows:
    B·nW rows, image-major) with units last: (rows, 1, ..., 1, U)."""
    m = mask.to(dtype)
    if m.shape[0] != rows:
        m = m.repeat_interleave(rows // m.shape[0], dim=0)
    return m.view(rows, *([1] * (dims - 2)), m.shape[1])


def window_bias(bias: Tensor, mask: Tensor | None, rows: int) -> Tensor:
    """A Swin window attention's additive bias: the position bias plus, in shifted blocks, the shifted-window mask.

    ``bias``: (heads, N, N) or (1, heads, N, N); ``mask``: (nW, N, N) (0 or -100, timm's) or None; ``rows``: B·nW
    windows, image-major (timm's window partition). Returns (1, heads, N, N) without a mask, else (rows, heads, N, N)."""
    bias = bias.reshape(1, *bias.shape[-3:])
    if mask is None:
        return bias
    nw, h, n = mask.shape[0], bias.shape[1], mask.shape[-1]
    return bias + mask.view(1, nw, 1, n, n).expand(rows // nw, -1, h, -1, -1).reshape(-1, h, n, n)


@dataclass(frozen=True)
class AttentionGroups:
    """Paths of the unit groups one attention layer reads from the mask board (None: not masked)."""

    heads: str | None = None
    head_dim: str | None = None
    embed: str | None = None
    qkv: str | None = None  # weights mask of qkv
    proj: str | None = None  # weights mask of proj


class UnifiedAttention(nn.Module):
    """One block's attention candidates over shared weights; ``candidates`` are sorted along the single path."""

    relative_position_index: Tensor  # Swin: the buffer adopted from WindowAttention
    q_bias: (
        nn.Parameter | None
    )  # SwinV2: adopted from its WindowAttention (None: no qkv bias, or SwinV2-CR's fused one)
    v_bias: nn.Parameter | None

    def __init__(
        self,
        attn: nn.Module,
        geom: BlockGeom,
        candidates: tuple[str, ...],
        decision: str,
        *,
        alpha: float,
        window: bool,
        board: MaskBoard | None = None,
        groups: AttentionGroups = AttentionGroups(),
    ) -> None:
        super().__init__()
        qkv, proj = _check_attn(attn, decision)
        self.decision = decision
        self.candidates = tuple(candidates)
        self.window = window  # Swin WindowAttention layout
        # SwinV2: scaled cosine attention with a continuous position bias, and a post-norm block (the level weight
        # is applied after norm1 by the block: a LayerNorm would cancel it here)
        self.cosine = geom.swin_v2
        self.post_norm = geom.swin_v2
        self.cr = (
            geom.swin_v2_cr
        )  # SwinV2-CR: fused qkv bias, a position-bias MLP over every pair of positions
        self.grid = geom.grid
        self.prefix = geom.prefix_tokens
        self.alpha = float(alpha)
        self.num_heads: int = attn.num_heads  # type: ignore[assignment]  # timm's attention: a plain int
        self.qkv: nn.Linear = qkv
        self.proj: nn.Linear = proj
        self.head_dim = self.qkv.out_features // (3 * self.num_heads)
        self.scale = self.head_dim**-0.5  # the original scale, kept when per-head channels are pruned
        self.fused_attn: bool = bool(getattr(attn, "fused_attn", True))
        self.attn_drop: nn.Module = attn.get_submodule("attn_drop")
        self.proj_drop: nn.Module = attn.get_submodule("proj_drop")
        self.board = board if board is not None else MaskBoard()
        self.groups = groups
        self._adopt_msa_extras(attn)
        self._build_convs()
        self._level = len(self.candidates) - 1
        self._weight: Tensor | None = None
        self.regroup: Tensor | None = (
            None  # (H', d') attention channels per new head (UP-ViT), see set_regroup
        )
        self.probe: Tensor | None = None  # (B, H·d) per-sample attention-channel mask (UP-ViT scoring)

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    # --- construction ----------------------------------------------------------------------------------------

    def _adopt_msa_extras(self, attn: nn.Module) -> None:
        if self.window:
            self.window_size: tuple[int, int] = tuple(attn.window_size)  # type: ignore[arg-type]
            self.window_area = self.window_size[0] * self.window_size[1]
            # SwinV2-CR: per-head logit scale (heads,), the pairwise position-bias MLP and its input
            if self.cr:
                self.q_bias = self.v_bias = None
                self.logit_scale = attn.get_parameter("logit_scale")
                self.meta_mlp: nn.Module = attn.get_submodule("meta_mlp")
                self.register_buffer(
                    "relative_coordinates_log", attn.get_buffer("relative_coordinates_log"), persistent=False
                )
                return
            self.register_buffer(
                "relative_position_index", attn.get_buffer("relative_position_index"), persistent=False
            )
            # SwinV2: q/v biases, per-head logit scale, the position-bias MLP and its input table
            if self.cosine:
                self.q_bias = getattr(attn, "q_bias", None)
                self.v_bias = getattr(attn, "v_bias", None)
                self.logit_scale = attn.get_parameter("logit_scale")
                self.cpb_mlp: nn.Module = attn.get_submodule("cpb_mlp")
                self.register_buffer(
                    "relative_coords_table", attn.get_buffer("relative_coords_table"), persistent=False
                )
            else:
                self.relative_position_bias_table = attn.get_parameter("relative_position_bias_table")
        else:
            self.q_norm: nn.Module = attn.get_submodule("q_norm")
            self.k_norm: nn.Module = attn.get_submodule("k_norm")
            self.norm: nn.Module = attn.get_submodule("norm")

    def _build_convs(self) -> None:
        kernels = [_kernel(op) for op in self.candidates if op not in ("skip", "msa")]
        self.max_kernel = max(kernels, default=0)
        ref = self.qkv.weight
        if kernels:
            self.mix = nn.Parameter(
                torch.ones(self.num_heads, self.max_kernel**2, device=ref.device, dtype=ref.dtype)
            )
        bns = {
            op: nn.BatchNorm2d(self.head_dim, device=ref.device, dtype=ref.dtype)
            for op in self.candidates
            if op not in ("skip", "msa")
        }
        self.bns = nn.ModuleDict(bns)

    # --- the choice of the next forward ----------------------------------------------------------------------

    def choose(self, level: int, weight: Tensor | None = None) -> None:
        """Select the candidate the next forward computes, with its straight-through weight (None: plain)."""
        if not 0 <= level < len(self.candidates):
            raise ValueError(f"{self.decision}: level {level} out of range for {self.candidates}")
        self._level = level
        self._weight = weight

    @property
    def op(self) -> str:
        return self.candidates[self._level]

    # --- UP-ViT: regrouped heads and per-sample channel probes ----------------------------------------------

    def set_regroup(self, index: Tensor | None) -> None:
        """Compute msa with new heads made of any attention channels (UP-ViT's regrouping): ``index`` (H', d')
        holds, for new head ``h``, the flat indices ``head · head_dim + channel`` of its channels in q, k and v (and
        proj's columns), in order. The softmax scale stays the original ``1/√head_dim``. ``None``: the original
        heads. ValueError: a Swin window attention (its relative position bias is per original head), indices out
        of range or repeated, or a per-head mask in use."""
        if index is None:
            self.regroup = None
            return
        if self.window:
            raise ValueError(
                f"{self.decision}: Swin heads cannot be regrouped (their position bias is per head)"
            )
        if not all(isinstance(m, nn.Identity) for m in (self.q_norm, self.k_norm, self.norm)):
            raise ValueError(
                f"{self.decision}: heads with q/k or output norms over head_dim cannot be regrouped"
            )
        index = index.to(torch.long)
        flat = index.flatten()
        if index.dim() != 2 or int(flat.min()) < 0 or int(flat.max()) >= self.attn_dim:
            raise ValueError(
                f"{self.decision}: regrouped channels must be (heads, head_dim) of 0..{self.attn_dim - 1}"
            )
        if torch.unique(flat).numel() != flat.numel():
            raise ValueError(f"{self.decision}: regrouped channels repeat a channel")
        self.regroup = index.to(self.qkv.weight.device)

    def _regrouped(self, x: Tensor) -> Tensor:
        """msa over the regrouped heads (ViT; see :meth:`set_regroup`): only the kept channels are computed."""
        assert self.regroup is not None
        mh, md, _ = self._masks()
        if mh is not None or md is not None:
            raise ValueError(
                f"{self.decision}: head / per-head-channel masks do not apply to regrouped heads"
            )
        rows, N, _ = x.shape
        hn, dn = self.regroup.shape
        flat = self.regroup.flatten()
        weight, bias = self.qkv_params()
        pick = torch.cat([flat + t * self.attn_dim for t in range(3)])
        w = weight.index_select(0, pick)
        b = bias.index_select(0, pick) if bias is not None else None
        q, k, v = F.linear(x, w, b).reshape(rows, N, 3, hn, dn).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        z = (self.attn_drop(attn.softmax(dim=-1)) @ v).transpose(1, 2).flatten(2)
        proj_w = self.proj.weight.index_select(1, flat)
        elem = self.board.get(self.groups.proj)
        if elem is not None:
            proj_w = proj_w * elem.to(proj_w.dtype).index_select(1, flat)
        return self._output(z, proj_w, self.proj.bias, msa=False)

    # --- masks -----------------------------------------------------------------------------------------------

    def _masks(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        g = self.groups
        return self.board.get(g.heads), self.board.get(g.head_dim), self.board.get(g.embed)

    def _q_rows(self) -> Tensor | None:
        """The batch-wide per-head-channel mask on qkv's query rows (ones on the value rows; on the key rows too,
        except for cosine attention, whose key norms must not see a removed channel either), or None."""
        md = self.board.get(self.groups.head_dim)
        if md is None or per_sample(md):
            return None
        ref = self.qkv.weight
        rows = md.to(ref.dtype).repeat(self.num_heads)
        k_rows = rows if self.cosine else ref.new_ones(self.attn_dim)
        return torch.cat([rows, k_rows, ref.new_ones(self.attn_dim)])

    def _qkv_bias(self) -> Tensor | None:
        """qkv's bias: ``qkv.bias``; SwinV2's separate q and v biases with a zero k bias (timm's layout)."""
        if not self.cosine or self.cr:
            return self.qkv.bias
        if self.q_bias is None or self.v_bias is None:
            return None
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def qkv_linear(self, x: Tensor) -> Tensor:
        """qkv with its weights mask and the query-row mask (see :func:`~._masked_ops.masked_linear`)."""
        return masked_linear(
            x, self.qkv.weight, self._qkv_bias(), row=self._q_rows(), elem=self.board.get(self.groups.qkv)
        )

    def qkv_params(self) -> tuple[Tensor, Tensor | None]:
        """qkv's weight and bias with its weights mask and the query-row mask applied (for folding a conv op)."""
        weight: Tensor = self.qkv.weight
        bias: Tensor | None = self._qkv_bias()
        w_mask = self.board.get(self.groups.qkv)
        if w_mask is not None:
            weight = weight * w_mask.to(weight.dtype)
        rows = self._q_rows()
        if rows is not None:
            weight = weight * rows[:, None]
            bias = bias * rows if bias is not None else None
        return weight, bias

    def _inner_mask(self, mh: Tensor | None, md: Tensor | None) -> Tensor | None:
        """The batch-wide mask of the D = heads·head_dim attention channels (head-major), or None."""
        if mh is None and md is None:
            return None
        ref = self.proj.weight
        h = mh.to(ref.dtype) if mh is not None else ref.new_ones(self.num_heads)
        d = md.to(ref.dtype) if md is not None else ref.new_ones(self.head_dim)
        return (h[:, None] * d[None, :]).flatten()

    def _output(self, z: Tensor, weight: Tensor, bias: Tensor | None, *, msa: bool) -> Tensor:
        """The branch's final projection with the residual mask on its rows and the level's straight-through weight:
        ``proj`` for msa (``z``: (rows, N, D); its weights mask and the inner mask on its columns), a conv's
        expansion (``z``: (B, H, W, d); masked by :meth:`expansion` and :meth:`head_mix`)."""
        mh, md, me = self._masks()
        row = None if per_sample(me) else me
        if self._weight is not None and not self.post_norm:  # SPViT's level weight scales the whole branch
            # (forward value 1); a post-norm block applies it after its norm1 (see level_weight)
            w = self._weight.to(weight.dtype)
            row = w.expand(weight.shape[0]) if row is None else row.to(weight.dtype) * w
        col = elem = None
        if msa:
            col = self._inner_mask(None if per_sample(mh) else mh, None if per_sample(md) else md)
            elem = self.board.get(self.groups.proj)
        out = masked_linear(z, weight, bias, row=row, col=col, elem=elem)
        if per_sample(me):
            out = out * _batch_view(me, out.shape[0], out.dim(), out.dtype)  # type: ignore[arg-type]
        return self.proj_drop(out)

    def _per_sample_inner(self, z: Tensor) -> Tensor:
        """Per-sample head / per-head-channel masks (and the channel probe) on attention outputs (rows, N, H, d) →
        (rows, N, D)."""
        mh, md, _ = self._masks()
        if per_sample(mh):
            z = z * _batch_view(mh, z.shape[0], 3, z.dtype).unsqueeze(-1)  # type: ignore[arg-type]
        if per_sample(md):
            z = z * _batch_view(md, z.shape[0], 4, z.dtype)  # type: ignore[arg-type]
        z = z.flatten(2)
        if self.probe is not None:
            z = z * _batch_view(self.probe, z.shape[0], 3, z.dtype)
        return z

    # --- forward ---------------------------------------------------------------------------------------------

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, mask: Tensor | None = None
    ) -> Tensor:
        """ViT: ``x`` is (B, N, C) tokens. Swin: ``x`` is (B·nW, window area, C) windows (msa only; convs and skip
        of a Swin block go through :meth:`forward_map`)."""
        op = self.op
        if op == "msa":
            if self.regroup is not None:
                return self._regrouped(x)
            return self._attention(x, attn_mask, is_causal, mask)
        if self.window:
            raise RuntimeError(f"{self.decision}: Swin conv/skip levels run on the full map (forward_map)")
        if op == "skip":
            return torch.zeros_like(x)
        B, N, C = x.shape
        H, W = self.grid
        patches = x[:, self.prefix :].reshape(B, H, W, C)
        out = self._conv(patches, op).reshape(B, H * W, C)
        if self.prefix == 0:
            return out
        head = x[:, : self.prefix]
        if self._weight is not None:
            head = head * self._weight.to(head.dtype)
        return torch.cat([head, out], dim=1)

    def forward_map(self, x: Tensor) -> Tensor:
        """A conv or skip level on a full (B, H, W, C) map (Swin)."""
        if self.op == "skip":
            return torch.zeros_like(x)
        return self._conv(x, self.op)

    # --- the candidates --------------------------------------------------------------------------------------

    def _attention(
        self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, window_mask: Tensor | None
    ) -> Tensor:
        """Multi-head self-attention over (rows, N, C): all tokens (ViT) or one window (Swin, with its bias)."""
        rows, N, _ = x.shape
        h = self.num_heads
        weight, bias = self.qkv_params()
        q, k, v = (
            F.linear(x, weight, bias).reshape(rows, N, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        md = self.board.get(self.groups.head_dim)
        if per_sample(md):
            q = q * _batch_view(md, rows, 4, q.dtype)  # type: ignore[arg-type]
            if self.cosine:
                k = k * _batch_view(md, rows, 4, k.dtype)  # type: ignore[arg-type]
        if self.probe is not None:  # (B, H·d): removing channel j from q (its logit term) and from the output
            probe = _batch_view(self.probe, rows, 3, q.dtype).view(rows, h, 1, self.head_dim)
            q = q * probe
            if self.cosine:
                k = k * probe
        scale = self.scale
        if self.cosine:  # SwinV2: cos(q, k) · exp(min(logit_scale, ln 100)) per head (timm's clamp)
            logit_scale = self.logit_scale.view(-1, 1, 1)  # (heads, 1, 1); SwinV2-CR keeps it as (heads,)
            q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=math.log(100.0)).exp()
            k, scale = F.normalize(k, dim=-1), 1.0
        if self.window:
            attn_mask = window_bias(self._rel_pos_bias(), window_mask, rows)
            is_causal = False
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            dropout: float = self.attn_drop.p if self.training else 0.0  # type: ignore[assignment]  # nn.Dropout.p
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scale
            )
        else:
            attn = (q * scale) @ k.transpose(-2, -1)
            bias = attn_mask if self.window else resolve_self_attn_mask(N, attn, attn_mask, is_causal)
            z = self.attn_drop(maybe_add_mask(attn, bias).softmax(dim=-1)) @ v
        z = self._per_sample_inner(z.transpose(1, 2))
        if not self.window:
            z = self.norm(z)
        return self._output(z, self.proj.weight, self.proj.bias, msa=True)

    def _rel_pos_bias(self) -> Tensor:
        """(1, heads, area, area): Swin's learned table, SwinV2's ``16·sigmoid(cpb_mlp(coords))``, or SwinV2-CR's
        ``meta_mlp`` over every pair of window positions."""
        if self.cr:
            pairs = self.meta_mlp(self.relative_coordinates_log)  # (area², heads)
            return (
                pairs.transpose(1, 0).reshape(self.num_heads, self.window_area, self.window_area).unsqueeze(0)
            )
        table = (
            self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            if self.cosine
            else self.relative_position_bias_table
        )
        bias = table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    @property
    def level_weight(self) -> Tensor | None:
        """The selected level's straight-through weight when the block must apply it (post-norm: after its norm1,
        which would cancel it inside the branch); None otherwise."""
        return self._weight if self.post_norm else None

    def head_mix(self, k: int) -> Tensor:
        """``A`` restricted to the centre k × k positions: (heads, k²), a softmax over the heads the heads mask keeps
        (a mask weights each head's share: ``A[h] ∝ m_h · exp(mix[h] / alpha)``), so masking heads out is removing
        them — the compact conv and a shrunk supernet compute the same ``A``."""
        K = self.max_kernel
        logits = (self.mix / self.alpha).view(self.num_heads, K, K)
        o = (K - k) // 2
        logits = logits[:, o : o + k, o : o + k].reshape(self.num_heads, k * k)
        mh = self.board.get(self.groups.heads)
        if mh is None:
            return torch.softmax(logits, dim=0)
        if per_sample(mh):
            raise NotImplementedError(f"{self.decision}: per-sample head masks do not apply to conv ops")
        m = mh.to(logits.dtype)[:, None]
        ref = torch.where(m > 0, logits, torch.full_like(logits, -torch.inf)).amax(dim=0, keepdim=True)
        e = (
            torch.exp((logits - ref).clamp(max=0)) * m
        )  # the largest kept head's logit as reference: no overflow
        return e / e.sum(dim=0, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)

    def conv_weights(self, k: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """(kernel (d, C, k, k), kernel bias (d,) or None, expansion (C, d)) of the k × k bottleneck conv, before the
        per-head-channel and residual masks (applied to the expansion by the forward and by folding alike).

        Mixed by broadcasting, not by a matmul: this is once-per-forward weight preparation whose cost does not
        grow with the batch, and it stays out of FLOP counts of the per-image network (docs/supernet.md).
        """
        h, d = self.num_heads, self.head_dim
        A = self.head_mix(k)  # (h, k²)
        weight, qkv_bias = self.qkv_params()
        w_v = weight[2 * self.attn_dim :].view(h, d, -1)  # (h, d, C)
        kernel = (A.t()[:, :, None, None] * w_v[None]).sum(1)  # (k², d, C)
        kernel = kernel.permute(1, 2, 0).reshape(d, -1, k, k)
        a = A.sum(1)  # (h,): Σ over the kernel positions
        bias = None
        if qkv_bias is not None:
            bias = (a[:, None] * qkv_bias[2 * self.attn_dim :].view(h, d)).sum(0)
        w_o = self.proj.weight.view(-1, h, d)  # (C, h, d)
        expand = (w_o * a[None, :, None]).sum(1)  # (C, d)
        return kernel, bias, expand

    def expansion(self, expand: Tensor) -> Tensor:
        """The expansion (C, d) with the batch-wide per-head-channel mask on its columns (what folding keeps)."""
        md = self.board.get(self.groups.head_dim)
        return expand if per_sample(md) else scale_axis(expand, md, 1)

    def _conv(self, x: Tensor, op: str) -> Tensor:
        """Bottleneck conv on a (B, H, W, C) map → (B, H, W, C)."""
        k = _kernel(op)
        kernel, bias, expand = self.conv_weights(k)
        if k == 1:
            # (B, d, H, W) with channels-last strides, as BatchNorm2d wants
            y = F.linear(x, kernel.flatten(1), bias).permute(0, 3, 1, 2)
        else:
            y = F.conv2d(x.permute(0, 3, 1, 2), kernel, bias, padding=k // 2)
        y = F.relu(self.bns[op](y)).permute(0, 2, 3, 1)
        md = self.board.get(self.groups.head_dim)
        if per_sample(md):
            y = y * _batch_view(md, y.shape[0], 4, y.dtype)  # type: ignore[arg-type]
        return self._output(y, self.expansion(expand), self.proj.bias, msa=False)

    def extra_repr(self) -> str:
        s = f"{self.decision}: {' | '.join(self.candidates)}, heads={self.num_heads}, head_dim={self.head_dim}"
        if self.max_kernel:
            s += f", mix={self.num_heads}x{self.max_kernel**2}, alpha={self.alpha:g}"
        masked = [f"{k}={v}" for k, v in vars(self.groups).items() if v is not None]
        return s + (", window" if self.window else "") + (f", groups: {', '.join(masked)}" if masked else "")


def _check_attn(attn: nn.Module, decision: str) -> tuple[nn.Linear, nn.Linear]:
    """``attn``'s ``qkv`` and ``proj`` layers; NotImplementedError for an attention the unified op cannot adopt."""
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        raise NotImplementedError(
            f"{decision}: unsupported attention {type(attn).__name__} (needs a fused qkv Linear)"
        )
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError(f"{decision}: gated attention (timm 'gated=True') cannot be lowered")
    return qkv, proj
