"""The analytic cost model against the paper's figures, timm's parameter counts and torch's FlopCounterMode."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as CosineWindowAttention
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention as PairwiseWindowAttention
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from spvit_dsl.space.backbones import resolve, supported_names
from spvit_dsl.space.cost import (
    BlockCounts,
    Counts,
    arch_cost,
    block_cost,
    breakdown,
    counts_of,
    dense_arch,
    dense_cost,
    stem_head_cost,
    tally,
)
from spvit_dsl.space.plan import BlockArch, Cost, Density, FrozenArch, Geometry

DEIT = {"Ti": "deit_tiny_patch16_224", "S": "deit_small_patch16_224", "B": "deit_base_patch16_224"}
SWIN = {
    "T": "swin_tiny_patch4_window7_224",
    "S": "swin_small_patch4_window7_224",
    "B": "swin_base_patch4_window7_224",
}
TINY_VIT = dict(image=32, patch=4, embed_dim=64, depth=6, heads=2, channels=1, classes=10)
SWINV2 = {
    "T": "swinv2_tiny_window8_256",
    "B": "swinv2_base_window12to16_192to256",
}
TINY_SWIN = dict(image=32, patch=2, embed_dim=16, depth=(2, 2, 2), heads=(1, 2, 4), window=4, classes=10)
# timm's padding in SwinV2: an 18x18 grid under windows of 8 (padded to 24x24), merged into 9x9 (padded to 16x16),
# then an odd 9x9 merged as 10x10 into 5x5 (one window of 5, unshifted)
PADDED_SWINV2 = dict(image=36, patch=2, embed_dim=8, depth=(2, 2, 1), heads=(1, 2, 2), window=8, classes=10)
# timm's SwinV2-CR: plain (norm3 ends the last stage only), with norm3 at every stage end, norm3 every sixth block
SWINV2_CR = {"T": "swinv2_cr_tiny_224", "T-ns": "swinv2_cr_tiny_ns_224", "H": "swinv2_cr_huge_224"}
# timm's packed SwiGLU FFN (GluMlp, SiLU on fc1's first half): DINOv2-g, with 4 registers, TIPSv2-g (1 register)
SWIGLU = {
    "g": "vit_giant_patch14_dinov2",
    "g-reg4": "vit_giant_patch14_reg4_dinov2",
    "tips": "vit_giant_patch14_reg1_tipsv2",
}


# --- the published figures (shared/reference/spvit.md §3) ----------------------------------------------------

PAPER_TOTALS = [
    (DEIT["Ti"], 1.251),
    (DEIT["S"], 4.587),
    (DEIT["B"], 17.511),
    (SWIN["T"], 4.494),
    (SWIN["S"], 8.747),
    (SWIN["B"], 15.438),
]
FVCORE_TOTALS = [
    (DEIT["Ti"], 1.258),
    (DEIT["S"], 4.608),
    (DEIT["B"], 17.583),
    (SWIN["T"], 4.509),
    (SWIN["S"], 8.768),
    (SWIN["B"], 15.468),
]


@pytest.mark.parametrize("name, giga", PAPER_TOTALS)
def test_dense_paper_totals(name: str, giga: float):
    assert dense_cost(resolve(name, {}), "paper").macs / 1e9 == pytest.approx(giga, rel=2e-3)


@pytest.mark.parametrize("name, giga", FVCORE_TOTALS)
def test_dense_exact_totals(name: str, giga: float):
    assert dense_cost(resolve(name, {}), "exact").macs / 1e9 == pytest.approx(giga, rel=5e-3)


# SwinV2: the official repository's table (its flops(), which leaves the position-bias MLP out), G and M to its
# precision
SWINV2_TOTALS = [
    ("swinv2_tiny_window8_256", 5.9, 28),
    ("swinv2_small_window8_256", 11.5, 50),
    ("swinv2_base_window8_256", 20.3, 88),
    ("swinv2_tiny_window16_256", 6.6, 28),
    ("swinv2_small_window16_256", 12.6, 50),
    ("swinv2_base_window16_256", 21.8, 88),
    ("swinv2_base_window12to16_192to256", 21.8, 88),
    ("swinv2_base_window12to24_192to384", 54.7, 88),
    ("swinv2_large_window12to16_192to256", 47.5, 197),
    ("swinv2_large_window12to24_192to384", 115.4, 197),
]


@pytest.mark.parametrize("name, giga, mega", SWINV2_TOTALS)
def test_dense_swinv2_paper_totals(name: str, giga: float, mega: int):
    cost = dense_cost(resolve(name, {}), "paper")
    assert (round(cost.macs / 1e9, 1), round(cost.params / 1e6)) == (giga, mega)


def test_swinv2_position_bias_mlp_runs_once_per_forward_and_only_exact_counts_it():
    """Its multiply-adds: (2W−1)² relative offsets × (2·512 + 512·heads), per block, whatever the batch."""
    g = resolve(SWINV2["T"], {})
    b = g.blocks[0]  # window 8, 3 heads
    mlp = 15**2 * (2 * 512 + 512 * 3)
    exact, paper = branch_cost(b, "msa", "exact"), branch_cost(b, "msa", "paper")
    assert exact.macs - paper.macs == mlp and exact.params == paper.params
    assert branch_cost(b, "msa", "exact", heads=1).macs - branch_cost(
        b, "msa", "paper", heads=1
    ).macs == 15**2 * (2 * 512 + 512)


def test_swinv2_cr_position_bias_mlp_runs_on_every_pair_once_per_forward_and_only_exact_counts_it():
    """Its multiply-adds: area² pairs of window positions × (2·384 + 384·heads), per block, whatever the batch."""
    g = resolve(SWINV2_CR["T"], {})
    b = g.blocks[0]  # window 7, 3 heads
    mlp = 49**2 * (2 * 384 + 384 * 3)
    exact, paper = branch_cost(b, "msa", "exact"), branch_cost(b, "msa", "paper")
    assert exact.macs - paper.macs == mlp and exact.params == paper.params
    inner = b.heads * b.head_dim
    assert paper.params == 4 * b.dim * inner + 3 * inner + b.dim + 3 + (2 * 384 + 384 + 384 * 3 + 3)


def test_swinv2_cr_norm3_belongs_to_its_block_whatever_runs_there():
    """A skip block at FFN width 0 pays norm2, fc2.bias and its norm3: the main branch is normalised anyway."""
    g = resolve(SWINV2_CR["T-ns"], {})
    b = g.blocks[1]  # stage 0's last block: norm3
    assert b.extra_norm and not g.blocks[0].extra_norm
    for convention, ln in (("paper", 1), ("exact", 5)):
        skip = block_cost(b, BlockArch("skip", 0, b.heads, b.head_dim), convention)
        assert skip == Cost(2 * ln * b.tokens * b.dim, 2 * b.dim + b.dim + 2 * b.dim)
        plain = block_cost(g.blocks[0], BlockArch("skip", 0, b.heads, b.head_dim), convention)
        assert skip - plain == Cost(ln * b.tokens * b.dim, 2 * b.dim)


# (model, block index, [1x1, 3x3, msa, full FFN] in M, paper convention)
PER_OP = [
    (DEIT["S"], 0, [9.63, 48.17, 146.00, 231.21]),
    (DEIT["Ti"], 5, [4.82, 24.08, 43.95, 57.80]),
    (DEIT["B"], 11, [19.27, 96.34, 524.39, 924.84]),
    (SWIN["T"], 0, [19.27, 96.34, 145.11, 231.21]),
    (SWIN["S"], 1, [19.27, 96.34, 145.11, 231.21]),
    (SWIN["T"], 11, [2.41, 12.04, 119.29, 231.21]),
    (SWIN["S"], 23, [2.41, 12.04, 119.29, 231.21]),
]


def branch_cost(b, op: str, convention: str, **dims: object) -> Cost:
    """One attention branch without its LayerNorm: the block with ``op`` minus the block with a skip branch, minus
    norm1 (which a skip block does not run)."""
    arch = BlockArch(op, b.hidden, int(dims.get("heads", b.heads)), int(dims.get("head_dim", b.head_dim)))
    skip = BlockArch("skip", b.hidden, arch.heads, arch.head_dim)
    norm = (
        Cost({"paper": 1, "exact": 5}[convention] * b.tokens * b.dim, 2 * b.dim) if op != "skip" else Cost()
    )
    return block_cost(b, arch, convention) - block_cost(b, skip, convention) - norm


def ffn_cost(b, width: int, convention: str, **density: float) -> Cost:
    """The FFN alone (without norm2): a skip block at ``width`` minus the same block at width 0, plus fc2's bias."""
    one = BlockArch("skip", width, b.heads, b.head_dim, Density(**density))
    zero = BlockArch("skip", 0, b.heads, b.head_dim)
    return block_cost(b, one, convention) - block_cost(b, zero, convention) + Cost(0, b.dim)


