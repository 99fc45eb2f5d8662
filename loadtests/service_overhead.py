"""The service's own capacity, without a GPU: the real app in front of an engine with a fixed batch time.

On a GPU a fashion32 batch of 64 takes ~0.1 s, so what the service adds per request (HTTP, validation,
batching, PNG encoding, waking the engine thread) decides throughput; on a CPU, batches take seconds and
hide it. This tool serves the real app (``service.app.create_app``) with a real
:class:`engines.CascadeEngine` whose stages only wait: every batch does the cascade's real host-side
work (per-seed starting noise, hand-off upsampling, uint8 conversion) and waits ``--batch-ms`` in all,
one sleep per stage with the GIL released, as an engine thread synchronising with a GPU does, whatever
the batch size. Ideal throughput is ``max_batch / batch time``; the closed-loop users of
``loadtests/saturation.py`` show how close the service gets.

    python loadtests/service_overhead.py --batch-ms 100 --users 16,64,256 --out-dir runs/service-overhead

Writes ``service_overhead.json`` and ``service_overhead.png`` (throughput and latency vs users, with the
ideal line) into ``--out-dir`` and prints a table. Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from saturation import free_port, sweep_point, write_plot  # noqa: E402


def serve(args: argparse.Namespace) -> None:
    """The server process: the real app with a simulated engine."""
    import torch
    import uvicorn

    from engines import CascadeEngine
    from lowdiff.model import LowDiffModel
    from lowdiff.schedule import StageSchedule
    from service.app import create_app
    from service.settings import ServeSettings

    torch.set_num_threads(1)
    model = LowDiffModel.load(None)
    wait_s = args.batch_ms / 1000 / len(model.config.schedule.stages)

    class SimulatedStage:
        """Waits instead of computing (GIL released, like an engine thread syncing with a GPU once per
        stage) and hands its noise on as the stage's result."""

        def run_stage(
            self,
            stage: StageSchedule,
            noise: torch.Tensor,
            class_labels: torch.Tensor | None,
            condition: torch.Tensor | None,
            sigma_cond: float | None,
        ) -> torch.Tensor:
            time.sleep(wait_s)
            return noise.clip(-1, 1)

    # The real engine front (run_cascade's host work: per-seed noise, hand-off upsampling, uint8) with
    # simulated stages, so the service sees exactly what it sees in front of a GPU engine.
    runners = {r: SimulatedStage() for r in model.config.resolutions}
    engine = CascadeEngine(model, runners, "simulated", "none", "fp32")
    settings = ServeSettings(
        port=args.port, max_batch=args.max_batch, max_queue=4096, timeout_s=600, log_level="warning"
    )
    app = create_app(settings, model=model, engine=engine)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-ms", type=float, default=100.0, help="simulated engine time per batch, any size")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--users", default="16,64,256")
    p.add_argument("--ramp-s", type=float, default=3.0)
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "service-overhead")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_ms <= 0 or args.max_batch < 1:
        p.error("--batch-ms and --max-batch must be positive")
    if args.serve:
        serve(args)
        return 0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, __file__, "--serve", "--port", str(port), "--batch-ms", str(args.batch_ms),
           "--max-batch", str(args.max_batch)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ideal = args.max_batch / (args.batch_ms / 1000)
    rows: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("simulated server did not become ready")
            time.sleep(0.25)
        info = httpx.get(url + "/v1/models").json()
        for users in [int(u) for u in args.users.split(",")]:
            row = asyncio.run(sweep_point(url, users, args.ramp_s, args.window_s, info))
            row["share_of_ideal"] = row["images_per_s"] / ideal
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    report = {
        "command": "python loadtests/service_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch_ms": args.batch_ms,
        "max_batch": args.max_batch,
        "ideal_images_per_s": ideal,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    (args.out_dir / "service_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"service with a simulated {args.batch_ms:g} ms/batch engine, max batch {args.max_batch}"
    write_plot(rows, ideal, args.out_dir / "service_overhead.png", title, reference="ideal")
    print(f"\nideal {ideal:.0f} images/s (max batch {args.max_batch} every {args.batch_ms:g} ms)")
    print("| users | images/s | share of ideal | mean batch | engine busy | p50 (s) | p99 (s) | failures |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['users']} | {r['images_per_s']:.0f} | {100 * r['share_of_ideal']:.0f} % | "
            f"{r['mean_batch_size']:.1f} | {100 * r['engine_busy_fraction']:.0f} % | {r['p50_s']:.3f} | "
            f"{r['p99_s']:.3f} | {r['failures']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
