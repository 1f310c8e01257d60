"""Tiny search specs, frozen specs and search checkpoints for the build/export/bench tests (written per test)."""

from __future__ import annotations

from pathlib import Path

import torch

from spvit_dsl.compile.freeze import freeze
from spvit_dsl.compile.program import Program, compile_text
from spvit_dsl.lang.emit import emit
from spvit_dsl.space.plan import BlockArch, FrozenArch

VIT_BACKBONE = (
    "backbone vit_tiny_patch16_224 { weights = none; image = 32; patch = 8; embed_dim = 32; depth = 3; "
    "heads = 2; classes = 10 }"
)
DISTILLED_BACKBONE = (
    "backbone deit_tiny_distilled_patch16_224 { weights = none; image = 32; patch = 8; "
    "embed_dim = 32; depth = 3; heads = 2; classes = 10 }"
)
SWIN_BACKBONE = (
    "backbone swin_tiny_patch4_window7_224 { weights = none; image = 32; patch = 2; embed_dim = 16; "
    "depth = (2, 2); heads = (1, 2); window = 4; classes = 10 }"
)
_SMALL = "weights = none; image = 32; patch = 8; embed_dim = 32; depth = 3; heads = 2; classes = 10"
# one small configuration of every ViT family beyond plain ViT/DeiT (tests/test_families.py; docs/language.md)
FAMILY_BACKBONES = {
    "deit3": f"backbone deit3_small_patch16_224 {{ {_SMALL} }}",  # layer scale, position embedding on patches only
    "clip": f"backbone vit_base_patch16_clip_quickgelu_224 {{ {_SMALL} }}",  # pre-norm, QuickGELU, no patch bias
    "siglip_gap": f"backbone vit_base_patch16_siglip_gap_224 {{ {_SMALL} }}",  # no class token, average pooling
    "dinov2_reg": f"backbone vit_small_patch14_reg4_dinov2 {{ {_SMALL} }}",  # class + 4 register tokens, layer scale
    "reg_gap": f"backbone vit_medium_patch16_reg4_gap_256 {{ {_SMALL} }}",  # registers, no class token, fc_norm
    "so150m": f"backbone vit_so150m2_patch16_reg1_gap_256 {{ {_SMALL} }}",  # no qkv bias, register, fc_norm
    "avg_override": f"backbone vit_tiny_patch16_224 {{ {_SMALL}; global_pool = avg }}",  # avg pool on a ViT
    "siglip_map": f"backbone vit_base_patch16_siglip_224 {{ {_SMALL} }}",  # attention-pool (MAP) head
    "swiglu": f"backbone vit_giant_patch14_dinov2 {{ {_SMALL} }}",  # packed SwiGLU FFN (85 neurons), layer scale
}
# timm pads this one: a 17x17 grid under windows of 4 (padded to 20x20), merged as 18x18 into 9x9 (padded to 12x12)
SWIN_PADDED_BACKBONE = (
    "backbone swin_tiny_patch4_window7_224 { weights = none; image = 34; patch = 2; embed_dim = 16; "
    "depth = (2, 2); heads = (1, 2); window = 4; classes = 10 }"
)
# SwinV2 (cosine attention, continuous position bias, post-norm, v2 merging), padded like the one above
SWINV2_BACKBONE = (
    "backbone swinv2_tiny_window8_256 { weights = none; image = 34; patch = 2; embed_dim = 16; "
    "depth = (2, 2); heads = (1, 2); window = 4; classes = 10 }"
)
# timm's SwinV2-CR (pairwise position-bias MLP, v1 merging, main-branch norm3 at the end of every stage: "ns"), padded
SWINV2_CR_BACKBONE = (
    "backbone swinv2_cr_tiny_ns_224 { weights = none; image = 34; patch = 2; embed_dim = 16; "
    "depth = (2, 2); heads = (1, 2); window = 4; classes = 10 }"
)
SEARCH_BLOCKS = "blocks all { attention: one of {skip, conv1x1, conv3x3, conv5x5, msa}; ffn: per neuron }"