@pytest.mark.parametrize("name, index, mega", PER_OP)
def test_per_op_paper_macs(name: str, index: int, mega: list[float]):
    b = resolve(name, {}).blocks[index]
    got = [branch_cost(b, op, "paper").macs / 1e6 for op in ("conv1x1", "conv3x3", "msa")]
    got.append(ffn_cost(b, b.hidden, "paper").macs / 1e6)
    assert [round(x, 2) for x in got] == mega


# --- parameters: exactly timm's count ------------------------------------------------------------------------


def timm_params(g: Geometry) -> int:
    with torch.device("meta"):
        m = timm.create_model(g.model, pretrained=False, **g.kwargs())
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", supported_names())
def test_dense_params_equal_timm(name: str):
    g = resolve(name, {})
    assert dense_cost(g, "exact").params == dense_cost(g, "paper").params == timm_params(g)


@pytest.mark.parametrize(
    "name, overrides",
    [
        (DEIT["Ti"], TINY_VIT),
        ("deit_base_distilled_patch16_224", dict(image=32, embed_dim=48, heads=3, depth=2)),
        (SWIN["T"], TINY_SWIN),
        (SWIN["B"], dict(image=64, embed_dim=8, heads=(1, 1, 2, 2), mlp_ratio=3, window=4)),
        (SWINV2["T"], TINY_SWIN),
        (SWINV2["B"], dict(image=64, embed_dim=8, heads=(1, 1, 2, 2), mlp_ratio=3, window=4)),
        (SWINV2_CR["T-ns"], TINY_SWIN),
        (SWINV2_CR["H"], dict(image=64, embed_dim=8, depth=(1, 7, 2), heads=(1, 1, 2), mlp_ratio=3)),
        (SWIGLU["g"], dict(image=28, embed_dim=48, heads=2, depth=2)),  # fc1 256 rows: 128 neurons
        (SWIGLU["g-reg4"], dict(image=28, depth=1, mlp_ratio=4)),  # fc1 6144 rows: 3072 neurons
    ],
)
def test_custom_params_equal_timm(name: str, overrides: dict[str, object]):
    g = resolve(name, overrides)
    assert dense_cost(g, "exact").params == timm_params(g)


