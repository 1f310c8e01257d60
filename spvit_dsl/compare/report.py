"""Compare stage — the table: rows per strategy from the cells, as JSON (with units), Markdown, a rich table and a
picture (top-1 against measured latency, one marker per method, error bars over seeds)."""

from __future__ import annotations

import statistics
from typing import Any

from .._io import write_atomic

__all__ = ["HEADERS", "UNITS", "markdown", "plot", "rows_of", "table_rows"]

UNITS = {
    "top1": "% top-1 on the validation split, best epoch of the shared fine-tuning recipe",
    "flops": "multiply-adds of the frozen network in the spec's convention (sparse: non-zero weights only)",
    "params": "parameters (sparse: non-zero weights only)",
    "latency_ms": "median forward time of one batch, milliseconds (see latency)",
    "latency_cut": "1 - latency / dense latency (measured side by side with the dense network)",
    "flops_cut": "1 - flops / dense flops",
    "efficiency": "latency_cut / flops_cut (1: the FLOPs cut is all real speed-up)",
    "search_s": "wall-clock seconds of the search (score or train), not of fine-tuning",
}


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def rows_of(cells: dict[str, list[dict[str, Any]]], dense: dict[str, Any]) -> list[dict[str, Any]]:
    """strategy → its cells (one per seed) ⟶ one row per strategy: mean and range of top-1, costs, latency and
    its cut against the FLOPs cut, search time, structure; or the reason the strategy could not search."""
    rows = []
    for strategy, seeds in cells.items():
        skipped = [c["skipped"] for c in seeds if "skipped" in c]
        if skipped:
            rows.append({"strategy": strategy, "status": "skipped", "reason": skipped[0]})
            continue
        top1 = [float(c["top1"]) for c in seeds]
        latency = [float(c["latency_ms"]) for c in seeds if c.get("latency_ms") is not None]
        dense_ms = [float(c["dense_latency_ms"]) for c in seeds if c.get("dense_latency_ms") is not None]
        flops = _mean([float(c["flops"]) for c in seeds]) or 0.0
        flops_cut = 1 - flops / dense["flops"] if dense.get("flops") else None
        latency_cut = _mean([1 - a / b for a, b in zip(latency, dense_ms, strict=True)]) if dense_ms else None
        times = [float(c["search_s"]) for c in seeds if c.get("search_s") is not None]
        rows.append(
            {
                "strategy": strategy,
                "status": "ok",
                "seeds": [c["seed"] for c in seeds],
                "top1_mean": statistics.mean(top1),
                "top1_min": min(top1),
                "top1_max": max(top1),
                "top1_per_seed": top1,
                "flops": flops,
                "params": _mean([float(c["params"]) for c in seeds]),
                "budget_ratio_max": max(
                    float(c["budget_ratio"]) for c in seeds if c.get("budget_ratio") is not None
                )
                if any(c.get("budget_ratio") is not None for c in seeds)
                else None,
                "latency_ms": _mean(latency),
                "latency_ms_min": min(latency) if latency else None,
                "latency_ms_max": max(latency) if latency else None,
                "latency_cut": latency_cut,
                "flops_cut": flops_cut,
                "efficiency": latency_cut / flops_cut
                if latency_cut is not None and flops_cut and flops_cut > 0.01
                else None,
                "search_s": _mean(times),
                "structure": "sparse" if any(c.get("sparse") for c in seeds) else "dense",
                "notices": sorted({c["notice"] for c in seeds if c.get("notice")}),
            }
        )
    return rows


def _fmt(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def table_rows(rows: list[dict[str, Any]], dense: dict[str, Any], reasons: bool = True) -> list[list[str]]:
    """The rows as text cells: method, top-1 mean (range), FLOPs (M), params (M), latency (ms), latency cut ÷ FLOPs
    cut, search (s), structure; a skipped strategy's reason in its row (``reasons=False``: "cannot search", the
    reason printed under a narrow terminal's table instead)."""
    out = [
        [
            "dense",
            f"{dense['top1']:.2f}",
            f"{dense['flops'] / 1e6:.3f}",
            f"{dense['params'] / 1e6:.4f}",
            _fmt(dense.get("latency_ms"), ".2f"),
            "",
            "",
            "dense",
        ]
    ]
    for r in rows:
        if r["status"] != "ok":
            why = f"cannot search this space: {r['reason']}" if reasons else "cannot search (below)"
            out.append([r["strategy"], why, "", "", "", "", "", ""])
            continue
        sparse = " (sparse)" if r["structure"] == "sparse" else ""
        cut = (
            f"{r['latency_cut']:.1%} / {r['flops_cut']:.1%}"
            if r["latency_cut"] is not None and r["flops_cut"] is not None
            else "—"
        )
        out.append(
            [
                r["strategy"],
                f"{r['top1_mean']:.2f} ({r['top1_min']:.2f}–{r['top1_max']:.2f})",
                f"{r['flops'] / 1e6:.3f}{sparse}",
                f"{(r['params'] or 0) / 1e6:.4f}{sparse}",
                _fmt(r["latency_ms"], ".2f"),
                cut,
                _fmt(r["search_s"], ".1f"),
                r["structure"],
            ]
        )
    return out


HEADERS = [
    "method",
    "top-1 % mean (range)",
    "FLOPs (M)",
    "params (M)",
    "latency (ms)",
    "latency cut / FLOPs cut",
    "search (s)",
    "structure",
]


def markdown(rows: list[dict[str, Any]], dense: dict[str, Any], title: str) -> str:
    """The table as GitHub Markdown, under a one-line title."""
    lines = [f"**{title}**", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for cells in table_rows(rows, dense):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict[str, Any]], dense: dict[str, Any], title: str) -> None:
    """Top-1 against measured latency: one marker per method (mean over seeds), error bars from the seeds'
    range, the dense network as a reference; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^vP*Xh"
    for i, r in enumerate(x for x in rows if x["status"] == "ok" and x["latency_ms"] is not None):
        y, x = r["top1_mean"], r["latency_ms"]
        ax.errorbar(
            x,
            y,
            yerr=[[y - r["top1_min"]], [r["top1_max"] - y]],
            xerr=[[x - r["latency_ms_min"]], [r["latency_ms_max"] - x]],
            fmt=markers[i % len(markers)],
            ms=8,
            capsize=3,
            label=r["strategy"] + (" (sparse)" if r["structure"] == "sparse" else ""),
        )
    if dense.get("latency_ms") is not None:
        ax.plot([dense["latency_ms"]], [dense["top1"]], "k*", ms=12, label="dense")
    ax.set_xlabel("measured latency per batch (ms)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
