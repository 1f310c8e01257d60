"""Draw docs/figures/unit-groups.png: the coupled slices of one embedding channel and one head of a small ViT.

Every rectangle is a weight of the dense timm model drawn to scale (rows × columns); the coloured stripes are the
positions :func:`spvit_dsl.space.groups.slices` declares for the unit — the same declaration the supernet's masks,
``Supernet.shrink`` and the compact builder use, so the picture is drawn from the code, not by hand.

    python docs/figures/unit_groups.py [--out docs/figures/unit-groups.png]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from spvit_dsl.compile.program import compile_text  # noqa: E402
from spvit_dsl.space.groups import Slice, groups, slices  # noqa: E402

SPEC = """backbone deit_tiny_patch16_224 { image = 32; patch = 8; embed_dim = 24; depth = 1; heads = 3; mlp_ratio = 2; classes = 6 }
embed: 8..24 step 8
blocks all { heads: 1..3; ffn: per neuron }
"""
# the tensors to draw for one block, as (label, state-dict key, rows, columns) of the dense model (2-D views)
CHANNEL, HEAD = 5, 1


def shapes(g) -> list[tuple[str, str, int, int]]:
    C, D, H = g.embed_dim, g.blocks[0].heads * g.blocks[0].head_dim, g.blocks[0].hidden
    p2 = g.in_chans * g.patch_size**2
    return [
        ("patch_embed.proj", "patch_embed.proj.weight", C, p2 // 8),
        ("cls_token, pos_embed", "pos_embed", g.blocks[0].tokens, C),
        ("norm1", "blocks.0.norm1.weight", C, 1),
        ("attn.qkv", "blocks.0.attn.qkv.weight", 3 * D, C),
        ("attn.proj", "blocks.0.attn.proj.weight", C, D),
        ("norm2", "blocks.0.norm2.weight", C, 1),
        ("mlp.fc1", "blocks.0.mlp.fc1.weight", H, C),
        ("mlp.fc2", "blocks.0.mlp.fc2.weight", C, H),
        ("head", "head.weight", g.num_classes, C),
    ]


def _positions(s: Slice, unit: int, units: int) -> list[int]:
    return s.positions([unit], units)


def draw(ax, g, group, unit: int, units: int, color: str, title: str) -> None:
    owned = {s.tensor: s for s in slices(g, group)}
    x = 0.0
    for label, key, rows, cols in shapes(g):
        ax.add_patch(Rectangle((x, 0), cols, rows, fill=False, lw=0.8))
        s = owned.get(key)
        if s is not None:
            axis = s.axis if key != "pos_embed" else 1  # pos_embed (1, N, C): channel axis 2 → drawn columns
            for pos in _positions(s, unit, units):
                if axis == 0:
                    ax.add_patch(Rectangle((x, rows - pos - 1), cols, 1, color=color, lw=0))
                else:
                    ax.add_patch(Rectangle((x + pos, 0), 1, rows, color=color, lw=0))
        ax.text(x + cols / 2, -2.5, label, ha="right", va="top", fontsize=7, rotation=35)
        x += cols + 10
    ax.set_xlim(-2, x)
    ax.set_ylim(-14, max(r for _, _, r, _ in shapes(g)) + 2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "unit-groups.png")
    )
    args = ap.parse_args()
    space = compile_text(SPEC, "figure.vit").space
    g = space.geometry
    by_path = {grp.path: grp for grp in groups(space)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5))
    draw(
        top,
        g,
        by_path["embed"],
        CHANNEL,
        g.embed_dim,
        "#fb8500",
        f"group 'embed', unit {CHANNEL}: one residual channel — its row or column in every tensor of the stream",
    )
    draw(
        bottom,
        g,
        by_path["blocks.0.heads"],
        HEAD,
        g.blocks[0].heads,
        "#219ebc",
        f"group 'blocks.0.heads', unit {HEAD}: one head — its rows of q, k and v, its columns of proj",
    )
    fig.text(
        0.5,
        0.01,
        "weights of the dense model drawn to scale (rows x columns; patch_embed shown 1/8 wide)",
        ha="center",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
