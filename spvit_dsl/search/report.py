"""Search stage — report: the searched architecture and the cost trajectory as one PNG (matplotlib, Agg backend).

Input: the program, the frozen :class:`~spvit_dsl.space.plan.FrozenArch`, the kept masks, the metrics records and the
budget targets. Output: ``report.png`` with two panels — the chosen attention op and the kept FFN width per block,
and the derived cost per epoch (and per step) against each budget.
"""

from __future__ import annotations

from typing import Any

from .._io import write_atomic
from ..space.plan import FrozenArch
from .budget import Target

__all__ = ["write_report"]

OP_COLORS = {
    "skip": "#bbbbbb",
    "conv1x1": "#8ecae6",
    "conv3x3": "#219ebc",
    "conv5x5": "#126782",
    "msa": "#fb8500",
}


def _arch_panel(ax: Any, program: Any, arch: FrozenArch) -> None:
    hidden = [p.geom.hidden for p in program.space.plans]
    xs = list(range(len(arch.blocks)))
    ratios = [b.ffn / h if h else 0.0 for b, h in zip(arch.blocks, hidden, strict=True)]
    colors = [OP_COLORS.get(b.op, "#666666") for b in arch.blocks]
    ax.bar(xs, ratios, color=colors, edgecolor="black", linewidth=0.5)
    for x, b, p, r in zip(xs, arch.blocks, program.space.plans, ratios, strict=True):
        label = f"{b.op}\n{b.ffn}"
        if (b.heads, b.head_dim) != (p.geom.heads, p.geom.head_dim):
            label += f"\n{b.heads}x{b.head_dim}"
        if not b.density.dense:
            label += "\n" + "/".join(f"{b.density.of(layer):.2g}" for layer in ("qkv", "proj", "fc1", "fc2"))
        ax.text(x, r + 0.02, label, ha="center", va="bottom", fontsize=6)
    ax.set_ylim(0, 1.5)
    ax.set_xticks(xs)
    ax.set_xlabel("block")
    ax.set_ylabel("kept FFN width / dense")
    title = "op (colour), FFN width, heads x head width when cut, densities qkv/proj/fc1/fc2 when sparse"
    if arch.embed != program.space.geometry.dims:
        title += f"; embedding widths {', '.join(map(str, arch.embed))}"
    ax.set_title(title, fontsize=8)
    used = sorted({b.op for b in arch.blocks}, key=list(OP_COLORS).index)
    handles = [_patch(OP_COLORS[o], o) for o in used if o in OP_COLORS]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper right", ncol=len(handles))


def _patch(color: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor="black", label=label)


def _cost_panel(
    ax: Any, records: list[dict[str, Any]], targets: list[Target], final: dict[str, float] | None = None
) -> None:
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not steps and not epochs and final is not None and not targets:  # a target shape, no budget
        ax.axis("off")
        ax.set_title("no budget: the space fixes the shape (cost of the searched network)")
        ax.text(
            0.5,
            0.5,
            f"{final['flops'] / 1e6:.2f} M multiply-adds, {final['params'] / 1e6:.3f} M params",
            ha="center",
            va="center",
            fontsize=10,
        )
        return
    if not steps and not epochs and final is not None:  # a data-free search: no trajectory, only the result
        ratios = [final[t.metric] / t.limit for t in targets]
        bars = ax.bar(
            [f"{t.metric} <= {t.text}" for t in targets], ratios, color="#8ecae6", edgecolor="black"
        )
        for bar, r in zip(bars, ratios, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, r + 0.02, f"{r:.1%}", ha="center", fontsize=8)
        ax.axhline(1.0, color="red", ls="--", lw=1, label="budget")
        ax.set_ylim(0, max(1.2, max(ratios) + 0.15))
        ax.set_ylabel("cost / budget")
        ax.set_title("cost of the searched network against each budget (no training trajectory)")
        ax.legend(fontsize=7)
        return
    for t in targets:
        if steps:
            ax.plot(
                [r["step"] for r in steps],
                [r["ratio"][t.metric] for r in steps],
                lw=0.8,
                alpha=0.5,
                label=f"{t.metric} per step (before projection)",
            )
    scheduled = [r for r in steps if isinstance(r.get("strategy"), dict) and "target" in r["strategy"]]
    if scheduled:  # SPViT's price controller: the ratio its schedule asked for
        ax.plot(
            [r["step"] for r in scheduled],
            [r["strategy"]["target"] for r in scheduled],
            "-",
            color="gray",
            lw=4,
            alpha=0.35,
            zorder=0,
            label="scheduled target (under the per-step line when it is met)",
        )
    for t in targets:
        if epochs:
            ax.plot(
                [r["step"] for r in epochs],
                [r["ratio"][t.metric] for r in epochs],
                "o-",
                label=f"{t.metric} at epoch end",
            )
    if final is not None:
        last = max((r["step"] for r in records), default=0)
        for t, color in zip(targets, ("green", "purple", "brown"), strict=False):
            ax.plot(
                [last],
                [final[t.metric] / t.limit],
                "*",
                ms=14,
                color=color,
                label=f"{t.metric} after projection",
            )
    ax.axhline(1.0, color="red", ls="--", lw=1, label="budget")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("derived cost / budget")
    ax.set_title(
        "derived cost against the budget (" + ", ".join(f"{t.metric} <= {t.text}" for t in targets) + ")"
    )
    ax.legend(fontsize=7)


def write_report(
    path: str,
    program: Any,
    arch: FrozenArch,
    kept: dict[str, Any],
    records: list[dict[str, Any]],
    targets: list[Target],
) -> None:
    """Draw the report and write it atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.5 * len(arch.blocks) + 4), 8))
    _arch_panel(top, program, arch)
    cost = program.graph.cost(arch, program.convention)
    final = {"flops": float(cost.macs), "params": float(cost.params)}
    for t in targets:
        if t.table is not None:
            final["latency"] = t.table.arch_ms(program.space.geometry, arch)
    _cost_panel(bottom, records, targets, final)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
