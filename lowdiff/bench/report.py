"""Report: the Markdown table of a ``lowdiff bench`` JSON report, and where a script's results go."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def results_dir(out: Path | None, name: str) -> Path:
    """``out``, created; without one, a new ``lowdiff-{name}-*`` folder in the system temp dir.

    A benchmark run by a user must not write into the repository's committed results by default;
    the committed folders change only when a command names them (``--out benchmarks/…``). The folder
    is printed, so that a run's results can be found.
    """
    path = Path(tempfile.mkdtemp(prefix=f"lowdiff-{name}-")) if out is None else out
    path.mkdir(parents=True, exist_ok=True)
    print(f"results: {path}", flush=True)
    return path


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| config | engine | device | batch | latency mean (s) | p50 (s) | p90 (s) | images/s | CPU s per batch | "
        "NFE per stage | stage latency (s) | effective NFE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        nfe = " / ".join(f"{s['resolution']}: {s['nfe']}" for s in r["stages"])
        lat = " / ".join(
            f"{s['resolution']}{' decode' if s.get('stage') == 'decode' else ''}: {s['latency_s_mean']:.3f}"
            for s in r["stages"]
        )
        lines.append(
            f"| {r['config']} | {r['engine']} {r['precision']} ({r['threads']} thr) | {r['device']} | {r['batch']} | "
            f"{r['latency_s_mean']:.3f} | {r['latency_s_p50']:.3f} | {r['latency_s_p90']:.3f} | "
            f"{r['throughput_img_s']:.2f} | {r['cpu_s_mean']:.3f} | {nfe} | {lat} | {r['effective_nfe']} |"
        )
    if report["ratio"] is not None:
        first = report["results"][0]
        other = next(r for r in report["results"] if r["config"] != first["config"])
        lines.append("")
        lines.append(
            f"Throughput ratio {first['config']} / {other['config']} ({first['engine']} {first['precision']}): "
            f"**{report['ratio']:.3f}**"
        )
    return "\n".join(lines) + "\n"
