"""Scheduler sweep: every scheduler of lowdiff.bench.simulate on the same open-loop Poisson traces.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scheduler/run.py --out-dir benchmarks/scheduler

Workloads: (cost source) × (request sizes). Cost sources:

* ``cifar10-cond-h100`` — a linear model t_r(b) = floor_r + k_r·b per evaluation, through the H100
  numbers in benchmarks/gpu/ (cudagraph bf16, batch 64): stage 8 costs 0.041 s for 18 evaluations,
  stage 16 0.131 s for 13 (h100-run3/bench-cifar10-b64.md), one 32×32 evaluation 22.7 ms (NCHW,
  benchmarks/gpu/README.md). The floors (1.0 / 1.2 / 1.5 ms: launch and small-kernel latency) are
  **assumed**, not measured: no per-batch-size GPU table exists yet (``lowdiff bench --cost-table`` on
  a GPU writes one; pass it with ``--gpu-table``).
* ``fashion32-cpu`` — the measured CPU table (``cost-fashion32-cpu.json``: ``lowdiff bench --cost-table
  --checkpoint lowdiff/weights/fashion32.pt --threads 1``), taken on a 2-core machine with a training run
  beside it, so its points are noisy.

Offered load is a fraction of the whole-cascade batcher's saturated throughput at its max batch (64).
Prints one table, writes results.json and scheduler.png (p50, p99 and throughput against load).

``--overlap-slowdowns 1,1.5`` adds the overlapped staged scheduler (``--stage-overlap on``) at those
contention slowdowns (see lowdiff/bench/simulate.py: while both lanes run, each at 1/s of its speed),
each without a backlog gate (``--overlap-backlog 0``) and with the served default (2 × the last stage's
limit).
``--saturated-only`` runs only the saturated-throughput table (seconds, not minutes), with the overlap
slowdowns given (default 1, 1.25, 1.5, 1.75, 2) and the largest s that still reaches ``--target`` ×
cascade, and writes ``overlap-saturated.json`` instead of results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lowdiff.bench.costs import read_cost_table  # noqa: E402
from lowdiff.bench.plots import headless_pyplot  # noqa: E402
from lowdiff.bench.simulate import (  # noqa: E402
    Cascade,
    CascadeScheduler,
    ContinuousScheduler,
    LinearCost,
    OverlapStagedScheduler,
    StagedScheduler,
    poisson_trace,
    saturated_throughput,
    simulate,
    slowdown_for,
    table_cost,
)

HERE = Path(__file__).resolve().parent
RESOLUTIONS = (8, 16, 32)
NFE = (18, 13, 17)  # cifar10-cond's schedule (the paper's)
# The embedded fashion32.pt's schedule since issue 17 (benchmarks/quality/: NFE 12/11/17); a test checks it
# against the checkpoint. Before it, both used NFE.
FASHION32_NFE = (12, 11, 17)
H100_FLOOR = {8: 1.0e-3, 16: 1.2e-3, 32: 1.5e-3}  # assumed (see the module docstring)
H100_AT_64 = {8: 0.041 / 18, 16: 0.131 / 13, 32: 22.7e-3}  # measured, seconds per evaluation at batch 64
MAX_BATCH = 64
LOADS = (0.25, 0.5, 0.8, 0.95, 1.2)


def limits_by_pixels(max_batch: int, cap: int = 512) -> dict[int, int]:
    """Per-resolution batch limits holding as many pixels as the cascade's ``max_batch`` at the output
    resolution (×4 per halving), capped: a stage call then costs roughly what a 32×32 call costs."""
    top = RESOLUTIONS[-1]
    return {r: min(cap, max_batch * (top // r) ** 2) for r in RESOLUTIONS}


def schedulers(cascade: Cascade, max_delay: float, overlap_slowdowns: tuple[float, ...] = ()) -> list[Any]:
    limits = limits_by_pixels(MAX_BATCH)
    same = {r: MAX_BATCH for r in RESOLUTIONS}
    return [
        CascadeScheduler(cascade, MAX_BATCH, max_delay),
        StagedScheduler(cascade, limits, max_delay, "later"),
        StagedScheduler(cascade, same, max_delay, "later"),
        StagedScheduler(cascade, limits, max_delay, "backlog"),
        StagedScheduler(cascade, limits, max_delay, "merge"),
        ContinuousScheduler(cascade, limits, max_delay, "later"),
        ContinuousScheduler(cascade, limits, max_delay, "oldest"),
        *overlapped(cascade, limits, max_delay, overlap_slowdowns),
    ]


def overlapped(cascade: Cascade, limits: dict[int, int], max_delay: float, slowdowns: tuple[float, ...]) -> list[Any]:
    """The overlapped staged scheduler at each contention slowdown: as ``--stage-overlap on`` with
    ``--overlap-backlog 0`` (the lower lane always runs beside the last) and with the served default
    (beside it only while 2 × the last stage's limit images wait unstarted)."""
    gate = 2 * limits[RESOLUTIONS[-1]]
    return [OverlapStagedScheduler(cascade, limits, max_delay, s, gate=g) for s in slowdowns for g in (None, gate)]


def saturated_only(costs: dict[str, Any], slowdowns: tuple[float, ...], target: float, out_dir: Path) -> None:
    """Saturated throughput (4096 single images waiting) of cascade, staged backlog and staged overlap at
    each slowdown, for both limit sets; and the largest slowdown that still gives ``target`` × cascade."""
    rows: list[dict[str, Any]] = []
    needed: list[dict[str, Any]] = []
    for cost_name, (cost, nfe) in costs.items():
        cascade = Cascade(RESOLUTIONS, nfe, cost)
        base = saturated_throughput(CascadeScheduler(cascade, MAX_BATCH, 0.0), 4096)
        rows.append({"cost": cost_name, "scheduler": f"cascade (max batch {MAX_BATCH})", "images_per_s": base,
                     "vs_cascade": 1.0})  # fmt: skip
        for limits in (limits_by_pixels(MAX_BATCH), {r: MAX_BATCH for r in RESOLUTIONS}):
            scheds = [StagedScheduler(cascade, limits, 0.0, "backlog")]
            scheds += overlapped(cascade, limits, 0.0, slowdowns)
            for sched in scheds:
                rate = saturated_throughput(sched, 4096)
                rows.append(
                    {"cost": cost_name, "scheduler": sched.name, "images_per_s": rate, "vs_cascade": rate / base}
                )
            s_max = slowdown_for(target, cascade, limits, MAX_BATCH)
            needed.append({"cost": cost_name, "limits": limits, "target": target, "largest_slowdown": s_max})
    lines = ["| cost | scheduler | saturated images/s (4096 waiting) | × cascade |", "|---|---|---|---|"]
    lines += [f"| {r['cost']} | {r['scheduler']} | {r['images_per_s']:.1f} | {r['vs_cascade']:.3f} |" for r in rows]
    lines += ["", f"| cost | limits | largest s for {target:g}× cascade |", "|---|---|---|"]
    for n in needed:
        limit_text = "/".join(str(n["limits"][r]) for r in RESOLUTIONS)
        s_max = "unreachable" if n["largest_slowdown"] is None else f"{n['largest_slowdown']:.3f}"
        lines.append(f"| {n['cost']} | {limit_text} | {s_max} |")
    print("\n".join(lines))
    out = {
        "schema": "lowdiff-scheduler-overlap-saturated/1",
        "command": " ".join(["python", "benchmarks/scheduler/run.py", *sys.argv[1:]]),
        "contention_model": "while both lanes run, each progresses at 1/s of its speed alone",
        "h100_model": {"floor_s": H100_FLOOR, "seconds_at_batch_64": H100_AT_64, "floors_assumed": True},
        "nfe_per_stage": {name: list(nfe) for name, (_, nfe) in costs.items()},
        "images": 4096,
        "rows": rows,
        "largest_slowdown_for_target": [{**n, "limits": {str(r): v for r, v in n["limits"].items()}} for n in needed],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overlap-saturated.json").write_text(json.dumps(out, indent=1) + "\n")
    print(out_dir / "overlap-saturated.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--requests", type=int, default=20000, help="requests per (workload, load) trace")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-delay-ms", type=float, default=10.0, help="the service's default --max-delay-ms")
    parser.add_argument("--cpu-table", type=Path, default=HERE / "cost-fashion32-cpu.json")
    parser.add_argument("--gpu-table", type=Path, default=None, help="a measured GPU cost table (replaces the model)")
    parser.add_argument("--overlap-slowdowns", default=None, help="comma list of s: add staged overlap at each")
    parser.add_argument("--saturated-only", action="store_true", help="only the saturated table (with overlap)")
    parser.add_argument("--target", type=float, default=1.15, help="--saturated-only: the ratio to reach")
    parser.add_argument("--plot-only", action="store_true", help="redraw scheduler.png from --out-dir's results.json")
    args = parser.parse_args()
    if args.plot_only:
        rows = json.loads((args.out_dir / "results.json").read_text())["rows"]
        print(args.out_dir / "scheduler.png" if plot(rows, args.out_dir / "scheduler.png") else "no matplotlib")
        return
    max_delay = args.max_delay_ms / 1000
    default_slowdowns = "1,1.25,1.5,1.75,2" if args.saturated_only else ""
    slowdowns = tuple(float(x) for x in (args.overlap_slowdowns or default_slowdowns).split(",") if x)

    costs: dict[str, tuple[Any, tuple[int, ...]]] = {}  # name → (cost per evaluation, NFE per stage)
    if args.gpu_table is not None:
        gpu = table_cost(read_cost_table(args.gpu_table), "cifar10-cond", "cudagraph:bf16")
        costs["cifar10-cond-gpu-table"] = (gpu, NFE)
    else:
        costs["cifar10-cond-h100-model"] = (LinearCost.through(H100_FLOOR, 64, H100_AT_64), NFE)
    costs["fashion32-cpu"] = (table_cost(read_cost_table(args.cpu_table), "fashion32", "torch:fp32"), FASHION32_NFE)
    if args.saturated_only:
        saturated_only(costs, slowdowns, args.target, args.out_dir)
        return
    mixes = {"1 image": [1], "1-16 images": list(range(1, 17))}

    rows: list[dict[str, Any]] = []
    saturated: list[dict[str, Any]] = []
    started = time.monotonic()
    for cost_name, (cost, nfe) in costs.items():
        cascade = Cascade(RESOLUTIONS, nfe, cost)
        capacity = cascade.capacity(MAX_BATCH)
        for sched in schedulers(cascade, max_delay, slowdowns):
            saturated.append(
                {"cost": cost_name, "scheduler": sched.name, "images_per_s": saturated_throughput(sched, 4096)}
            )
        for mix_name, sizes in mixes.items():
            mean_size = sum(sizes) / len(sizes)
            count = args.requests if sizes == [1] else max(1000, args.requests // 4)
            for load in LOADS:
                trace = poisson_trace(load * capacity / mean_size, count, sizes, args.seed)
                for sched in schedulers(cascade, max_delay, slowdowns):
                    stats = simulate(sched, trace)
                    rows.append(
                        {
                            "cost": cost_name,
                            "load": load,
                            "capacity_images_per_s": capacity,
                            **stats.__dict__,
                            "measured_requests": stats.requests,
                            "requests": mix_name,
                        }
                    )
    elapsed = time.monotonic() - started

    for row in rows:
        base = next(
            r
            for r in rows
            if r["cost"] == row["cost"] and r["requests"] == row["requests"] and r["load"] == row["load"]
            and r["scheduler"].startswith("cascade")
        )  # fmt: skip
        row["p50_vs_cascade"] = row["p50_s"] / base["p50_s"]
        row["p99_vs_cascade"] = row["p99_s"] / base["p99_s"]
        row["throughput_vs_cascade"] = row["throughput"] / base["throughput"]
    for row in saturated:
        base = next(r for r in saturated if r["cost"] == row["cost"] and r["scheduler"].startswith("cascade"))
        row["vs_cascade"] = row["images_per_s"] / base["images_per_s"]

    print(table(rows, saturated))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "schema": "lowdiff-scheduler-sweep/1",
        "command": " ".join(["python", "benchmarks/scheduler/run.py", *sys.argv[1:]]),
        "simulated_seconds_of_cpu": round(elapsed, 1),
        "max_batch": MAX_BATCH,
        "limits": limits_by_pixels(MAX_BATCH),
        "max_delay_s": max_delay,
        "h100_model": {"floor_s": H100_FLOOR, "seconds_at_batch_64": H100_AT_64, "floors_assumed": True},
        "nfe_per_stage": {name: list(nfe) for name, (_, nfe) in costs.items()},
        "loads": list(LOADS),
        "rows": rows,
        "saturated": saturated,
    }
    (args.out_dir / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    plotted = plot(rows, args.out_dir / "scheduler.png")
    print(args.out_dir / "results.json")
    print(args.out_dir / "scheduler.png" if plotted else "plot skipped: matplotlib is not installed")


def table(rows: list[dict[str, Any]], saturated: list[dict[str, Any]]) -> str:
    lines = [
        "| cost | requests | load | scheduler | p50 (s) | p99 (s) | images/s | p50 × | p99 × | thr × | images/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_call = " / ".join(f"{v:.1f}" for v in r["images_per_call"].values())
        lines.append(
            f"| {r['cost']} | {r['requests']} | {r['load']:.0%} | {r['scheduler']} | {r['p50_s']:.3f} | "
            f"{r['p99_s']:.3f} | {r['throughput']:.1f} | {r['p50_vs_cascade']:.2f} | {r['p99_vs_cascade']:.2f} | "
            f"{r['throughput_vs_cascade']:.3f} | {per_call} |"
        )
    lines += ["", "| cost | scheduler | saturated images/s (4096 waiting) | × cascade |", "|---|---|---|---|"]
    for s in saturated:
        lines.append(f"| {s['cost']} | {s['scheduler']} | {s['images_per_s']:.1f} | {s['vs_cascade']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = headless_pyplot()
    if plt is None:
        return False
    panels = sorted({(r["cost"], r["requests"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 3, figsize=(15, 3.6 * len(panels)), squeeze=False)
    names = list(dict.fromkeys(r["scheduler"] for r in rows))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: the sweep plots up to 13 schedulers
    for row_axes, (cost, mix) in zip(axes, panels):
        mine = [r for r in rows if r["cost"] == cost and r["requests"] == mix]
        for name in dict.fromkeys(r["scheduler"] for r in mine):
            pts = sorted((r["load"], r) for r in mine if r["scheduler"] == name)
            loads = [100 * load for load, _ in pts]
            style = {"color": colours[names.index(name) % len(colours)], "marker": "o", "label": name,
                     "linestyle": "--" if " gate " in name else "-"}  # fmt: skip
            for ax, key in zip(row_axes, ("p50_s", "p99_s", "throughput")):
                ax.plot(loads, [r[key] for _, r in pts], **style)
        for ax, title in zip(row_axes, ("p50 latency (s)", "p99 latency (s)", "throughput (images/s)")):
            ax.set_title(f"{cost}, {mix}: {title}", fontsize=9)
            ax.set_xlabel("offered load (% of cascade capacity)")
            if title != "throughput (images/s)":
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
