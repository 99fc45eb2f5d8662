"""The real service on the CPU, cascade vs staged scheduler: open-loop Poisson arrivals and a saturating burst.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scheduler/real_cpu.py --out benchmarks/scheduler/real-cpu.json

For each scheduler a ``lowdiff serve --threads 1`` (embedded fashion32 model, torch engine, max batch 64)
is started (both at once); then (1) a burst of ``--burst`` single-image requests sent at once: saturated throughput is
images / (last answer − first send); (2) ``--requests`` single-image requests with exponential gaps at
``--load`` × the cascade server's burst throughput (the same arrival trace for both schedulers):
p50/p99 latency. Each measurement runs cascade, staged, staged, cascade (the machine's other load
drifts; ratios are of the means). Prints a table, writes JSON. A CPU's cost per evaluation grows about in proportion to
batch size, so no scheduler is expected to gain here; the point is that staged does no harm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lowdiff.bench.machine import device_description, load_average  # noqa: E402
from lowdiff.bench.server import free_port, stop, wait_ready  # noqa: E402
from lowdiff.bench.simulate import percentile  # noqa: E402


async def one(client: httpx.AsyncClient, seed: int) -> float:
    start = time.monotonic()
    r = await client.post("/generate", json={"class_label": seed % 10, "seed": seed, "timeout_s": 3600})
    r.raise_for_status()
    return time.monotonic() - start


async def burst(url: str, count: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=count)) as client:
        start = time.monotonic()
        latencies = await asyncio.gather(*(one(client, 10_000 + k) for k in range(count)))
        span = time.monotonic() - start
    return {"images": count, "seconds": span, "images_per_s": count / span, "p50_s": percentile(latencies, 50)}


async def open_loop(url: str, gaps: list[float]) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=1000)) as client:
        tasks = []
        start = time.monotonic()
        due = 0.0
        for k, gap in enumerate(gaps):
            due += gap
            await asyncio.sleep(max(0.0, start + due - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, 20_000 + k)))
        latencies = await asyncio.gather(*tasks)
        span = time.monotonic() - start
    return {
        "requests": len(gaps),
        "offered_per_s": len(gaps) / due,
        "p50_s": percentile(latencies, 50),
        "p90_s": percentile(latencies, 90),
        "p99_s": percentile(latencies, 99),
        "mean_s": sum(latencies) / len(latencies),
        "images_per_s": len(gaps) / span,
    }


def serve(scheduler: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lowdiff", "serve", "--threads", "1", "--port", str(port), "--max-batch", "64"]
    cmd += ["--max-queue", "4096", "--scheduler", scheduler, "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log_path=log)
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "real-cpu.json")
    parser.add_argument("--burst", type=int, default=96)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/scheduler/real_cpu.py", *sys.argv[1:]]),
        "machine": device_description("cpu"),
        "load_average_start": load_average(),
        "order": "both servers up at once (an idle one costs ~nothing); each measurement A B B A (cascade, "
        "staged, staged, cascade) so that a drift in the machine's other load hits both alike",
        "runs": {"cascade": {"burst": [], "open_loop": []}, "staged": {"burst": [], "open_loop": []}},
    }
    order = ("cascade", "staged", "staged", "cascade")
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: serve(name, Path(tmp) / f"{name}.log") for name in ("cascade", "staged")}
        try:
            for name in order:
                sat = asyncio.run(burst(servers[name][1], args.burst))
                results["runs"][name]["burst"].append(sat)
                print(f"{name}: burst {sat['images_per_s']:.3f} images/s", file=sys.stderr, flush=True)
            cascade_rate = sum(r["images_per_s"] for r in results["runs"]["cascade"]["burst"]) / 2
            rate = args.load * cascade_rate
            rng = random.Random(args.seed)
            gaps = [rng.expovariate(rate) for _ in range(args.requests)]
            for name in order:
                loaded = asyncio.run(open_loop(servers[name][1], gaps))
                results["runs"][name]["open_loop"].append(loaded)
                print(
                    f"{name}: {args.load:.0%} load p50 {loaded['p50_s']:.2f} p99 {loaded['p99_s']:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            for proc, _ in servers.values():
                stop(proc)
    results["load_average_end"] = load_average()
    results["rate_per_s"] = rate

    def mean(name: str, phase: str, key: str) -> float:
        values = [r[key] for r in results["runs"][name][phase]]
        return sum(values) / len(values)

    summary = {
        name: {
            "burst_images_per_s": mean(name, "burst", "images_per_s"),
            "p50_s": mean(name, "open_loop", "p50_s"),
            "p99_s": mean(name, "open_loop", "p99_s"),
            "open_loop_images_per_s": mean(name, "open_loop", "images_per_s"),
        }
        for name in ("cascade", "staged")
    }
    results["summary"] = summary
    c, st = summary["cascade"], summary["staged"]
    results["staged_vs_cascade"] = {
        "saturated_throughput": st["burst_images_per_s"] / c["burst_images_per_s"],
        "p50": st["p50_s"] / c["p50_s"],
        "p99": st["p99_s"] / c["p99_s"],
    }
    print(f"| scheduler | burst images/s (2 runs) | p50 at {args.load:.0%} (s) | p99 (s) | images/s |")
    print("|---|---|---|---|---|")
    for name, r in summary.items():
        bursts = " / ".join(f"{b['images_per_s']:.3f}" for b in results["runs"][name]["burst"])
        p99s = " / ".join(f"{o['p99_s']:.2f}" for o in results["runs"][name]["open_loop"])
        print(f"| {name} | {bursts} | {r['p50_s']:.2f} | {p99s} | {r['open_loop_images_per_s']:.3f} |")
    ratio = results["staged_vs_cascade"]
    sat_ratio = ratio["saturated_throughput"]
    print(f"staged/cascade: saturated {sat_ratio:.3f}×, p50 {ratio['p50']:.3f}×, p99 {ratio['p99']:.3f}×")
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
