"""Saturation sweep: service throughput and latency vs concurrent users, against `lowdiff bench`.

1. ``lowdiff bench`` measures engine-only throughput at batch ``--max-batch`` (same model, engine,
   threads), with no server running.
2. ``lowdiff serve`` starts on 127.0.0.1 with ``--max-batch``; for each user count, closed-loop users
   (each sends its next single-image request when the last one is answered) run for
   ``--ramp-s`` + ``--window-s``. Throughput: the server's image counter, polled every 0.2 s,
   between the first and the last batch that end inside the window (a window cut mid-batch would
   be off by up to a whole batch); latency p50/p99: the requests answered inside the window.
3. Writes ``saturation.csv``, ``saturation.png`` (throughput and p50/p99 vs users),
   ``summary.json`` and ``README.md`` (machine, commands, table) into ``--out-dir``.

Saturated service throughput is the throughput at the largest user count (there the queue never
empties and every batch is full, as in the bench); the target is ≥ 90 % of bench throughput on
CPU with the default model. The bench runs before and after the sweep and the reference is their
mean, so that drift in the machine's other load shows up instead of skewing the ratio.

    python loadtests/saturation.py --max-batch 16 --threads 1 --users 1,4,16,32 --window-s 60
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SEED = 2**32 - 1


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
    cmd = [sys.executable, "-m", "lowdiff.cli", "bench", *flags, *engine_flags(args),
           "--batch", str(args.max_batch), "--runs", str(args.bench_runs), "--json", str(out)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return {"command": "lowdiff " + " ".join(cmd[3:]), **report["results"][0]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> tuple[subprocess.Popen[bytes], list[str]]:
    cmd = [sys.executable, "-m", "lowdiff.cli", "serve", *model_flags(args), *engine_flags(args),
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
           "--max-queue", "4096", "--timeout-s", "600", "--warmup-batch", str(args.max_batch),
           "--log-level", "warning"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$", " ".join(cmd[1:]), flush=True)
    log = open(args.out_dir / "serve.log", "wb")  # stays open as long as the server runs
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), cmd


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see serve.log")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit("server not ready in time")


class KeepAliveClient:
    """One user's HTTP/1.1 keep-alive connection, written on asyncio streams.

    Why not httpx: its async pool collapses with many concurrent connections. Measured on this 2-core
    machine against one server: GET /healthz at 1 / 16 / 256 users gave 741 / 494 / 92 requests/s through
    one httpx.AsyncClient, and 3,922 / 4,520 / 4,242 through these connections; on an H100 the httpx
    users capped the service at ~60–115 images/s while the engine alone did 605. Responses must carry
    Content-Length (the service's always do); anything else is an error, not a guess.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: dict[str, Any], accept: str) -> tuple[int, bytes]:
        """(status, body); reconnects once when the server closed the idle connection."""
        payload = json.dumps(body).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: {accept}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(request)
                await self.writer.drain()
                return await self._read_response()
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _read_response(self) -> tuple[int, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" not in headers:
            raise ConnectionError(f"response without Content-Length (status {status})")
        content = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.reader = None


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    """Each sample name's value, summed over its label sets (so labelled histograms add up)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if "le" not in sample.labels:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


async def sweep_point(url: str, users: int, ramp_s: float, window_s: float, info: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop users; stats from the requests that complete inside [ramp, ramp + window]."""
    conditional = bool(info.get("conditional"))
    num_classes = int(info.get("num_classes") or 1)
    start = time.monotonic()
    window_start, window_end = start + ramp_s, start + ramp_s + window_s
    done: list[tuple[float, float, bool]] = []  # (sent, answered, ok)
    server_counts: dict[str, dict[str, float]] = {}

    host, port = url.removeprefix("http://").split(":")

    async def user(k: int) -> None:
        rng = random.Random(users * 1000 + k)
        client = KeepAliveClient(host, int(port))
        while time.monotonic() < window_end:
            body: dict[str, int] = {"seed": rng.randrange(MAX_SEED)}
            if conditional:
                body["class_label"] = rng.randrange(num_classes)
            sent = time.monotonic()
            try:
                status, content = await client.post_json("/generate", body, "image/png")
                ok = status == 200 and content.startswith(PNG_SIGNATURE)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                ok = False
                await client.close()
            done.append((sent, time.monotonic(), ok))
        await client.close()

    async def mark(name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        server_counts[name] = await asyncio.to_thread(scrape, url)

    # (when the image counter was seen to move, its value, the engine's total batch time then)
    batch_ends: list[tuple[float, float, float]] = []

    async def poll() -> None:
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        last = None
        while time.monotonic() < window_end:
            now = await asyncio.to_thread(scrape, url)
            value = now["lowdiff_images_generated_total"]
            if value != last:
                batch_ends.append((time.monotonic(), value, now["lowdiff_batch_duration_seconds_sum"]))
                last = value
            await asyncio.sleep(0.2)

    await asyncio.gather(*(user(k) for k in range(users)), mark("start", window_start), mark("end", window_end), poll())
    inside = [(s, e, ok) for s, e, ok in done if window_start <= e <= window_end]
    latencies = np.array([e - s for s, e, ok in inside if ok])
    a, b = server_counts["start"], server_counts["end"]
    batches = b["lowdiff_batch_size_images_count"] - a["lowdiff_batch_size_images_count"]
    images = b["lowdiff_batch_size_images_sum"] - a["lowdiff_batch_size_images_sum"]
    moves = batch_ends[1:]  # the first sample is the counter's value at the window's start, not a batch end
    if len(moves) >= 2:
        (t0, n0, e0), (t1, n1, e1) = moves[0], moves[-1]
        images_per_s = (n1 - n0) / (t1 - t0)
        engine_busy = (e1 - e0) / (t1 - t0)
    else:  # fewer than two batches ended inside the window: fall back to the plain count
        images_per_s = (b["lowdiff_images_generated_total"] - a["lowdiff_images_generated_total"]) / window_s
        engine_busy = float("nan")
    return {
        "users": users,
        "images_per_s": images_per_s,
        "batches_timed": max(len(moves) - 1, 0),
        # Share of wall time the engine spent running batches: 1 − this is what the service adds
        # (gaps between batches), measured in the same seconds, so immune to the machine's drift.
        "engine_busy_fraction": engine_busy,
        "client_images_per_s": sum(ok for *_, ok in inside) / window_s,
        "p50_s": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_s": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        "requests_in_window": len(inside),
        "failures": sum(not ok for *_, ok in done),
        "mean_batch_size": images / batches if batches else float("nan"),
    }


def write_plot(
    rows: list[dict[str, Any]], bench_ips: float, path: Path, title: str, reference: str = "lowdiff bench"
) -> None:
    from engines.bench import headless_pyplot

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
    ax1.set_xlabel("concurrent users (1 image per request)")
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
        "| users | images/s | share of bench | engine busy | p50 (s) | p99 (s) | mean batch | batches timed "
        "| failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['users']} | {r['images_per_s']:.2f} | {100 * r['images_per_s'] / b['throughput_img_s']:.1f} % | "
            f"{100 * r['engine_busy_fraction']:.1f} % | "
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
    p.add_argument("--users", default="1,2,4,8,16,32")
    p.add_argument("--ramp-s", type=float, default=10.0)
    p.add_argument("--window-s", type=float, default=60.0)
    p.add_argument("--bench-runs", type=int, default=5)
    p.add_argument("--note", default="", help="free text for the README (e.g. other load on the machine)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "serve-saturation")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    before = run_bench(args, "bench-before")
    print(f"bench before: {before['throughput_img_s']:.2f} images/s at batch {args.max_batch}", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, serve_cmd = start_server(args, port)
    rows: list[dict[str, Any]] = []
    try:
        wait_ready(url, proc)
        info = httpx.get(url + "/v1/models").json()
        for users in [int(u) for u in args.users.split(",")]:
            row = asyncio.run(sweep_point(url, users, args.ramp_s, args.window_s, info))
            rows.append(row)
            print(json.dumps(row), flush=True)
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
    write_plot(rows, bench["throughput_img_s"], args.out_dir / "saturation.png", title)
    write_readme(summary, rows, args.out_dir / "README.md")
    print(f"saturated: {saturated['images_per_s']:.2f} images/s = {100 * summary['share_of_bench']:.1f} % of bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
