"""The service's own batchers in front of an engine that *waits* the cost model's time (no HTTP, no model),
or in front of a real engine (``--model``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scheduler/sleep_engine.py --out benchmarks/scheduler/sleep-engine.json
    # on a GPU: open-loop latency of cascade, staged and staged with overlap (held, always beside)
    python benchmarks/scheduler/sleep_engine.py --model cifar10-cond --engine cudagraph:bf16 --device cuda \
        --requests 1000 --loads 0.5,0.95,1.2 --out scheduler-latency.json

With ``--model`` (a built-in config name, random weights, or a checkpoint) the engine is real
(``lowdiff.engines.load_engine``, each stage's cudagraph buckets up to its staged limit, as the service
captures them); offered load is then a fraction of the whole-cascade batcher's saturated throughput as
measured first on a burst of ``--burst`` single images, and the overlapped rows are always run (their
contention is the machine's own).

Why: the simulator (run.py) models the schedulers; this runs the real ones — ``service/batcher.py``'s
``Batcher`` and ``service/staged.py``'s ``StagedBatcher``, their event loop, engine thread, fill delay and
queues — against an engine whose call of ``b`` images at resolution ``r`` sleeps ``nfe_r · t_r(b)``
seconds (the cifar10-cond H100 cost model of run.py). Sleeping costs no CPU, so the result does not
depend on this machine's load the way a real CPU engine's does. Requests (single images) are submitted
open-loop at Poisson times; latency is submit → the ticket's future resolving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import H100_AT_64, H100_FLOOR, NFE, RESOLUTIONS  # noqa: E402

from lowdiff.bench.simulate import Cascade, LinearCost, percentile  # noqa: E402
from lowdiff.service.batcher import Batcher  # noqa: E402
from lowdiff.service.metrics import ServiceMetrics  # noqa: E402
from lowdiff.service.staged import StagedBatcher, default_stage_limits  # noqa: E402


class SleepEngine:
    """Each call waits the cost model's time. ``slowdown`` s (overlap): while two calls are in progress at
    once (the two lanes of ``--stage-overlap``), each progresses at 1/s of its speed — the simulator's
    contention model, acted out in 1 ms slices, so the served batcher's lanes see it as they would see a
    GPU whose two streams slow each other down."""

    def __init__(self, cascade: Cascade, slowdown: float = 1.0):
        self.cascade = cascade
        self.slowdown = slowdown
        self._lock = threading.Lock()
        self._active = 0

    def _wait(self, seconds: float) -> None:
        with self._lock:
            self._active += 1
        try:
            left = seconds
            last = time.perf_counter()
            while left > 0:
                with self._lock:
                    rate = 1.0 / self.slowdown if self._active > 1 else 1.0
                time.sleep(min(0.001, left / rate))
                now = time.perf_counter()
                left -= (now - last) * rate
                last = now
        finally:
            with self._lock:
                self._active -= 1

    def generate(self, seeds: Sequence[int], class_labels: Any = None, on_stage: Any = None) -> torch.Tensor:
        self._wait(self.cascade.cascade_seconds(len(seeds)))
        return torch.zeros(len(seeds), 1, 2, 2, dtype=torch.uint8)

    def stage_noise(self, seeds: Sequence[int]) -> list[torch.Tensor]:
        return [torch.zeros(len(seeds), 1, 1, 1) for _ in RESOLUTIONS]

    def run_stage(
        self, index: int, noise: torch.Tensor, class_labels: Any, condition: Any, sigma_cond: Any, on_stage: Any = None
    ) -> tuple[torch.Tensor, float | None]:
        self._wait(self.cascade.stage_seconds(index, noise.shape[0]))
        last = index == len(RESOLUTIONS) - 1
        return noise.double(), (None if last else 1.0)

    def denoised_preview(
        self, index: int, x: torch.Tensor, class_labels: Any, condition: Any, sigma_cond: Any
    ) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1, 2, 2, dtype=torch.float64)


async def burst_throughput(make: Callable[[], Batcher], images: int, label: int | None = 0) -> float:
    """Images per second of ``images`` single-image requests submitted at once (a saturated batcher)."""
    batcher = make()
    batcher.start()
    start = time.monotonic()
    tickets = [batcher.submit([k], [label], deadline=start + 3600) for k in range(images)]
    for ticket in tickets:
        await ticket.future
    span = time.monotonic() - start
    await batcher.close()
    return images / span


async def run_one(make: Callable[[], Batcher], arrivals: list[float], label: int | None = 0) -> dict[str, float]:
    batcher = make()
    batcher.start()
    latencies: list[float] = []
    done = asyncio.Event()
    left = len(arrivals)
    start = time.monotonic()

    def finished(t0: float, _future: asyncio.Future) -> None:
        nonlocal left
        latencies.append(time.monotonic() - t0)
        left -= 1
        if left == 0:
            done.set()

    for k, at in enumerate(arrivals):
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        submitted = time.monotonic()
        ticket = batcher.submit([k], [label], deadline=submitted + 3600)
        ticket.future.add_done_callback(lambda f, t0=submitted: finished(t0, f))
    await done.wait()
    span = time.monotonic() - start
    await batcher.close()
    measured = latencies[len(latencies) // 10 :]  # completion order; the first tenth is warm-up
    return {
        "p50_s": percentile(measured, 50),
        "p99_s": percentile(measured, 99),
        "images_per_s": len(arrivals) / span,
    }


def real_engine(model_spec: str, engine_spec: str, device: str) -> tuple[Any, dict[int, int]]:
    """A real engine for ``--model``, warmed up, and the staged limits that size its cudagraph buckets
    (as the service captures them)."""
    from lowdiff.engines import load_engine
    from lowdiff.model import load_model

    model = load_model(model_spec) if Path(model_spec).exists() else load_model(config=model_spec)
    kind, _, precision = engine_spec.partition(":")
    limits = default_stage_limits(model.config.resolutions, 64)
    engine = load_engine(model, kind, device, precision or "fp32", stage_limits=limits, warmup=True)
    return engine, limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sleep-engine.json")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--loads", default="0.25,0.5,0.8,0.95,1.2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--overlap-slowdown",
        type=float,
        default=None,
        help="also run --stage-overlap on, held (default --overlap-backlog) and always beside (0), with the two "
        "lanes' calls slowed to 1/s of their speed while both run (the H200 run implies s ≈ 1.7)",
    )
    parser.add_argument("--model", default=None, help="a real engine: built-in config (random weights) or checkpoint")
    parser.add_argument("--engine", default="torch:fp32", help="with --model: KIND[:PRECISION]")
    parser.add_argument("--device", default="cpu", help="with --model")
    parser.add_argument("--burst", type=int, default=256, help="with --model: images of the capacity burst")
    args = parser.parse_args()
    engine: Any
    if args.model is None:
        cascade = Cascade(RESOLUTIONS, NFE, LinearCost.through(H100_FLOOR, 64, H100_AT_64))
        capacity = cascade.capacity(64)
        engine = SleepEngine(cascade, args.overlap_slowdown or 1.0)
        label: int | None = 0
        cost = "cifar10-cond H100 linear model of run.py (floors assumed)"
        limits = default_stage_limits(RESOLUTIONS, 64)
    else:
        engine, limits = real_engine(args.model, args.engine, args.device)
        label = 0 if engine.info().conditional else None
        cost = f"{args.model}, engine {args.engine} on {args.device} (real)"
    resolutions = tuple(limits)

    def staged(overlap: bool = False, backlog: int | None = None) -> StagedBatcher:
        executor = ThreadPoolExecutor(1)
        return StagedBatcher(
            engine, executor, ServiceMetrics(), resolutions, limits, 0.01, 100_000, overlap=overlap,
            overlap_backlog=backlog, device=args.device,
        )  # fmt: skip

    makers: dict[str, Callable[[], Batcher]] = {
        "cascade": lambda: Batcher(engine, ThreadPoolExecutor(1), ServiceMetrics(), 64, 0.01, 100_000),
        "staged": staged,
    }
    if args.model is not None:
        capacity = asyncio.run(burst_throughput(makers["cascade"], args.burst, label))
        print(f"cascade batcher, burst of {args.burst}: {capacity:.1f} images/s", file=sys.stderr, flush=True)
    if args.overlap_slowdown is not None or args.model is not None:
        makers["staged+overlap (held)"] = lambda: staged(True)
        makers["staged+overlap (always)"] = lambda: staged(True, 0)
    rows: list[dict[str, Any]] = []
    for load in (float(x) for x in args.loads.split(",")):
        rng = random.Random(args.seed)
        t, arrivals = 0.0, []
        for _ in range(args.requests):
            t += rng.expovariate(load * capacity)
            arrivals.append(t)
        for name, make in makers.items():
            stats = asyncio.run(run_one(make, arrivals, label))
            rows.append({"load": load, "scheduler": name, **stats})
            print(f"{load:.0%} {name}: {stats}", file=sys.stderr, flush=True)
    print("| load | scheduler | p50 (s) | p99 (s) | images/s | p50 × | p99 × | images/s × |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["load"] == row["load"] and r["scheduler"] == "cascade")
        row["p50_vs_cascade"] = row["p50_s"] / base["p50_s"]
        row["p99_vs_cascade"] = row["p99_s"] / base["p99_s"]
        row["throughput_vs_cascade"] = row["images_per_s"] / base["images_per_s"]
        print(
            f"| {row['load']:.0%} | {row['scheduler']} | {row['p50_s']:.3f} | {row['p99_s']:.3f} | "
            f"{row['images_per_s']:.1f} | {row['p50_vs_cascade']:.2f} | {row['p99_vs_cascade']:.2f} | "
            f"{row['throughput_vs_cascade']:.3f} |"
        )
    out = {
        "command": " ".join(["python", "benchmarks/scheduler/sleep_engine.py", *sys.argv[1:]]),
        "cost": cost,
        "overlap_slowdown": args.overlap_slowdown,
        "capacity_images_per_s": capacity,
        "limits": limits,
        "max_delay_s": 0.01,
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