# search specs declaring every dimension on the backbones above: embedding width(s), heads, per-head width, FFN
# width, op and per-layer sparsity (the spaces tests/_spaces.every_dimension builds for their geometries)
_EVERY = (
    "attention: one of {skip, conv1x1, conv3x3, conv5x5, msa}; ffn: per neuron; head_dim: 1..16; "
    "sparsity: {0, 0.25, 0.5}"
)
EVERY_DIMENSION = {
    VIT_BACKBONE: f"embed: 1..32\nblocks all {{ {_EVERY}; heads: 1..2 }}\n",
    DISTILLED_BACKBONE: f"embed: 1..32\nblocks all {{ {_EVERY}; heads: 1..2 }}\n",
    SWIN_BACKBONE: f"stage 0 {{ embed: 1..16 }}\nstage 1 {{ embed: 1..32; heads: 1..2 }}\nblocks all {{ {_EVERY} }}\n",
    SWIN_PADDED_BACKBONE: (
        f"stage 0 {{ embed: 1..16 }}\nstage 1 {{ embed: 1..32; heads: 1..2 }}\nblocks all {{ {_EVERY} }}\n"
    ),
    SWINV2_BACKBONE: (
        f"stage 0 {{ embed: 1..16 }}\nstage 1 {{ embed: 1..32; heads: 1..2 }}\nblocks all {{ {_EVERY} }}\n"
    ),
    SWINV2_CR_BACKBONE: (
        f"stage 0 {{ embed: 1..16 }}\nstage 1 {{ embed: 1..32; heads: 1..2 }}\nblocks all {{ {_EVERY} }}\n"
    ),
} | {
    text: ("" if "siglip_224" in text else "embed: 1..32\n") + f"blocks all {{ {_EVERY}; heads: 1..2 }}\n"
    for text in FAMILY_BACKBONES.values()
}  # an attention-pool (MAP) head keeps the embedding width

# per-block (op, ffn width as a fraction of the dense width); the last block keeps MSA so that every token
# (the cls token included) depends on the conv branches
PATTERN = [("conv3x3", 0.4), ("skip", 0.0), ("conv1x1", 0.7), ("msa", 1.0)]


def search_program(backbone: str, path: Path) -> Program:
    text = f"{backbone}\n{SEARCH_BLOCKS}\n"
    path.write_text(text)
    return compile_text(text, str(path))


def every_dimension_text(backbone: str) -> str:
    """The search spec text of ``backbone`` (one of the above) with every dimension open."""
    return f"{backbone}\n{EVERY_DIMENSION[backbone]}"


def pattern_arch(program: Program, pattern: list[tuple[str, float]] | None = None) -> FrozenArch:
    pattern = pattern or PATTERN
    g = program.space.geometry
    blocks = []
    for b in g.blocks:
        op, frac = pattern[-1] if b.index == g.depth - 1 else pattern[b.index % (len(pattern) - 1)]
        blocks.append(BlockArch(op, round(frac * b.hidden), b.heads, b.head_dim))
    return FrozenArch(tuple(blocks), g.dims)


def write_frozen(program: Program, arch: FrozenArch, path: Path) -> Path:
    """The frozen spec of ``arch`` in ``program``'s space, as the search writes it."""
    spec = freeze(program.checked, arch, {"source": program.path, "strategy": "test", "seed": 0})
    path.write_text(emit(spec))
    return path


def randomise(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial supernet state: every weight, mixing matrix and BN statistic random (gate logits too, when
    ``net`` is a module holding them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def images(program_or_geometry, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = getattr(getattr(program_or_geometry, "space", None), "geometry", program_or_geometry)
    return torch.randn(
        batch, g.in_chans, g.img_size, g.img_size, generator=torch.Generator().manual_seed(seed)
    )


def search_and_build(program: Program, out: Path) -> torch.nn.Module:
    """Search ``program`` into ``out``, check the frozen point sits at or under its one budget and within 5% of it,
    build it from the search checkpoint and check its parameters are the cost model's and it classifies 10 classes."""
    from spvit_dsl.compact.build import build  # noqa: PLC0415
    from spvit_dsl.search import run_search  # noqa: PLC0415
    from spvit_dsl.space.cost import arch_cost  # noqa: PLC0415

    result = run_search(program, out=str(out), quiet=True)
    (b,) = result.budgets
    assert b["achieved"] <= b["limit"] * (1 + 1e-9) and b["achieved"] >= 0.95 * b["limit"]
    model = build(result.frozen_path, weights=result.checkpoint_path).eval()
    g = program.space.geometry
    assert sum(p.numel() for p in model.parameters()) == arch_cost(g, model.spvit_arch, "exact").params
    assert model(images(g)).shape == (2, 10)
    return model
