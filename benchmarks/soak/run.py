#!/usr/bin/env python
"""Soak test: does a real ``lowdiff serve`` keep its memory flat over thousands of requests?

Starts ``lowdiff serve --threads 1`` (the embedded, trained fashion32 model, torch engine, CPU) on
loopback, sends ``--requests`` requests from ``--clients`` concurrent clients — 1–4 images each, most
answered as JSON, some as PNG, a few malformed or out of range — and samples the server's resident
set (VmRSS in ``/proc/<pid>/status``) every ``--sample-every`` requests. Writes ``LABEL.json`` (the
samples, the answers by status, latency, the settings) and ``LABEL.png`` (RSS against requests) in
``--out-dir``; ``--summarize`` prints the Markdown table of every ``*.json`` there and draws them
together in ``rss.png``.

Diagnostic variants: ``--env MALLOC_ARENA_MAX=2`` (any variable for the server), ``--probe``
(the server runs under ``serve_probe.py``: tracemalloc on, a probe of the Python heap at each
milestone, and glibc ``malloc_trim(0)`` after the last one, to see what of the resident set is live).

``--pause-pid PID`` stops that process (``SIGSTOP``) for the duration of the soak and always resumes
it (``SIGCONT``) afterwards, on errors and on SIGINT/SIGTERM/SIGHUP too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from lowdiff.bench.report import results_dir
from lowdiff.bench.server import free_port, stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MILESTONES = (1000, 2000, 3000)

# A few bad requests of each kind the service refuses (400 / 422).
BAD_BODIES: tuple[tuple[str, bytes], ...] = (
    ("malformed JSON", b'{"class_label": 1'),
    ("class out of range", b'{"class_label": 99, "seed": 1}'),
    ("unknown field", b'{"class_label": 1, "colour": "blue"}'),
    ("invalid UTF-8", b'{"class_label": "\xff"}'),
    ("num_images 0", b'{"class_label": 1, "num_images": 0}'),
)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def plan(count: int, seed: int) -> list[dict[str, Any]]:
    """The requests, in order: ~62 % JSON, ~35 % PNG, ~3 % bad; 1–4 images each."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        roll = rng.random()
        if roll < 0.03:
            name, body = BAD_BODIES[i % len(BAD_BODIES)]
            out.append({"kind": "bad", "what": name, "body": body, "accept": "application/json"})
            continue
        request = {"class_label": rng.randrange(10), "seed": rng.randrange(2**31), "num_images": rng.randint(1, 4)}
        accept = "image/png" if roll < 0.38 else "application/json"
        out.append(
            {"kind": "png" if accept == "image/png" else "json", "body": json.dumps(request).encode(), "accept": accept}
        )
    return out