# --- a literal torch evaluation of any point (test-local, independent of the cost model) -----------------------


class Zero(nn.Module):
    """skip: the attention branch adds nothing."""

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.zeros_like(x)


class ConvBranch(nn.Module):
    """Conv2d(C,d,k) → BN → ReLU → Conv2d(d,C,1) on the patch-token map (d: the kept per-head width); prefix
    tokens pass through as zeros."""

    def __init__(self, dim: int, d: int, k: int, prefix: int, grid: tuple[int, int], channels_last: bool):
        super().__init__()
        self.conv1, self.bn, self.conv2 = (
            nn.Conv2d(dim, d, k, padding=k // 2),
            nn.BatchNorm2d(d),
            nn.Conv2d(d, dim, 1),
        )
        self.prefix, self.grid, self.channels_last = prefix, grid, channels_last

    def _map(self, t: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(t))))

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        if self.channels_last:  # Swin: (B, H, W, C)
            return self._map(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        B, _, C = x.shape
        patches = x[:, self.prefix :].transpose(1, 2).reshape(B, C, *self.grid)
        y = self._map(patches).flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(x[:, : self.prefix]), y], dim=1)


class AnyWidthCosineAttention(CosineWindowAttention):
    """timm's SwinV2 window attention (scaled cosine attention, q/v biases, the position-bias MLP) at any
    heads × head_dim (timm ties the attention width to C): the same operations, written out."""

    def __init__(self, dim: int, heads: int, head_dim: int, window: tuple[int, int]):
        inner = heads * head_dim
        super().__init__(inner, window_size=window, num_heads=heads)  # q/k/v biases, logit scale, cpb_mlp
        self.qkv, self.proj = nn.Linear(dim, 3 * inner, bias=False), nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, -1))


