"""Plots: matplotlib on a file-only backend, and the bench report's stacked-bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def headless_pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """A stacked bar per result (per-stage latency of one batch); False when matplotlib is missing."""
    plt = headless_pyplot()
    if plt is None:
        return False
    results = report["results"]
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.7 * len(results)))
    labels = [f"{r['config']}\n{r['engine']} {r['precision']}, {r['threads']} thr, batch {r['batch']}" for r in results]
    colors = {8: "#8ecae6", 16: "#219ebc", 32: "#023047", 64: "#fb8500"}
    for row, r in enumerate(results):
        left = 0.0
        for s in r["stages"]:
            ax.barh(
                row,
                s["latency_s_mean"],
                left=left,
                color=colors.get(s["resolution"], "#999999"),
                label=f"{s['resolution']}×{s['resolution']}",
            )
            left += s["latency_s_mean"]
        note = f"  {r['throughput_img_s']:.3g} img/s, {r['cpu_s_mean']:.3g} CPU s/batch"
        ax.text(left, row, note, va="center", fontsize=8)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), title="stage", fontsize=8, loc="lower right")
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per batch (mean of runs), split by stage")
    title = "LowDiff bench"
    if report["ratio"] is not None:
        title += f": throughput ratio {report['ratio']:.2f}×"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(r["latency_s_mean"] for r in results) * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
