"""Saturation sweep: service throughput and latency vs concurrent users, against `lowdiff bench`.

1. ``lowdiff bench`` measures engine-only throughput at batch ``--max-batch`` (same model, engine,
   threads), with no server running.
2. ``lowdiff serve`` starts on 127.0.0.1 with ``--max-batch``; Locust (``loadtests/locust_sweep.py``, headless,
   ``--processes`` worker processes) steps through the user counts of ``--users``: closed-loop users (each
   sends its next request of ``--images-per-request`` images when the last one is answered), per level
   ``--ramp-s`` unmeasured, then a ``--window-s`` window. Throughput: Locust's answered requests/s in the
   window × images per request; latency p50/p99: Locust's percentiles of the window's requests. The
   server's metrics, polled every 0.2 s, add the mean batch size, the engine's busy share and the
   server's own images/s (between the first and the last batch that end inside the window). Responses come
   a batch at a time, so a window should hold many batches (on CPU, batches take seconds: ``--window-s 60``).
3. Writes ``saturation.csv``, ``saturation.png`` (throughput and p50/p99 vs users), ``summary.json``,
   ``README.md`` (machine, commands, table) and Locust's CSV files and log into ``--out`` (default: a new
   temporary folder, printed; the committed results in ``benchmarks/serve-saturation/`` change only by
   ``--out benchmarks/serve-saturation``).

Saturated service throughput is the throughput at the largest user count (there the queue never
empties and every batch is full, as in the bench); the target is ≥ 90 % of bench throughput on
CPU with the default model. The bench runs before and after the sweep and the reference is their
mean, so that drift in the machine's other load shows up instead of skewing the ratio.

    python loadtests/saturation.py --max-batch 16 --threads 1 --users 1,16,32 --window-s 60
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from lowdiff.bench.report import results_dir
from lowdiff.bench.server import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locust_sweep.py"
# Locust worker processes: one per 4 CPUs, 1 to 4. The load generator shares the machine with the server
# here; on 2 cores more workers only took CPU from the server (benchmarks/service-overhead/README.md).
DEFAULT_PROCESSES = max(1, min(4, (os.cpu_count() or 1) // 4))


def model_flags(args: argparse.Namespace) -> list[str]:
    if args.checkpoint:
        return ["--checkpoint", str(args.checkpoint)]
    if args.config:
        return ["--config", args.config]
    return []  # the embedded default model


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The runtime flags shared by the bench and the server, so both measure the same engine."""
    return ["--engine", args.engine, "--device", args.device, "--precision", args.precision]


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def run_bench(args: argparse.Namespace, name: str) -> dict[str, Any]:
    out = args.out_dir / f"{name}.json"
    from lowdiff.model import default_checkpoint_path

    flags = model_flags(args) or ["--checkpoint", str(default_checkpoint_path())]  # bench names its model
    cmd = [sys.executable, "-m", "lowdiff", "bench", *flags, *engine_flags(args),
           "--batch", str(args.max_batch), "--runs", str(args.bench_runs), "--json", str(out)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ lowdiff", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return {"command": "lowdiff " + " ".join(cmd[3:]), **report["results"][0]}


def start_server(args: argparse.Namespace, port: int) -> tuple[subprocess.Popen[bytes], list[str]]:
    cmd = [sys.executable, "-m", "lowdiff", "serve", *model_flags(args), *engine_flags(args),
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
           "--max-queue", "4096", "--timeout-s", "600", "--warmup-batch", str(args.max_batch),
           "--log-level", "warning"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ lowdiff", " ".join(cmd[3:]), flush=True)
    log = open(args.out_dir / "serve.log", "wb")  # stays open as long as the server runs
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), cmd


def scrape(url: str, client: httpx.Client | None = None) -> dict[str, float]:
    """Each sample name's value, summed over its label sets (so labelled histograms add up)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (client or httpx).get(url + "/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "le" not in sample.labels:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


class MetricsPoller:
    """The server's counters, scraped every ``interval`` s in a thread while Locust runs: the server-side
    columns of each measured window (mean batch size, engine busy share, the server's own images/s)."""

    def __init__(self, url: str, interval: float = 0.2):
        self.url, self.interval = url, interval
        self.samples: list[tuple[float, dict[str, float]]] = []  # (time.time() after the scrape, values)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-poller", daemon=True)

    def __enter__(self) -> MetricsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    values = scrape(self.url, client)
                    self.samples.append((time.time(), values))
                except httpx.HTTPError:
                    pass  # a missed sample only widens the gap between two others
                self._stop.wait(self.interval)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Server-side stats of [t0, t1]. Images/s and engine busy are timed between the first and the last
        batch that end inside the window (a window cut mid-batch would be off by up to a whole batch)."""
        inside = [(t, v) for t, v in self.samples if t0 <= t <= t1]
        nan = float("nan")
        if len(inside) < 2:
            return {"server_images_per_s": nan, "engine_busy_fraction": nan, "mean_batch_size": nan,
                    "batches_timed": 0}  # fmt: skip
        first, last = inside[0][1], inside[-1][1]
        batches = last["lowdiff_batch_size_images_count"] - first["lowdiff_batch_size_images_count"]
        images = last["lowdiff_batch_size_images_sum"] - first["lowdiff_batch_size_images_sum"]
        # (when the image counter was seen to move, its value, the engine's total batch time then); the
        # first sample is the counter's value at the window's start, not a batch end
        moves, previous = [], first["lowdiff_images_generated_total"]
        for t, v in inside[1:]:
            if v["lowdiff_images_generated_total"] != previous:
                previous = v["lowdiff_images_generated_total"]
                moves.append((t, previous, v["lowdiff_batch_duration_seconds_sum"]))
        if len(moves) >= 2:
            (ta, na, ea), (tb, nb, eb) = moves[0], moves[-1]
        else:  # fewer than two batches ended inside the window: the plain span
            (ta, va), (tb, vb) = inside[0], inside[-1]
            na, ea = va["lowdiff_images_generated_total"], va["lowdiff_batch_duration_seconds_sum"]
            nb, eb = vb["lowdiff_images_generated_total"], vb["lowdiff_batch_duration_seconds_sum"]
        return {
            "server_images_per_s": (nb - na) / (tb - ta),
            # Share of wall time the engine spent running batches: 1 − this is what the service adds
            # (gaps between batches), measured in the same seconds, so immune to the machine's drift.
            "engine_busy_fraction": (eb - ea) / (tb - ta),
            "mean_batch_size": images / batches if batches else nan,
            "batches_timed": max(len(moves) - 1, 0),
        }


def add_sweep_arguments(p: argparse.ArgumentParser, name: str, users: str, ramp_s: float, window_s: float) -> None:
    """The Locust sweep's flags, shared by saturation.py and service_overhead.py."""
    p.add_argument("--users", default=users, help="comma-separated concurrent-user levels")
    p.add_argument("--ramp-s", type=float, default=ramp_s, help="unmeasured start of each level (>= 3)")
    p.add_argument("--window-s", type=float, default=window_s, help="measured part of each level")
    p.add_argument("--processes", type=int, default=DEFAULT_PROCESSES,
                   help="Locust worker processes (locust --processes; 0: one process, no workers; -1: one per "
                        "CPU); default: one per 4 CPUs, 1 to 4, here %(default)s")  # fmt: skip
    p.add_argument("--images-per-request", type=int, default=1, help="num_images of each request")
    p.add_argument("--out", "--out-dir", dest="out_dir", type=Path, default=None,
                   help=f"result folder (default: a new lowdiff-{name}-* folder in the system temp dir)")  # fmt: skip


def make_out_dir(args: argparse.Namespace, name: str) -> Path:
    args.out_dir = results_dir(args.out_dir, name)
    return args.out_dir


def locust_description(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    return {"version": version("locust"), "processes": args.processes, "user_class": "SweepUser (FastHttpUser)",
            "locustfile": "loadtests/locust_sweep.py", "images_per_request": args.images_per_request,
            "ramp_s": args.ramp_s, "window_s": args.window_s}  # fmt: skip


def locust_sweep(url: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs ``loadtests/locust_sweep.py`` headless (one level per ``args.users``) against ``url`` while
    polling the server's metrics; one row per level, and whole-run figures (requests and failures from
    Locust's ``Aggregated`` stats row, the CPU time Locust used).

    Locust's files land in ``args.out_dir``: ``locust_levels.csv`` (the windows), ``locust_stats.csv``,
    ``locust_stats_history.csv``, ``locust_failures.csv``, ``locust_exceptions.csv``, ``locust.log``."""
    users = [int(u) for u in str(args.users).split(",")]
    prefix = args.out_dir / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "--only-summary",
           "--sweep-users", ",".join(map(str, users)), "--sweep-ramp-s", str(args.ramp_s),
           "--sweep-window-s", str(args.window_s), "--images-per-request", str(args.images_per_request),
           "--csv", str(prefix), "--exit-code-on-error", "0"]  # fmt: skip
    if args.processes:
        cmd += ["--processes", str(args.processes)]
    print("$ locust", " ".join(cmd[4:]), flush=True)
    limit = len(users) * (args.ramp_s + args.window_s + 10) + 300
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with MetricsPoller(url) as poller, open(args.out_dir / "locust.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # Locust and its workers, all waited for by now
    levels: list[dict[str, str]] = []
    if Path(f"{prefix}_levels.csv").is_file():
        with open(f"{prefix}_levels.csv") as f:
            levels = list(csv.DictReader(f))
    if rc != 0 or len(levels) != len(users):
        raise SystemExit(f"locust exited with {rc} after {len(levels)} of {len(users)} levels; see "
                         f"{args.out_dir / 'locust.log'}")  # fmt: skip
    with open(f"{prefix}_stats.csv") as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    cpu_s = sum(getattr(cpu_after, k) - getattr(cpu_before, k) for k in ("ru_utime", "ru_stime"))
    whole_run = {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        # CPU that the load generator took from the machine (the server shares it on one host)
        "locust_cpu_s": round(cpu_s, 2),
        "locust_cpu_ms_per_request": round(1000 * cpu_s / max(int(total["Request Count"]), 1), 3),
    }

    def seconds(ms: str) -> float:
        return float(ms) / 1000 if ms != "N/A" else float("nan")

    rows = []
    for level in levels:
        ok_per_s = float(level["Requests/s"]) - float(level["Failures/s"])
        rows.append({
            "users": int(level["User Count"]),
            "images_per_s": ok_per_s * int(level["Images/Request"]),  # Locust: answered requests × images
            "requests_per_s": float(level["Requests/s"]),
            "p50_s": seconds(level["50%"]),
            "p99_s": seconds(level["99%"]),
            "requests_in_window": int(level["Request Count"]),
            "failures": int(level["Failure Count"]),
            "window_s": int(level["Window Seconds"]),
            **poller.window(float(level["Window Start"]), float(level["Window End"])),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"whole_run": whole_run}), flush=True)
    if whole_run["failures"]:
        print(f"warning: {whole_run['failures']} failed requests in the whole run; see locust_failures.csv")
    return rows, whole_run


def write_plot(
    rows: list[dict[str, Any]],
    bench_ips: float,
    path: Path,
    title: str,
    reference: str = "lowdiff bench",
    images_per_request: int = 1,
) -> None:
    from lowdiff.bench.plots import headless_pyplot

    plt = headless_pyplot()
    if plt is None:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return
    users = [r["users"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(users, [r["images_per_s"] for r in rows], "o-", label="service")
    ax1.axhline(bench_ips, color="k", linestyle="--", label=f"{reference} {bench_ips:.2f}")
    ax1.axhline(0.9 * bench_ips, color="grey", linestyle=":", label=f"90 % of {reference}")
    ax1.set_xscale("log", base=2)
    per_request = "1 image" if images_per_request == 1 else f"{images_per_request} images"
    ax1.set_xlabel(f"concurrent users ({per_request} per request)")
    ax1.set_ylabel("images / s")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax2.plot(users, [r["p50_s"] for r in rows], "o-", label="p50")
    ax2.plot(users, [r["p99_s"] for r in rows], "s-", label="p99")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrent users")
    ax2.set_ylabel("request latency (s)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme(summary: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    m, b = summary["machine"], summary["bench"]
    lines = [
        "# Service saturation sweep",
        "",
        f"Model: {summary['model']}; engine {b['engine']}, {b['threads']} thread(s), max batch {summary['max_batch']},"
        f" max delay {summary['max_delay_ms']} ms.",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, {m['os']}, "
        f"torch {m['torch']}; load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}.",
    ]
    loc = summary["locust"]
    lines.append(
        f"Load: Locust {loc['version']} (`{loc['locustfile']}`, closed-loop {loc['user_class']}, "
        f"{loc['images_per_request']} image(s) per request), `--processes {loc['processes']}`, on the same machine; "
        f"per level {loc['ramp_s']:g} s unmeasured, then a {loc['window_s']:g} s window."
    )
    if summary.get("note"):
        lines.append(f"Note: {summary['note']}")
    lines += [
        "",
        f"Engine only (`{b['command']}`, before and after the sweep): {b['throughput_img_s_before']:.2f} and "
        f"{b['throughput_img_s_after']:.2f} images/s at batch {b['batch']}, mean "
        f"**{b['throughput_img_s']:.2f} images/s**.",
        f"Saturated service throughput ({summary['saturated_at_users']} users, mean batch "
        f"{summary['saturated_mean_batch_size']:.1f}): **{summary['saturated_images_per_s']:.2f} images/s** "
        f"= **{100 * summary['share_of_bench']:.1f} %** of bench (target ≥ 90 %); the engine was busy "
        f"**{100 * summary['saturated_engine_busy_fraction']:.1f} %** of that time. Peak of the sweep: "
        f"{summary['peak_images_per_s']:.2f} images/s at {summary['peak_at_users']} users.",
        "",
        "images/s: Locust's answered requests per second in the window × images per request; p50/p99: "
        "Locust's percentiles of the window's requests. Server images/s: the server's image counter between "
        "the first and the last batch that end in the window (a cross-check of the client's count). Responses "
        "come a batch at a time, so the client's count in a window is off by up to one batch: with batches "
        "of seconds, use windows of 20 batches or more.",
        "",
        "Engine busy: the share of the timed span in which the engine was running a batch (from the "
        "server's lowdiff_batch_duration_seconds), measured in the same seconds as the throughput and so "
        "immune to the other load's drift; 1 − it is the time the service itself cost.",
        "",
        "With as many closed-loop users as the batch size, the users split into groups that alternate "
        "(each group's requests return while the other's batch runs), so batches are partly filled; "
        "full batches need about twice as many users as the batch size.",
        "",
        f"Command: `{summary['command']}`",
        "",
        "| users | images/s | share of bench | server images/s | engine busy | p50 (s) | p99 (s) | mean batch "
        "| batches timed | failures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['users']} | {r['images_per_s']:.2f} | {100 * r['images_per_s'] / b['throughput_img_s']:.1f} % | "
            f"{r['server_images_per_s']:.2f} | {100 * r['engine_busy_fraction']:.1f} % | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['mean_batch_size']:.1f} | {r['batches_timed']} | "
            f"{r['failures']} |"
        )
    lines += ["", "![throughput and latency vs users](saturation.png)", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--config", default=None, help="built-in config with random weights (same speed)")
    p.add_argument("--engine", default="torch")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bench and server alike)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (CUDA); bench and server alike")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    add_sweep_arguments(p, "serve-saturation", users="1,2,4,8,16,32", ramp_s=10.0, window_s=60.0)
    p.add_argument("--bench-runs", type=int, default=5)
    p.add_argument("--note", default="", help="free text for the README (e.g. other load on the machine)")
    args = p.parse_args(argv)
    make_out_dir(args, "serve-saturation")
    machine = machine_description()
    before = run_bench(args, "bench-before")
    print(f"bench before: {before['throughput_img_s']:.2f} images/s at batch {args.max_batch}", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, serve_cmd = start_server(args, port)
    try:
        wait_ready(url, proc)
        info = httpx.get(url + "/v1/models").json()
        rows, whole_run = locust_sweep(url, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    after = run_bench(args, "bench-after")
    print(f"bench after: {after['throughput_img_s']:.2f} images/s", flush=True)
    bench = {k: v for k, v in before.items() if k not in ("latency_s_all", "throughput_img_s")}
    bench["throughput_img_s"] = (before["throughput_img_s"] + after["throughput_img_s"]) / 2
    bench["throughput_img_s_before"] = before["throughput_img_s"]
    bench["throughput_img_s_after"] = after["throughput_img_s"]
    for row in rows:
        row["share_of_bench"] = row["images_per_s"] / bench["throughput_img_s"]

    with open(args.out_dir / "saturation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    saturated = max(rows, key=lambda r: r["users"])
    peak = max(rows, key=lambda r: r["images_per_s"])
    summary = {
        "model": info.get("model"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "max_batch": args.max_batch,
        "max_delay_ms": args.max_delay_ms,
        "machine": machine,
        "note": args.note,
        "bench": bench,
        "serve_command": "lowdiff " + " ".join(serve_cmd[3:]),
        "command": "python loadtests/saturation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "locust": locust_description(args),
        "whole_run": whole_run,
        "saturated_images_per_s": saturated["images_per_s"],
        "saturated_at_users": saturated["users"],
        "saturated_mean_batch_size": saturated["mean_batch_size"],
        "saturated_engine_busy_fraction": saturated["engine_busy_fraction"],
        "share_of_bench": saturated["share_of_bench"],
        "peak_images_per_s": peak["images_per_s"],
        "peak_at_users": peak["users"],
        "rows": rows,
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{info.get('model')} on {info.get('engine')}, max batch {args.max_batch}: service vs lowdiff bench"
    write_plot(rows, bench["throughput_img_s"], args.out_dir / "saturation.png", title,
               images_per_request=args.images_per_request)  # fmt: skip
    write_readme(summary, rows, args.out_dir / "README.md")
    print(f"saturated: {saturated['images_per_s']:.2f} images/s = {100 * summary['share_of_bench']:.1f} % of bench")
    print(f"results: {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
