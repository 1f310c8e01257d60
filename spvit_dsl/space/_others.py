"""What spvit-dsl does not lower in timm's networks outside the ``vit_*``, ``deit*`` and ``swin*`` names.

The snapshot (``space/timm_configs.json``) records every other timm name with the timm module that defines it. A
spec naming one of them is refused with the feature spvit-dsl lacks, not only the family: each phrase below was read
from the module's source in timm 1.0.31 (its docstring and block classes). The networks timm builds as ``VisionTransformer``
or ``Eva`` under other names (AIMv2, BEiT-3, FlexiViT, EVA-01, EVA-02) are read from the models themselves by the
snapshot (``others_refused``).
"""

from __future__ import annotations

__all__ = ["PLAIN_VIT", "other_refusal"]

PLAIN_VIT = (
    "plain"  # a name timm builds as a plain VisionTransformer that spvit-dsl could lower under a vit_* name
)

_CONV = "convolutional stages"  # shared by the hybrids below

# timm module -> the feature spvit-dsl does not lower (transformers and hybrids first, then the convolutional families)
_MODULES: dict[str, str] = {
    "beit": "BEiT's per-block relative-position bias",
    "naflexvit": "NaFlex's variable-resolution patch sequences (packed tokens, factorised position embedding)",
    "vision_transformer_relpos": "relative-position attention (timm's VisionTransformerRelPos)",
    "vision_transformer_sam": "SAM's windowed attention with relative positions and its convolutional neck",
    "qwen3_vit": "axial 2D rotary position embeddings (Qwen3-ViT)",
    "gemma4_vit": "2D rotary position embeddings, q/k normalisation and sandwich norms (Gemma 4 ViT)",
    "deepseek_vit": "axial 2D rotary position embeddings, RMSNorm and SwiGLU FFNs (DeepSeek ViT)",
    "cait": "class-attention layers and talking-heads attention (CaiT)",
    "xcit": "cross-covariance attention over channels (XCiT)",
    "levit": "attention with a learned attention bias, BatchNorm linears and a convolutional stem (LeViT)",
    "pit": "pooling layers that shrink the token grid between stages (PiT)",
    "tnt": "nested inner and outer transformers over pixels and patches (TNT)",
    "crossvit": "two token branches at two patch sizes joined by cross-attention (CrossViT)",
    "mvitv2": "pooling attention with decomposed relative positions (MViTv2)",
    "volo": "outlook attention (VOLO)",
    "twins": "locally-grouped and global sub-sampled attention (Twins)",
    "pvt_v2": "spatial-reduction attention and convolutional FFNs (PVTv2)",
    "hiera": "mask-unit attention over a hierarchical token layout (Hiera)",
    "hieradet_sam2": "mask-unit attention over a hierarchical token layout (Hiera, SAM 2)",
    "convit": "gated positional self-attention (ConViT)",
    "coat": "convolutional relative-position encodings and factorised attention (CoaT)",
    "davit": "alternating spatial-window and channel attention (DaViT)",
    "gcvit": "global-context attention beside convolutional blocks (GC ViT)",
    "nest": "nested local attention with block aggregation (NesT)",
    "tiny_vit": f"{_CONV} and windowed attention with an attention bias (TinyViT)",
    "maxxvit": "MBConv blocks with block and grid attention (MaxViT, CoAtNet)",
    "vitamin": f"{_CONV} (MBConv) before the transformer (ViTamin)",
    "mobilevit": "MobileNet blocks around unfolded transformers (MobileViT)",
    "efficientformer": "pooling and convolutional meta-blocks (EfficientFormer)",
    "efficientformer_v2": "pooling and convolutional meta-blocks with strided attention (EfficientFormerV2)",
    "efficientvit_mit": "multi-scale ReLU linear attention (EfficientViT, MIT)",
    "efficientvit_msra": "cascaded group attention (EfficientViT, MSRA)",
    "efficientvim": "hidden-state-mixer state-space blocks (EfficientViM)",
    "mambaout": "gated convolutional blocks without token mixing by attention (MambaOut)",
    "nextvit": f"{_CONV} mixed with efficient multi-head attention (Next-ViT)",
    "edgenext": "split depthwise transposed attention (EdgeNeXt)",
    "swiftformer": "efficient additive attention (SwiftFormer)",
    "shvit": "single-head attention over part of the channels (SHViT)",
    "fastvit": "reparameterised convolutional token mixers (FastViT)",
    "iformer": f"{_CONV} and modulation attention (iFormer)",
    "lowformer": f"{_CONV} with lowered-resolution attention (LowFormer)",
    "cpubone": f"{_CONV} (CPUBone)",
    "csatv2": "DCT frequency-domain inputs and spatial attention (CSATv2)",
    "visformer": f"{_CONV} before the transformer (Visformer)",
    "focalnet": "focal modulation instead of attention (FocalNet)",
    "metaformer": "pooling and convolutional token mixers (PoolFormer, ConvFormer, CAFormer)",
    "mlp_mixer": "token-mixing MLPs instead of attention (MLP-Mixer, ResMLP, gMLP)",
    "sequencer": "LSTM token mixers (Sequencer)",
    "byoanet": "self-attention inside ResNet bottlenecks (BoTNet, HaloNet, LambdaNet)",
}


def other_refusal(name: str, module: str, snapshot: dict[str, str | None]) -> str | None:
    """The feature spvit-dsl does not lower in the timm network ``name`` of timm module ``module``, as a phrase that
    completes "spvit-dsl does not lower ... yet"; :data:`PLAIN_VIT` for a plain ViT outside the ``vit_*`` names; None
    for a module without an entry: a convolutional network (ResNet, EfficientNet, ConvNeXt, RegNet, ...).

    ``snapshot`` holds what the snapshot read from the models timm builds as ``VisionTransformer`` or ``Eva`` (AIMv2,
    BEiT-3, FlexiViT, EVA-01, EVA-02, ...): their first missing feature, or None for a plain ViT."""
    if name in snapshot:
        return snapshot[name] or PLAIN_VIT
    return _MODULES.get(module)
