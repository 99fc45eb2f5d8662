"""The service's own capacity, without a GPU: the real app in front of an engine with a fixed batch time.

On a GPU a fashion32 batch of 64 takes ~0.1 s, so what the service adds per request (HTTP, validation,
batching, PNG encoding, waking the engine thread) decides throughput; on a CPU, batches take seconds and
hide it. This tool serves the real app (``lowdiff.service.app.create_app``) with a real
:class:`lowdiff.engines.CascadeEngine` whose stages only wait: every batch does the cascade's real host-side
work (per-seed starting noise, hand-off upsampling, uint8 conversion) and waits ``--batch-ms`` in all,
one sleep per stage with the GIL released, as an engine thread synchronising with a GPU does, whatever
the batch size. Ideal throughput is ``max_batch / batch time``; the closed-loop Locust users of the
saturation sweep (``loadtests/locust_sweep.py``, ``--processes`` worker processes, driven and parsed by
``loadtests/saturation.py``) show how close the service gets.

    python loadtests/service_overhead.py --batch-ms 100 --users 1,16,64,256 --processes 1

Writes ``service_overhead.json``, ``service_overhead.png`` (throughput and latency vs users, with the
ideal line), ``README.md`` (machine, command, table), Locust's CSV files and log into ``--out`` (default: a
new temporary folder, printed; ``benchmarks/service-overhead/`` changes only by ``--out
benchmarks/service-overhead``) and prints the table. Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
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

from saturation import (  # noqa: E402
    add_sweep_arguments,
    free_port,
    locust_description,
    locust_sweep,
    machine_description,
    make_out_dir,
    write_plot,
)


def serve(args: argparse.Namespace) -> None:
    """The server process: the real app with a simulated engine."""
    import torch
    import uvicorn

    from lowdiff.engines import CascadeEngine
    from lowdiff.model import LowDiffModel
    from lowdiff.schedule import StageSchedule
    from lowdiff.service.app import create_app
    from lowdiff.service.settings import ServeSettings

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
    add_sweep_arguments(p, "service-overhead", users="1,16,64,256", ramp_s=3.0, window_s=10.0)
    p.add_argument("--note", default="", help="free text for the README (e.g. other load on the machine)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_ms <= 0 or args.max_batch < 1:
        p.error("--batch-ms and --max-batch must be positive")
    if args.serve:
        serve(args)
        return 0

    make_out_dir(args, "service-overhead")
    machine = machine_description()
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
        rows, whole_run = locust_sweep(url, args)
        for row in rows:
            row["share_of_ideal"] = row["images_per_s"] / ideal
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    report = {
        "command": "python loadtests/service_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch_ms": args.batch_ms,
        "max_batch": args.max_batch,
        "ideal_images_per_s": ideal,
        "cpus": os.cpu_count(),
        "machine": machine,
        "load_average_at_end": os.getloadavg(),
        "note": args.note,
        "locust": locust_description(args),
        "whole_run": whole_run,
        "rows": rows,
    }
    (args.out_dir / "service_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"service with a simulated {args.batch_ms:g} ms/batch engine, max batch {args.max_batch}"
    write_plot(rows, ideal, args.out_dir / "service_overhead.png", title, reference="ideal",
               images_per_request=args.images_per_request)  # fmt: skip
    table = results_table(rows)
    print(f"\nideal {ideal:.0f} images/s (max batch {args.max_batch} every {args.batch_ms:g} ms)")
    print("\n".join(table))
    write_readme(report, table, args.out_dir / "README.md")
    print(f"results: {args.out_dir}")
    return 0


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| users | images/s | share of ideal | server images/s | mean batch | engine busy | p50 (s) | p99 (s) "
        "| requests in window | failures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['users']} | {r['images_per_s']:.0f} | {100 * r['share_of_ideal']:.0f} % | "
            f"{r['server_images_per_s']:.0f} | {r['mean_batch_size']:.1f} | {100 * r['engine_busy_fraction']:.0f} % | "
            f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['requests_in_window']} | {r['failures']} |"
        )
    return lines


def write_readme(report: dict[str, Any], table: list[str], path: Path) -> None:
    m, loc = report["machine"], report["locust"]
    lines = [
        "# Service overhead: the real service in front of a simulated engine",
        "",
        f"Engine: `CascadeEngine` with stages that wait {report['batch_ms']:g} ms per batch in all (any size), "
        f"max batch {report['max_batch']}: ideal **{report['ideal_images_per_s']:.0f} images/s**.",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, {m['os']}; load average at "
        f"start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}. Client and server share its cores.",
        f"Load: Locust {loc['version']} (`{loc['locustfile']}`, closed-loop {loc['user_class']}, "
        f"{loc['images_per_request']} image(s) per request), `--processes {loc['processes']}`; per level "
        f"{loc['ramp_s']:g} s unmeasured, then a {loc['window_s']:g} s window. Locust's processes used "
        f"{report['whole_run']['locust_cpu_s']:.1f} CPU-seconds for {report['whole_run']['requests']} requests "
        f"({report['whole_run']['locust_cpu_ms_per_request']:.2f} ms each).",
    ]
    if report.get("note"):
        lines.append(f"Note: {report['note']}")
    lines += [
        "",
        f"Command: `{report['command']}`",
        "",
        *table,
        "",
        "images/s: Locust's answered requests per second in the window × images per request; p50/p99: "
        "Locust's percentiles of the window's requests (10 ms steps above 100 ms). Server images/s: the "
        "server's image counter between the first and the last batch that end in the window. Engine busy: "
        "the share of that span in which the engine ran a batch (simulated wait plus the cascade's host work); "
        "1 − it is what the service cost.",
        "",
        "![throughput and latency vs users](service_overhead.png)",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
