"""Print the Markdown tables of benchmarks/README.md from the JSON reports in benchmarks/cpu/.

Usage: .venv/bin/python benchmarks/summarize.py [DIR]   (default: benchmarks/cpu)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(folder.glob("*.json")):
        report = json.loads(path.read_text())
        for result in report["results"]:
            out.append((path.stem, result | {"_ratio": report["ratio"]}))
    return out


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "cpu"
    results = rows(folder)
    print(
        "| report | config | engine | precision | threads | batch | runs | latency mean / p50 / p90 (s) | images/s "
        "| CPU s per batch | images per CPU s | stage latency 8 / 16 / 32 (s) | NFE | effective NFE | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for stem, r in results:
        stages = " / ".join(f"{s['latency_s_mean']:.2f}" for s in r["stages"])
        nfe = "+".join(str(s["nfe"]) for s in r["stages"])
        load = r.get("load_average")
        print(
            f"| {stem} | {r['config']} | {r['engine']} | {r['precision']} | {r['threads']} | {r['batch']} "
            f"| {r['runs']} "
            f"| {r['latency_s_mean']:.2f} / {r['latency_s_p50']:.2f} / {r['latency_s_p90']:.2f} "
            f"| {r['throughput_img_s']:.2f} | {r['cpu_s_mean']:.2f} | {r['batch'] / r['cpu_s_mean']:.2f} "
            f"| {stages} | {nfe} | {r['effective_nfe']} | {load[0] if load else '-'} |"
        )
    reports = {stem for stem, r in results if r["_ratio"] is not None}
    if reports:
        print()
        print("| report | engine | models | throughput ratio (wall) | ratio of images per CPU second |")
        print("|---|---|---|---|---|")
        for stem in sorted(reports):
            entries = [r for s, r in results if s == stem]
            first = entries[0]["config"]
            for a in (r for r in entries if r["config"] == first):
                b = next(r for r in entries if r["config"] != first and r["engine"] == a["engine"]
                         and r["precision"] == a["precision"])  # fmt: skip
                wall = a["throughput_img_s"] / b["throughput_img_s"]
                cpu = (a["batch"] / a["cpu_s_mean"]) / (b["batch"] / b["cpu_s_mean"])
                print(
                    f"| {stem} | {a['engine']} {a['precision']} | {a['config']} / {b['config']} "
                    f"| {wall:.3f} | {cpu:.3f} |"
                )


if __name__ == "__main__":
    main()