class AnyWidthPairwiseAttention(PairwiseWindowAttention):
    """timm's SwinV2-CR window attention (scaled cosine attention, a fused qkv bias, the position-bias MLP over every
    pair of window positions) at any heads × head_dim (timm ties the attention width to C): the same operations,
    written out."""

    def __init__(self, dim: int, heads: int, head_dim: int, window: tuple[int, int]):
        inner = heads * head_dim
        super().__init__(inner, num_heads=heads, window_size=window)  # logit scale, meta_mlp, coordinates
        self.qkv, self.proj = nn.Linear(dim, 3 * inner), nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        Bw, L, _ = x.shape
        q, k, v = self.qkv(x).view(Bw, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale.view(1, -1, 1, 1), max=math.log(100.0)).exp()
        attn = attn + self._relative_positional_encodings()
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, L, L) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, L, L)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, L, -1))


def branch(b, a: BlockArch, dim: int, swin_block=None) -> nn.Module:
    if a.op == "skip":
        return Zero()
    if a.op == "msa":
        if swin_block is None:
            attn = Attention(dim, num_heads=a.heads, attn_head_dim=a.head_dim, qkv_bias=True)
        elif b.swin_v2_cr:
            return AnyWidthPairwiseAttention(dim, a.heads, a.head_dim, swin_block.window_size)
        elif b.swin_v2:
            return AnyWidthCosineAttention(dim, a.heads, a.head_dim, swin_block.window_size)
        else:
            attn = WindowAttention(
                dim, num_heads=a.heads, head_dim=a.head_dim, window_size=swin_block.window_size
            )
        attn.fused_attn = False  # FlopCounterMode does not count SDPA's CPU kernel
        return attn
    k = int(a.op[-1])
    return ConvBranch(dim, a.head_dim, k, b.prefix_tokens, b.grid, channels_last=swin_block is not None)


def build(g: Geometry, arch: FrozenArch) -> nn.Module:
    """timm's model at the residual widths of ``arch`` (stage 0's; the later Swin stages double it), every attention
    branch and FFN replaced per ``arch``; a skip block's norm1 (and layer scale ls1) is never run, so it is removed."""
    kwargs = g.kwargs() | {"embed_dim": arch.embed[0]}
    kwargs |= {"num_heads": (1,) * len(g.depths)} if g.family == "swin" else {"num_heads": 1}
    if g.blocks[0].ffn_glu:  # timm's GluMlp needs an even fc1 at this width; every FFN is replaced below
        kwargs["mlp_ratio"] = 2.0
    m = timm.create_model(g.model, pretrained=False, **kwargs)
    stages = m.stages if g.swin_v2_cr else getattr(m, "layers", ())
    blocks = [blk for layer in stages for blk in layer.blocks] if g.family == "swin" else list(m.blocks)
    for b, a, blk in zip(g.blocks, arch.blocks, blocks, strict=True):
        dim = blk.norm1.normalized_shape[0]
        blk.attn = branch(b, a, dim, blk if g.family == "swin" else None)
        if a.op == "skip":  # nor its layer scale (DINOv2): both belong to the branch
            blk.norm1 = nn.Identity()
            if hasattr(blk, "ls1"):
                blk.ls1 = nn.Identity()
        if (
            g.family == "swin" and a.op != "msa"
        ):  # timm's _attn would window-partition; convs see the full map
            object.__setattr__(blk, "_shifted_window_attn" if g.swin_v2_cr else "_attn", blk.attn)
        # a packed SwiGLU's fc1 holds every neuron's value and gate rows (timm's GluMlp splits it in halves)
        blk.mlp.fc1, blk.mlp.fc2 = nn.Linear(dim, b.fc1_per_neuron * a.ffn), nn.Linear(a.ffn, dim)
    return m.eval()


