"""The dense backbone's shape (space stage, pure Python): :class:`Geometry` and one :class:`BlockGeom` per block.

Produced by :func:`spvit_dsl.space.backbones.resolve` from a timm model name and the spec's overrides; read by every
later stage. Nothing here changes with a search: a point of the space (:mod:`.plan`) says how much of it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CONVENTIONS", "CPB_HIDDEN", "META_HIDDEN", "BlockGeom", "Convention", "Family", "Geometry"]

Family = Literal["vit", "swin"]
Convention = Literal["paper", "exact"]
CONVENTIONS: tuple[Convention, ...] = ("paper", "exact")
CPB_HIDDEN = 512  # SwinV2's continuous-position-bias MLP width (fixed in timm's WindowAttention)
META_HIDDEN = 384  # SwinV2-CR's position-bias MLP width (timm's WindowMultiHeadAttention default)


@dataclass(frozen=True)
class BlockGeom:
    """Shape facts of one transformer block of the dense backbone."""

    index: int  # global block index (Swin blocks are numbered across stages)
    stage: int  # Swin stage (0 for ViT)
    index_in_stage: int
    dim: int  # C, the dense residual width
    heads: int
    head_dim: int
    # dense FFN width, fc2's input (int(mlp_ratio * C), timm's rounding; a packed GLU: half of that)
    hidden: int
    grid: tuple[int, int]  # (H, W) of the patch-token map this block sees
    prefix_tokens: int  # class, register and distillation tokens before the patches; 0 for Swin
    window: int = 0  # Swin window size after timm's clamping to the grid; 0 for ViT
    shift: int = 0  # Swin shift size (0 on even blocks and when the window covers the grid)
    # per-channel residual scales ls1 (attention branch) and ls2 (FFN): DeiT-III, DINOv2
    layer_scale: bool = False
    qkv_bias: bool = True
    # timm's packed SwiGLU FFN (``GluMlp`` as ``SwiGLUPacked`` builds it; DINOv2-g, TIPSv2-g; Shazeer, "GLU Variants
    # Improve Transformer", 2020): fc1 = Linear(C, 2·hidden) whose output halves a, b give ``SiLU(a) ⊙ b``, then
    # fc2 = Linear(hidden, C). Neuron j owns fc1 rows j and hidden + j and fc2 column j.
    ffn_glu: bool = False
    # SwinV2 (Liu et al., CVPR 2022; timm's ``SwinTransformerV2Block``): res-post-norm (``x + norm1(attn(x))``),
    # scaled cosine attention with a learned per-head logit scale, the log-spaced continuous position bias (an MLP
    # 2 → CPB_HIDDEN → heads over the window's relative coordinates) and separate q/v biases (k has none)
    swin_v2: bool = False
    # timm's SwinV2-CR (``swin_transformer_v2_cr``; swin_v2 is True too): a fused qkv bias, a per-head logit scale of
    # shape (heads,), and its position-bias MLP ``meta_mlp`` (2 → META_HIDDEN → heads, both layers biased) over every
    # pair of window positions, with no 16·sigmoid; blocks live at ``stages.{s}.blocks.{j}``
    swin_v2_cr: bool = False
    # SwinV2-CR: a LayerNorm ``norm3`` on the main branch after the block (x = norm3(x))
    extra_norm: bool = False

    @property
    def fc1_per_neuron(self) -> int:
        """fc1 rows one FFN neuron owns: 2 for a packed GLU (its value and gate rows), else 1."""
        return 2 if self.ffn_glu else 1

    @property
    def tokens(self) -> int:
        """Every token the block sees: patches plus prefix tokens."""
        return self.grid[0] * self.grid[1] + self.prefix_tokens

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def attention_tokens(self) -> int:
        """Tokens the attention computes on: a Swin map is zero-padded to whole windows (timm pads the bottom and
        right edges when the window does not tile the grid); a ViT attends over every token."""
        if not self.window:
            return self.tokens
        rows, cols = (-(-side // self.window) * self.window for side in self.grid)
        return rows * cols

    @property
    def module(self) -> str:
        """The block's path in the timm model (``blocks.3``; Swin ``layers.1.blocks.0``; SwinV2-CR
        ``stages.1.blocks.0``)."""
        if self.swin_v2_cr:
            return f"stages.{self.stage}.blocks.{self.index_in_stage}"
        return f"layers.{self.stage}.blocks.{self.index_in_stage}" if self.window else f"blocks.{self.index}"


@dataclass(frozen=True)
class Geometry:
    """The dense backbone, resolved from a timm model name and the spec's overrides."""

    family: Family
    model: str  # timm model name
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int  # ViT: the residual width; Swin: stage 0's width (stage s: embed_dim * 2**s)
    depths: tuple[int, ...]  # ViT: (depth,); Swin: per stage
    num_heads: tuple[int, ...]  # ViT: (heads,); Swin: per stage
    mlp_ratio: float
    window_size: int  # Swin only (0 for ViT)
    prefix_tokens: int  # ViT: class + register + distillation tokens
    blocks: tuple[BlockGeom, ...]
    # keyword arguments for timm.create_model(model, pretrained=False, **timm_kwargs)
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    tag: str = ""  # the pretrained tag ``pretrained`` loads (timm's ``model.tag``; "" when the name has none)
    # ViT layout beyond the blocks (timm's VisionTransformer arguments; the defaults are DeiT's). Swin: unused.
    class_token: bool = True
    reg_tokens: int = 0  # register tokens (Darcet et al., 2024), after the class token
    dist_token: bool = False  # DeiT's distillation token and its second head
    no_embed_class: bool = False  # the position embedding covers the patches only (not the prefix tokens)
    # ViT: "token" (the class token), "avg" (mean of the patch tokens) or "map" (SigLIP's attention pool over the
    # patch tokens: one learned query, a multi-head attention, a LayerNorm and an MLP); Swin: "avg"
    global_pool: str = "token"
    pre_norm: bool = False  # a LayerNorm before the blocks (CLIP)
    final_norm: bool = True  # the LayerNorm over every token after the blocks
    fc_norm: bool = False  # the LayerNorm over the pooled feature instead
    patch_bias: bool = True  # the patch embedding's bias (CLIP has none)
    # the FFN activation's timm class name (GELU, QuickGELU, GELUTanh; SiLU for a packed SwiGLU); free in both
    # conventions
    act: str = "GELU"
    # Swin: SwinV2 blocks (see BlockGeom.swin_v2) and SwinV2's patch merging (reduction 4C → C', then LayerNorm(C'))
    swin_v2: bool = False
    # Swin: timm's SwinV2-CR (its blocks: BlockGeom.swin_v2 and swin_v2_cr): Swin v1's patch merging (LayerNorm(4C),
    # then the reduction) at ``stages.{s}.downsample``, no final norm (the last block's norm3 plays it), the head
    # reads an NCHW map; swin_v2 stays False (it names the other merging)
    swin_v2_cr: bool = False

    @property
    def reads_patches(self) -> bool:
        """Whether the classifier reads the patch tokens directly (Swin, a ViT with average or attention pooling); a ViT that
        classifies from its class token reads the image only through attention."""
        return self.family == "swin" or self.global_pool in ("avg", "map")

    @property
    def heads_out(self) -> int:
        """Classifier heads: two for a distilled DeiT (head, head_dist), else one."""
        return 2 if self.dist_token else 1

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def stages(self) -> int:
        """Stages with their own residual width: one for ViT, ``len(depths)`` for Swin."""
        return len(self.depths) if self.family == "swin" else 1

    def stage_dim(self, stage: int) -> int:
        """The dense residual width of a stage."""
        return self.embed_dim * 2**stage if self.family == "swin" else self.embed_dim

    @property
    def dims(self) -> tuple[int, ...]:
        """The dense residual width of every stage."""
        return tuple(self.stage_dim(s) for s in range(self.stages))

    @property
    def num_features(self) -> int:
        return self.stage_dim(self.stages - 1)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``timm.create_model`` (which takes ``**kwargs: Any``)."""
        return dict(self.timm_kwargs)