class Pause:
    """SIGSTOP some processes for a while; SIGCONT them on exit, however it happens."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.stopped: list[int] = []

    def __enter__(self) -> Pause:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
            self.stopped.append(pid)
            print(f"paused {pid}", flush=True)
        return self

    def _on_signal(self, sig: int, _frame: object) -> None:
        raise SystemExit(f"stopped by signal {sig}")

    def __exit__(self, *exc: object) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
                print(f"resumed {pid}", flush=True)
            except ProcessLookupError:
                pass
        self.stopped = []


def start_server(args: argparse.Namespace, port: int, workdir: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOWDIFF_API_KEY", None)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    flags = ["--threads", "1", "--port", str(port)]
    if args.checkpoint is not None:
        flags += ["--checkpoint", str(args.checkpoint)]
    if args.probe:
        env.update(
            SOAK_TRACEMALLOC="1", SOAK_PROBE_OUT=str(workdir / "probe.jsonl"), SOAK_TRIM_FLAG=str(workdir / "trim")
        )
        command = [sys.executable, str(HERE / "serve_probe.py"), *flags]
    else:
        command = [sys.executable, "-m", "lowdiff", "serve", *flags]
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def probe(proc: subprocess.Popen, workdir: Path, expected: int, trim: bool = False) -> None:
    """Ask serve_probe.py for a probe line and wait for it."""
    if trim:
        (workdir / "trim").touch()
    proc.send_signal(signal.SIGUSR1)
    path = workdir / "probe.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= expected:
            return
        time.sleep(0.1)
    raise RuntimeError("no probe line")


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    requests = plan(args.requests, args.seed)
    proc, log_path = start_server(args, port, workdir)
    samples: list[dict[str, float]] = []
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    done = 0
    next_index = 0
    probes = 0
    probe_at = {n for n in (args.warmup, *MILESTONES, args.requests) if n <= args.requests} if args.probe else set()
    try:
        wait_ready(url, proc, 300, log_path)
        started = time.monotonic()
        samples.append({"requests": 0, "rss_mb": rss_mb(proc.pid), "t_s": 0.0})
        if args.probe:
            probes += 1
            probe(proc, workdir, probes)

        def client_loop() -> None:
            nonlocal done, next_index, probes
            with httpx.Client(base_url=url, timeout=600) as client:
                while True:
                    with lock:
                        if next_index >= len(requests):
                            return
                        request = requests[next_index]
                        next_index += 1
                    t0 = time.perf_counter()
                    r = client.post(
                        "/generate",
                        content=request["body"],
                        headers={"Content-Type": "application/json", "Accept": request["accept"]},
                    )
                    elapsed = time.perf_counter() - t0
                    r.read()
                    with lock:
                        done += 1
                        statuses[f"{request['kind']} {r.status_code}"] += 1
                        if request["kind"] != "bad":
                            latencies.append(elapsed)
                        if done % args.sample_every == 0 or done in probe_at:
                            samples.append(
                                {"requests": done, "rss_mb": rss_mb(proc.pid), "t_s": time.monotonic() - started}
                            )
                            if done % 500 == 0:
                                print(f"{done} requests, RSS {samples[-1]['rss_mb']:.1f} MB", flush=True)
                        if done in probe_at:
                            probes += 1
                            probe(proc, workdir, probes, trim=done == args.requests)

        with ThreadPoolExecutor(args.clients) as pool:
            for future in [pool.submit(client_loop) for _ in range(args.clients)]:
                future.result()
        wall = time.monotonic() - started
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        exit_code = stop(proc, 120)
    probe_lines = (
        [json.loads(line) for line in (workdir / "probe.jsonl").read_text().splitlines()] if args.probe else []
    )
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "label": args.label,
        "command": " ".join(sys.argv),
        "code": code_version(),
        "server": "serve_probe.py (lowdiff serve + tracemalloc probes)" if args.probe else "lowdiff serve",
        "server_flags": ["--threads", "1"] + (["--checkpoint", str(args.checkpoint)] if args.checkpoint else []),
        "server_env": args.env,
        "requests": args.requests,
        "clients": args.clients,
        "warmup_requests": args.warmup,
        "wall_s": round(wall, 1),
        "answers": dict(sorted(statuses.items())),
        "latency_s": {"p50": round(quantiles[49], 3), "p99": round(quantiles[98], 3), "max": round(max(latencies), 3)},
        "images_generated": _sample(metrics, "lowdiff_images_generated_total"),
        "batches": _sample(metrics, "lowdiff_batches_total", 'outcome="ok"'),
        "server_exit_code": exit_code,
        "load_average_after": os.getloadavg(),
        "samples": samples,
        "summary": summarize_samples(samples, args.warmup),
        "probes": probe_lines,
    }


def code_version() -> dict[str, Any]:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _sample(exposition: str, name: str, labels: str = "") -> float | None:
    for line in exposition.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return None


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) against requests, per 1,000 requests."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def summarize_samples(samples: list[dict[str, float]], warmup: int, window: int = 500) -> dict[str, Any]:
    """RSS at the milestones, least-squares slopes, and per-window floor (min) and peak (max): a sample
    lands either between batches or while one holds its activations, so RSS saws up and down by a few
    MB; a leak raises the floor."""

    def at(n: int) -> float:
        return min(samples, key=lambda s: abs(s["requests"] - n))["rss_mb"]

    last = samples[-1]["requests"]
    points = [(int(s["requests"]), s["rss_mb"]) for s in samples]
    windows = []
    for start in range(warmup, last, window):
        inside = [rss for n, rss in points if start <= n <= start + window]
        windows.append(
            {
                "requests": f"{start}–{min(start + window, last)}",
                "floor_mb": round(min(inside), 1),
                "peak_mb": round(max(inside), 1),
            }
        )
    floors = [(warmup + window * (k + 1), w["floor_mb"]) for k, w in enumerate(windows)]
    return {
        "rss_ready_mb": round(samples[0]["rss_mb"], 1),
        "rss_after_warmup_mb": round(at(warmup), 1),
        **{f"rss_at_{n}_mb": round(at(n), 1) for n in MILESTONES if n <= last},
        "slope_last_1000_mb_per_1000": round(slope_per_1000([p for p in points if p[0] >= last - 1000]), 2),
        "slope_after_warmup_mb_per_1000": round(slope_per_1000([p for p in points if p[0] >= warmup]), 2),
        "floor_slope_after_warmup_mb_per_1000": round(slope_per_1000(floors), 2) if len(floors) > 1 else None,
        "windows": windows,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from lowdiff.bench.plots import headless_pyplot

    plt = headless_pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for result in results:
        xs = [s["requests"] for s in result["samples"]]
        ys = [s["rss_mb"] for s in result["samples"]]
        label = result["label"] + (" (RSS includes tracemalloc and its snapshots)" if result.get("probes") else "")
        ax.plot(xs, ys, marker=".", markersize=3, label=label)
    ax.axvline(results[0]["warmup_requests"], color="#999999", linestyle=":", linewidth=1)
    ax.set_xlabel("requests answered")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title("lowdiff serve --threads 1 (fashion32), RSS over a soak")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| run | server env | RSS ready | after warm-up | at 1k | at 2k | at 3k | slope, last 1k (MB/1k req) "
        "| slope after warm-up | floor slope after warm-up | wall | answers |"
    )
    rows = [head, "|" + "---|" * 12]
    for r in results:
        s = r["summary"]
        answers = ", ".join(f"{k}: {v}" for k, v in r["answers"].items())
        rows.append(
            f"| {r['label']} | {' '.join(r['server_env']) or '—'} | {s['rss_ready_mb']} | {s['rss_after_warmup_mb']} "
            f"| {s.get('rss_at_1000_mb', '—')} | {s.get('rss_at_2000_mb', '—')} | {s.get('rss_at_3000_mb', '—')} "
            f"| {s['slope_last_1000_mb_per_1000']:+.2f} | {s['slope_after_warmup_mb_per_1000']:+.2f} "
            f"| {s['floor_slope_after_warmup_mb_per_1000']:+.2f} "
            f"| {r['wall_s']:.0f} s | {answers} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="baseline")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sample-every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=300, help="requests counted as warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="for the server")
    parser.add_argument("--probe", action="store_true", help="serve_probe.py: tracemalloc + malloc_trim probes")
    parser.add_argument("--checkpoint", type=Path, help="another model (smoke tests); default: the embedded one")
    parser.add_argument("--pause-pid", type=int, action="append", default=[], help="SIGSTOP during the soak")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="result folder (default: a new temp folder, or this folder with --summarize; "
                             "benchmarks/soak updates the committed one)")  # fmt: skip
    parser.add_argument("--summarize", action="store_true", help="table + rss.png of every JSON in --out-dir")
    args = parser.parse_args()
    args.out_dir = results_dir(HERE if args.summarize and args.out_dir is None else args.out_dir, "soak")
    if args.summarize:
        results = [json.loads(p.read_text()) for p in sorted(args.out_dir.glob("*.json"))]
        results.sort(key=lambda r: r.get("order", 0))
        for r in results:  # recomputed from the samples, so that the table follows this script
            r["summary"] = summarize_samples(r["samples"], r["warmup_requests"])
        plot(results, args.out_dir / "rss.png")
        print(table(results))
        return 0
    workdir = args.out_dir / f".work-{args.label}"
    workdir.mkdir(exist_ok=True)
    for stale in ("probe.jsonl", "trim"):
        (workdir / stale).unlink(missing_ok=True)
    with Pause(args.pause_pid):
        result = soak(args, workdir)
    result["order"] = int(time.time())
    (args.out_dir / f"{args.label}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot([result], args.out_dir / f"{args.label}.png")
    print(json.dumps(result["summary"], indent=1))
    print(table([result]))
    return 0 if result["server_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