def measure(g: Geometry, arch: FrozenArch, model: nn.Module | None = None) -> dict[str, int]:
    """FlopCounterMode's total ÷ 2, the parameter count and the elements each norm/pool layer reads (of ``model``,
    default: :func:`build`'s)."""
    m = build(g, arch) if model is None else model.eval()
    seen = {"ln": 0, "bn": 0, "pool": 0}

    def hook(kind):
        return lambda mod, inp, out: seen.__setitem__(kind, seen[kind] + inp[0].numel())

    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.register_forward_hook(hook("ln"))
        elif isinstance(mod, nn.BatchNorm2d):
            mod.register_forward_hook(hook("bn"))
    if g.family == "swin":
        m.head.global_pool.register_forward_hook(hook("pool"))
    x = torch.randn(1, g.in_chans, g.img_size, g.img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return {"matmul": flops // 2, "params": sum(p.numel() for p in m.parameters()), **seen}


def check_point(g: Geometry, arch: FrozenArch, model: nn.Module | None = None) -> None:
    got = measure(g, arch, model)
    parts = breakdown(g, arch, "exact")
    assert parts["matmul"] == got["matmul"]
    assert parts["norm"] == 5 * got["ln"] + 2 * got["bn"]
    assert parts["pool"] == got["pool"]
    assert parts["total"] == arch_cost(g, arch, "exact").macs
    assert arch_cost(g, arch, "exact").params == arch_cost(g, arch, "paper").params == got["params"]


@pytest.mark.parametrize(
    "name, overrides",
    [
        (DEIT["Ti"], TINY_VIT),
        (SWIN["T"], TINY_SWIN),
        # timm's padding: a 17x17 grid under windows of 4 (padded to 20x20), merged as 18x18 into 9x9 (padded to 12x12)
        (
            SWIN["T"],
            dict(image=34, patch=2, embed_dim=8, depth=(2, 2, 1), heads=(1, 2, 2), window=4, classes=10),
        ),
        ("deit_tiny_distilled_patch16_224", dict(image=32, patch=8, depth=2)),
        (SWINV2["T"], TINY_SWIN),
        (SWINV2["T"], PADDED_SWINV2),
        (
            SWINV2["B"],
            PADDED_SWINV2 | dict(image=28, window=3),
        ),  # 14x14 under windows of 3 (15x15), 7x7 → 4x4
        (SWIGLU["tips"], dict(image=28, embed_dim=48, heads=2, depth=2, classes=10)),  # class + register
    ],
)
def test_dense_matches_flop_counter(name: str, overrides: dict[str, object]):
    g = resolve(name, overrides)
    check_point(g, dense_arch(g))
    assert breakdown(g, dense_arch(g))["matmul"] == breakdown(g, dense_arch(g), "exact")["matmul"]


@pytest.mark.parametrize(
    "overrides", [PADDED_SWINV2, TINY_SWIN, PADDED_SWINV2 | dict(image=28, window=3, mlp_ratio=2)]
)
def test_swinv2_dense_matches_timms_own_model(overrides: dict[str, object]):
    """timm's SwinV2 itself (no branch replaced): padded windows, odd merges, the position-bias MLP per block."""
    g = resolve(SWINV2["T"], overrides)
    m = timm.create_model(g.model, pretrained=False, **g.kwargs())
    check_point(g, dense_arch(g), m)
    merging = sum(b.grid[0] * b.grid[1] * b.dim for b in g.blocks if b.stage and not b.index_in_stage)
    assert measure(g, dense_arch(g), m)["ln"] == sum(2 * b.tokens * b.dim for b in g.blocks) + merging + (
        g.blocks[0].patches * g.embed_dim + g.blocks[-1].patches * g.num_features
    )  # norm1, norm2; merging over C' (v1: 4C); patch embed's and the final norm


@pytest.mark.parametrize(
    "name, overrides",
    [
        (SWINV2_CR["T"], PADDED_SWINV2),  # padded windows and odd merges, norm3 on the last block only
        (SWINV2_CR["T-ns"], PADDED_SWINV2),  # norm3 at every stage end
        (SWINV2_CR["T-ns"], TINY_SWIN),
        (SWINV2_CR["T-ns"], PADDED_SWINV2 | dict(image=28, window=3, mlp_ratio=2)),  # 14x14 under 3 (15x15)
        # norm3 every sixth block follows the overridden depth: stage 1's sixth block
        (SWINV2_CR["H"], dict(image=28, patch=2, embed_dim=8, depth=(1, 7, 2), heads=(1, 2, 2), classes=10)),
    ],
)
def test_swinv2_cr_dense_matches_timms_own_model(name: str, overrides: dict[str, object]):
    """timm's SwinV2-CR itself: the pairwise position-bias MLP per block, norm3 where timm puts it, v1's merging."""
    g = resolve(name, overrides)
    m = timm.create_model(g.model, pretrained=False, **g.kwargs())
    check_point(g, dense_arch(g), m)
    merging = sum(
        b.grid[0] * b.grid[1] * 4 * b.dim // 2 for b in g.blocks if b.stage and not b.index_in_stage
    )
    norm3 = sum(b.tokens * b.dim for b in g.blocks if b.extra_norm)
    assert measure(g, dense_arch(g), m)["ln"] == sum(
        2 * b.tokens * b.dim for b in g.blocks
    ) + norm3 + merging + (
        g.blocks[0].patches * g.embed_dim
    )  # norm1, norm2, norm3; merging over 4C (v1's order); the patch embed's norm; no final norm


def test_the_any_width_pairwise_attention_is_timms_at_its_width():
    torch.manual_seed(0)
    ours, theirs = AnyWidthPairwiseAttention(16, 2, 8, (4, 4)), PairwiseWindowAttention(16, 2, (4, 4))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    x, mask = torch.randn(6, 16, 16), (torch.rand(3, 16, 16) < 0.3) * -100.0
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x, mask), theirs.eval()(x, mask))


