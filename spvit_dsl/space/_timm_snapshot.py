"""Regenerating ``space/timm_configs.json`` from the installed timm (imports timm and torch; never at compile time).

:mod:`spvit_dsl.space.backbones` resolves backbone names from that snapshot in pure Python. For every timm name of
:data:`PATTERNS` (``vit_*``, ``deit*`` — DeiT-III included — and ``swin*``) the model is built on the meta device with
its default arguments and read back: sizes, the token layout (class, register and distillation tokens, whether the
position embedding covers them), the pooling and its norms, layer scale, qkv bias, the FFN (timm's ``Mlp`` or the
packed SwiGLU ``GluMlp``: ``ffn_glu``; ``hidden``, its neurons, is fc2's input width) and its activation, and either
the features spvit-dsl lowers or the first one it does not (``refused``, one line naming the feature); for timm's
SwinV2-CR, its stem, stage sizes, window and where its extra norms sit (Swin v1 and SwinV2 names are read from their
pattern in :mod:`~spvit_dsl.space.backbones`). The pretrained tags of each name and their class counts come from
timm's pretrained configs, which ship with timm (no network).

Run ``python -m spvit_dsl.space._timm_snapshot`` after upgrading timm; ``tests/test_backbones.py`` checks the
snapshot against the installed timm.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["PATTERNS", "snapshot", "swin_v2_cr_facts", "vit_facts"]

PATTERNS = ["vit_*", "deit*", "swin*"]


def _refusal(model: Any) -> str | None:  # noqa: ANN401 (a timm model)
    """The first feature of a timm model that spvit-dsl does not lower, as a short phrase; None when all are known
    (Swin v1 and SwinV2 are resolved from their names, SwinV2-CR from :func:`swin_v2_cr_facts`)."""
    from timm.layers.attention import Attention  # noqa: PLC0415
    from timm.models.vision_transformer import Block, VisionTransformer  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        kinds: dict[str, str | None] = {
            "SwinTransformer": None,
            "SwinTransformerV2": None,
            "SwinTransformerV2Cr": None,
            "VisionTransformerRelPos": "relative-position attention (timm's VisionTransformerRelPos)",
        }
        if name == "Eva":
            return _eva_refusal(model)
        return kinds.get(name, f"the {name} architecture")
    patch = type(model.patch_embed).__name__
    if patch != "PatchEmbed":
        return (
            "a hybrid convolutional stem (ResNet features instead of patches)"
            if "Hybrid" in patch
            else f"the patch embedding {patch}"
        )
    if not isinstance(model.patch_embed.norm, nn.Identity):
        return "a norm after the patch embedding"
    if model.pos_embed is None:
        return "a ViT without a learned position embedding"
    pool: Any = getattr(model, "attn_pool", None)
    if pool is not None:
        plain = (
            type(pool).__name__ == "AttentionPoolLatent"
            and pool.pos_embed is None
            and pool.latent_len == 1
            and pool.pool == "token"
            and pool.mlp is not None
            and isinstance(pool.q, nn.Linear)
            and isinstance(pool.q_norm, nn.Identity)
            and not model.pool_include_prefix
            and pool.mlp.fc1.out_features == model.blocks[0].mlp.fc1.out_features  # type: ignore[union-attr]
        )
        if not plain:
            return f"the attention-pool head {type(pool).__name__} in this configuration"
    block = model.blocks[0]
    if type(block) is not Block:
        labels = {
            "ParallelThingsBlock": "parallel attention and FFN branches",
            "ResPostBlock": "post-norm residual blocks",
            "ParallelScalingBlock": "parallel attention and FFN branches",
        }
        return labels.get(type(block).__name__, f"the block type {type(block).__name__}")
    attn = block.attn
    if type(attn) is not Attention:
        labels = {"DiffAttention": "differential attention"}
        return labels.get(type(attn).__name__, f"the attention type {type(attn).__name__}")
    if not all(isinstance(getattr(attn, n), nn.Identity) for n in ("q_norm", "k_norm", "norm")):
        return "q/k or attention-output normalisation"
    ffn = _ffn_refusal(block.mlp)
    if ffn is not None:
        return ffn
    if model.global_pool not in ("token", "avg", "map"):
        return f"global pooling '{model.global_pool}'"
    return None


def _eva_refusal(model: Any) -> str:  # noqa: ANN401 (a timm Eva)
    """What a timm ``Eva`` model adds that spvit-dsl does not lower: rotary position embeddings and the FFN it was
    built with; EVA-01 giant has neither, and is refused for the model class alone."""
    found = ["rotary position embeddings"] if getattr(model, "rope", None) is not None else []
    ffn = _ffn_refusal(model.blocks[0].mlp)
    if ffn is not None:
        found.append(ffn)
    if not found:
        return "timm's Eva model class (a plain ViT layout, built with modules spvit-dsl does not read yet)"
    return "timm's Eva blocks: " + " and ".join(found)


def _ffn_refusal(mlp: Any) -> str | None:  # noqa: ANN401 (a timm FFN module)
    """What spvit-dsl does not lower in a ViT block's FFN: anything but timm's ``Mlp`` and its packed GLU ``GluMlp``
    over tokens (``SwiGLUPacked``: ``SiLU(first half of fc1) * second half``; the supernet follows the module's
    ``gate_last`` either way), and a norm over the hidden neurons (masking neurons would move its statistics)."""
    from timm.layers import GluMlp, Mlp  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    if type(mlp) is GluMlp:
        if not isinstance(mlp.fc1, nn.Linear):
            return "a convolutional GLU FFN"
    elif type(mlp) is not Mlp:
        labels = {"SwiGLU": "a SwiGLU FFN with separate gate and value layers (timm's SwiGLU)"}
        return labels.get(type(mlp).__name__, f"the FFN {type(mlp).__name__}")
    if not isinstance(mlp.norm, nn.Identity):
        return "a norm inside the FFN"
    return None


def _norms(model: Any) -> list[bool]:  # noqa: ANN401 (a timm VisionTransformer)
    """[the final norm over every token, the pooled feature's norm (fc_norm)]: which of the two timm placed."""
    from torch import nn  # noqa: PLC0415

    return [not isinstance(model.norm, nn.Identity), not isinstance(model.fc_norm, nn.Identity)]


def vit_facts(model: Any) -> dict[str, Any]:  # noqa: ANN401 (a timm model)
    """What :func:`spvit_dsl.space.backbones.resolve` needs of one ViT built with its default arguments."""
    from torch import nn  # noqa: PLC0415

    refused = _refusal(model)
    if refused is not None:
        return {"refused": refused}
    if type(model).__name__ == "SwinTransformer":
        return {"swin": True}
    if type(model).__name__ == "SwinTransformerV2":
        return {"swin": True, "swin_v2": True}
    if type(model).__name__ == "SwinTransformerV2Cr":
        return swin_v2_cr_facts(model)
    block = model.blocks[0]
    grid = tuple(model.patch_embed.grid_size)
    patch = model.patch_embed.patch_size
    return {
        "img_size": int(grid[0] * patch[0]),
        "patch_size": int(patch[0]),
        "in_chans": int(model.patch_embed.proj.in_channels),
        "patch_bias": model.patch_embed.proj.bias is not None,
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(block.attn.num_heads),
        "hidden": int(block.mlp.fc2.in_features),  # FFN neurons (a packed GLU's fc1 has twice as many rows)
        "ffn_glu": type(block.mlp).__name__ == "GluMlp",
        "class_token": model.cls_token is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "dist_token": getattr(model, "dist_token", None) is not None,
        "no_embed_class": bool(model.no_embed_class),
        "global_pool": str(model.global_pool),
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        **dict(zip(("final_norm", "fc_norm"), _norms(model), strict=True)),
        "layer_scale": not isinstance(block.ls1, nn.Identity),
        "qkv_bias": block.attn.qkv.bias is not None,
        "act": type(block.mlp.act).__name__,
    }


def swin_v2_cr_facts(model: Any) -> dict[str, Any]:  # noqa: ANN401 (a timm SwinTransformerV2Cr)
    """The sizes of one of timm's SwinV2-CR models (``swin_transformer_v2_cr.py``), read from the model: stem, per-stage
    depths and heads, the window timm derived from the image (``window_size``, before clamping to each stage's grid)
    and the rule that places the main-branch ``norm3`` LayerNorms. timm keeps no record of that rule's arguments
    (``extra_norm_period``, ``extra_norm_stage``), so they are the simplest pair that reproduces where the model has a
    ``norm3`` (the smallest period, 0 for none; stage ends only when needed); an override of ``depth`` applies it to
    the new depths, as timm does (``tests/test_backbones.py`` checks it against timm)."""
    from torch import nn  # noqa: PLC0415

    from .backbones import cr_extra_norms  # noqa: PLC0415 (pure Python; backbones imports this module lazily)

    stages = list(model.stages)
    depths = [len(stage.blocks) for stage in stages]
    placed = [[not isinstance(blk.norm3, nn.Identity) for blk in stage.blocks] for stage in stages]
    window = tuple(model.window_size)
    patch = model.patch_embed.patch_size
    blocks = [blk for stage in stages for blk in stage.blocks]
    clamped = all(tuple(b.window_size) == tuple(min(f, window[0]) for f in b.feat_size) for b in blocks)
    if window[0] != window[1] or not clamped:
        raise ValueError(
            f"{type(model).__name__}: a window that is not square or not the same in every stage"
        )
    rule = next(
        (
            (period, ends)
            for period in range(max(depths) + 1)
            for ends in (False, True)
            if placed
            == [cr_extra_norms(d, period, ends or s == len(depths) - 1) for s, d in enumerate(depths)]
        ),
        None,
    )
    if rule is None:
        raise ValueError(
            f"{type(model).__name__}: norm3 placed by a rule other than timm's period / stage ends"
        )
    return {
        "swin": True,
        "swin_v2_cr": True,
        "img_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(patch[0]),
        "embed_dim": int(model.patch_embed.proj.out_channels),
        "depths": depths,
        "num_heads": [int(stage.blocks[0].attn.num_heads) for stage in stages],
        "mlp_ratio": blocks[0].mlp.fc1.out_features / blocks[0].dim,
        "window_size": int(window[0]),
        "extra_norm_period": rule[0],
        "extra_norm_stage": rule[1],
    }


def _tags(name: str) -> list[list[Any]]:
    """``[tag, class count of the tag's head (0: features only)]`` pairs, timm's default tag first (a list: the JSON
    is written with sorted keys, which would reorder a mapping)."""
    import timm.models  # noqa: PLC0415

    cfgs = timm.models.get_arch_pretrained_cfgs(name)  # timm's order: the default tag first
    return [[cfg.tag or "", int(cfg.num_classes or 0)] for cfg in cfgs.values()]


def snapshot() -> dict[str, Any]:
    """The whole snapshot: timm's version; per name of :data:`PATTERNS`, :func:`vit_facts` (built on the meta
    device, also with ``global_pool='avg'`` and ``'token'`` to learn which norms timm places then) and its tags;
    and every other timm name with its timm module (so that a real timm name is never called unknown)."""
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415

    models: dict[str, Any] = {}
    for name in sorted(timm.list_models(PATTERNS)):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        facts = vit_facts(model)
        if "refused" not in facts and "swin" not in facts:
            for pool in ("token", "avg"):
                if pool == "token" and not facts["class_token"] or pool == "avg" and facts["dist_token"]:
                    continue  # timm refuses these two itself
                with torch.device("meta"):
                    other = timm.create_model(name, pretrained=False, global_pool=pool)
                facts[f"norms_{pool}"] = _norms(other)
        facts["tags"] = _tags(name)
        models[name] = facts
    others = {
        name: module
        for module in timm.list_modules()
        for name in timm.list_models(module=module)
        if name not in models
    }
    # the other ViTs timm builds with VisionTransformer or Eva: their first missing feature, read as for the names
    # above (null: a plain ViT spvit-dsl would lower under a vit_* name)
    others_refused = {}
    for name, module in others.items():
        if module in ("vision_transformer", "eva"):
            with torch.device("meta"):
                others_refused[name] = _refusal(timm.create_model(name, pretrained=False))
    return {
        "timm": timm.__version__,
        "models": models,
        "others": dict(sorted(others.items())),
        "others_refused": dict(sorted(others_refused.items())),
    }


def _regen() -> None:
    """Rewrite ``space/timm_configs.json`` (atomically) from the installed timm."""
    path = Path(__file__).with_name("timm_configs.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python -m spvit_dsl.space._timm_snapshot")
    _regen()