def test_the_any_width_cosine_attention_is_timms_at_its_width():
    torch.manual_seed(0)
    ours, theirs = AnyWidthCosineAttention(16, 2, 8, (4, 4)), CosineWindowAttention(16, (4, 4), num_heads=2)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    x, mask = torch.randn(6, 16, 16), (torch.rand(3, 16, 16) < 0.3) * -100.0
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask), theirs(x, mask))


VIT_SPACE = st.fixed_dictionaries(
    {
        "name": st.sampled_from([DEIT["Ti"], "deit_tiny_distilled_patch16_224"]),
        "image": st.sampled_from([16, 32]),
        "patch": st.sampled_from([4, 8]),
        "embed_dim": st.sampled_from([16, 32]),
        "depth": st.integers(1, 3),
        "heads": st.sampled_from([1, 2, 4]),
    }
)
SWIN_SPACE = st.fixed_dictionaries(
    {
        "name": st.just(SWIN["T"]),
        "image": st.sampled_from([16, 30, 32, 34]),  # 15x15 and 17x17 grids: padded windows, odd merges
        "patch": st.just(2),
        "embed_dim": st.sampled_from([8, 16]),
        "depth": st.sampled_from([(1, 1), (2, 1, 2), (1, 2, 1, 1)]),
        "window": st.sampled_from([2, 3, 4]),
    }
)
# timm's packed SwiGLU at widths whose fc1, int(C · 16/3), is even (as timm's GluMlp requires)
SWIGLU_SPACE = VIT_SPACE.map(
    lambda spec: spec | {"name": SWIGLU["g-reg4"], "embed_dim": 3 * spec["embed_dim"] // 2}
)
SWINV2_SPACE = SWIN_SPACE.map(lambda spec: spec | {"name": SWINV2["T"]})
SWINV2_CR_SPACE = SWIN_SPACE.map(lambda spec: spec | {"name": SWINV2_CR["T-ns"]})
OPS = ["skip", "conv1x1", "conv3x3", "conv5x5", "msa"]


@st.composite
def points(draw, space):
    spec = dict(draw(space))
    name = spec.pop("name")
    if name.startswith("swin"):
        spec["heads"] = tuple(2 ** min(s, 2) for s in range(len(spec["depth"])))
    g = resolve(name, spec)
    embed = draw(st.sampled_from([g.embed_dim, g.embed_dim // 2, g.embed_dim + 8]))
    blocks = tuple(
        BlockArch(
            draw(st.sampled_from(OPS)),
            draw(st.integers(0, b.hidden)),
            draw(st.integers(1, 3)),
            draw(st.sampled_from([4, 8])),
        )
        for b in g.blocks
    )
    return g, FrozenArch(blocks, tuple(embed * 2**s for s in range(g.stages)))


RANDOM_SPACES = {
    "vit": VIT_SPACE,
    "swiglu": SWIGLU_SPACE,
    "swin": SWIN_SPACE,
    "swinv2": SWINV2_SPACE,
    "swinv2_cr": SWINV2_CR_SPACE,
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("family", sorted(RANDOM_SPACES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_point_matches_flop_counter(family, data):
    check_point(*data.draw(points(RANDOM_SPACES[family])))


def test_conv_module_by_hand():
    """A stand-alone Conv2d(C,d,3) → BN → ReLU → Conv2d(d,C,1): params and MACs of the formula."""
    b = resolve(DEIT["S"], dict(image=64)).blocks[0]  # C 384, d 64, 4x4 patch map
    mod = nn.Sequential(
        nn.Conv2d(384, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 384, 1)
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mod.eval()(torch.randn(1, 384, 4, 4))
    cost = branch_cost(b, "conv3x3", "exact")
    assert cost.params == sum(p.numel() for p in mod.parameters())
    assert cost.macs == counter.get_total_flops() // 2 + 2 * 64 * 16  # + eval BatchNorm, 2 per element
    assert branch_cost(b, "conv3x3", "paper").macs == counter.get_total_flops() // 2


# --- laws of the model ---------------------------------------------------------------------------------------


def test_embed_width_scales_like_a_narrower_backbone():
    """A point at residual widths C'·2^s with dense-shaped blocks costs what timm's backbone of width C' costs."""
    g = resolve(SWIN["T"], TINY_SWIN)
    narrow = resolve(SWIN["T"], TINY_SWIN | dict(embed_dim=8, heads=(1, 1, 2)))
    arch = FrozenArch(
        tuple(BlockArch("msa", b.hidden, b.heads, b.head_dim) for b in narrow.blocks), narrow.dims
    )
    for convention in ("paper", "exact"):
        assert arch_cost(g, arch, convention) == dense_cost(narrow, convention)


def test_ffn_is_linear_in_width_and_keeps_fc2_bias():
    b = resolve(DEIT["S"], {}).blocks[3]
    for convention in ("paper", "exact"):
        c0, c1, c7 = (ffn_cost(b, w, convention) for w in (0, 1, 7))
        assert c0.macs == 0 and c0.params == b.dim
        assert c7 - c0 == Cost(7 * c1.macs, 7 * (c1.params - c0.params))
    assert ffn_cost(b, 10, "exact").macs - ffn_cost(b, 10, "paper").macs == 2 * b.dim * 10  # the cls token


def test_a_swiglu_neuron_prices_its_value_and_gate_rows():
    """timm's packed SwiGLU: fc1 C → 2w (weights and bias), fc2 w → C; the gate is free; fc1's density counts its
    2w·C weights."""
    b = resolve(SWIGLU["g"], {}).blocks[0]
    assert (b.dim, b.hidden, b.fc1_per_neuron) == (1536, 4096, 2)
    for convention in ("paper", "exact"):
        tokens = b.patches if convention == "paper" else b.tokens
        assert ffn_cost(b, 10, convention) == Cost(
            tokens * 3 * 10 * b.dim, 2 * 10 * b.dim + 20 + 10 * b.dim + b.dim
        )
    dense, half = ffn_cost(b, 10, "exact"), ffn_cost(b, 10, "exact", fc1=0.5)
    assert (dense.macs - half.macs, dense.params - half.params) == (b.tokens * 10 * b.dim, 10 * b.dim)


def test_skip_blocks_run_no_attention_norm():
    """A skip block pays its FFN and norm2 only: no attention branch, no norm1 (the compact block has none)."""
    b = resolve(DEIT["S"], {}).blocks[0]
    for convention, ln in (("paper", 1), ("exact", 5)):
        skip = block_cost(b, BlockArch("skip", 0, b.heads, b.head_dim), convention)
        assert skip == Cost(
            ln * b.tokens * b.dim, 2 * b.dim + b.dim
        )  # norm2 (MACs, weight+bias) and fc2.bias


def test_density_counts_non_zero_weights_of_each_layer():
    b = resolve(DEIT["S"], {}).blocks[0]
    dense = block_cost(b, BlockArch("msa", 100, 2, 32), "paper")
    d = Density(qkv=0.5, proj=0.25, fc1=0.75, fc2=1.0)
    sparse = block_cost(b, BlockArch("msa", 100, 2, 32, d), "paper")
    inner = 64
    saved_weights = (3 * b.dim * inner) // 2 + (b.dim * inner * 3) // 4 + (b.dim * 100) // 4
    assert dense.params - sparse.params == saved_weights
    saved_macs = (
        b.tokens * ((3 * b.dim * inner) // 2 + (b.dim * inner * 3) // 4) + b.patches * (b.dim * 100) // 4
    )
    assert dense.macs - sparse.macs == saved_macs
    assert sparse.sparse and not dense.sparse
    assert branch_cost(b, "msa", "paper", heads=2, head_dim=32).params == 4 * b.dim * 64 + 3 * 64 + b.dim


def test_totals_add_up():
    g = resolve(SWIN["T"], TINY_SWIN)
    arch = dense_arch(g).with_block(1, op="conv1x1", ffn=3)
    for convention in ("paper", "exact"):
        blocks = [block_cost(b, a, convention) for b, a in zip(g.blocks, arch.blocks, strict=True)]
        total = stem_head_cost(g, convention)
        for c in blocks:
            total = total + c
        assert total == arch_cost(g, arch, convention)


def test_counts_price_the_same_as_points_and_mix_ops_linearly():
    """``tally`` of a point's counts is its cost; op weights (0.25, 0.75) price a quarter and three quarters."""
    g = resolve(DEIT["Ti"], TINY_VIT)
    arch = dense_arch(g).with_block(0, op="conv3x3", heads=1, head_dim=16)
    assert tally(g, counts_of(arch), "exact").cost() == arch_cost(g, arch, "exact")
    mixed = counts_of(arch)
    b0 = mixed.blocks[0]
    mixed.blocks[0] = BlockCounts({"conv3x3": 0.25, "msa": 0.75}, b0.heads, b0.head_dim, b0.ffn)
    a_conv, a_msa = arch, arch.with_block(0, op="msa")
    want = 0.25 * arch_cost(g, a_conv, "exact").macs + 0.75 * arch_cost(g, a_msa, "exact").macs
    assert tally(g, Counts(mixed.embed, mixed.blocks), "exact").macs == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("convention", ["paper", "exact"])
def test_swinv2_expected_counts_price_like_the_point(convention: str):
    """The SwinV2 terms (q/v biases, logit scale, position-bias MLP, merging norm) on tensors: the same cost as the
    point, and a gradient in the head count that includes the MLP's output layer."""
    g = resolve(SWINV2["T"], PADDED_SWINV2)
    arch = dense_arch(g).with_block(0, op="conv3x3").with_block(2, heads=1, head_dim=3, ffn=7)
    counts = counts_of(arch)
    heads = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    b2 = counts.blocks[2]
    counts.blocks[2] = BlockCounts(b2.ops, heads, b2.head_dim, b2.ffn)
    embed = [torch.tensor(float(e), dtype=torch.float64) for e in counts.embed]
    got = tally(g, Counts(embed, counts.blocks), convention)
    want = arch_cost(g, arch, convention)
    assert (float(got.macs.detach()), float(got.params.detach())) == (want.macs, want.params)
    (grad,) = torch.autograd.grad(got.params, heads)
    b = g.blocks[2]
    per_head = 4 * b.dim * 3 + 2 * 3 + 1 + 512  # qkv + proj columns, q/v biases, logit scale, cpb_mlp.2 row
    assert float(grad) == per_head


@pytest.mark.parametrize("convention", ["paper", "exact"])
def test_swinv2_cr_expected_counts_price_like_the_point(convention: str):
    """The SwinV2-CR terms (fused qkv bias, logit scale, pairwise position-bias MLP, norm3) on tensors: the same
    cost as the point, and a gradient in the head count that includes the MLP's output row and bias."""
    g = resolve(SWINV2_CR["T-ns"], PADDED_SWINV2)
    arch = dense_arch(g).with_block(0, op="conv3x3").with_block(2, heads=1, head_dim=3, ffn=7)
    arch = arch.with_block(3, op="skip", ffn=0)  # stage 1's last block: its norm3 stays
    counts = counts_of(arch)
    heads = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    b2 = counts.blocks[2]
    counts.blocks[2] = BlockCounts(b2.ops, heads, b2.head_dim, b2.ffn)
    embed = [torch.tensor(float(e), dtype=torch.float64) for e in counts.embed]
    got = tally(g, Counts(embed, counts.blocks), convention)
    want = arch_cost(g, arch, convention)
    assert (float(got.macs.detach()), float(got.params.detach())) == (want.macs, want.params)
    (grad,) = torch.autograd.grad(got.params, heads)
    b = g.blocks[2]
    per_head = (
        4 * b.dim * 3 + 3 * 3 + 1 + 384 + 1
    )  # qkv + proj columns, qkv bias, logit scale, meta_mlp.fc2 row
    assert float(grad) == per_head


def test_errors():
    g = resolve(DEIT["Ti"], TINY_VIT)
    with pytest.raises(ValueError, match="unknown cost convention 'fvcore'"):
        dense_cost(g, "fvcore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the assignment has 1 blocks but the backbone has 6"):
        arch_cost(g, replace(dense_arch(g), blocks=dense_arch(g).blocks[:1]), "exact")
    with pytest.raises(KeyError, match="conv7x7"):
        block_cost(g.blocks[0], BlockArch("conv7x7", 1, 1, 1), "exact")
    with pytest.raises(ValueError, match="1 stage width"):
        stem_head_cost(g, "exact", (8, 8))


def test_import_does_not_pull_torch():
    code = "import spvit_dsl.space.cost, spvit_dsl.space.backbones, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
