#!/usr/bin/env python
"""Schemathesis (all checks, stateless) against a real ``lowdiff serve`` on loopback.

Writes a tiny model (the test suite's tiny network, a few steps per stage: milliseconds per image)
to a temporary checkpoint, serves it with ``lowdiff serve``, runs ``schemathesis run`` on
``/openapi.json`` and stops the server with SIGTERM. Two servers, one after the other:

* ``conditional``: a 10-class model with ``LOWDIFF_API_KEY`` set (401s documented, ``ignored_auth``
  exercised), ``--max-examples`` cases per operation and generation mode;
* ``unconditional``: a model without classes and without a key (``class_label`` null-only, no 401).

Usage: ``.venv/bin/python scripts/run_schemathesis.py [--max-examples 2500] [--out-dir benchmarks/schemathesis]``
(needs ``pip install schemathesis``). Writes NAME-output.txt (the command and schemathesis' output, and
the server's own count of answers by status) and NAME-junit.xml in the output folder.
Exit status: schemathesis' own (0 = no failure), or 1 if the server logged an error or did not exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from lowdiff.bench.server import free_port, stop, wait_ready
from lowdiff.configs import ModelConfig, get_config
from lowdiff.model import LowDiffModel
from lowdiff.network import NetworkConfig
from lowdiff.schedule import CascadeSchedule, StageSchedule

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "schemathesis-key"
CONFIG_FILE = ROOT / "benchmarks" / "schemathesis" / "schemathesis.toml"  # 504 (timeout_s passed) is expected
# fashion32's cascade shape with few steps (as in the test suite).
SHORT_SCHEDULE = CascadeSchedule(
    (
        StageSchedule(8, 4, truncate_at=2),
        StageSchedule(16, 4, truncate_at=2, final_step="euler", sigma_min=0.01, sigma_max=50.0),
        StageSchedule(32, 3, sigma_min=0.01, sigma_max=50.0),
    )
)


def tiny_model(label_dim: int) -> LowDiffModel:
    """The test suite's tiny network (8 channels, one block per level), perturbed, on SHORT_SCHEDULE."""
    net = NetworkConfig(
        img_resolution=32,
        img_channels=1,
        label_dim=label_dim,
        resolutions=(8, 16, 32),
        model_channels=8,
        channel_mult=(1, 1, 2),
        num_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
        augment_dim=0,
    )
    name = "tiny" if label_dim else "tiny-uncond"
    config = ModelConfig(
        name=name, network=net, schedule=get_config("fashion32").schedule, preconditioning="edm", pad=2
    )
    torch.manual_seed(0)
    model = LowDiffModel(config)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.with_schedule(SHORT_SCHEDULE)


def bad_log_line(line: str) -> bool:
    """A server log line at level error, or an access line with a 5xx status other than 504."""
    try:
        record = json.loads(line)
    except ValueError:
        return "Traceback" in line
    status = int(record.get("status") or 0)
    return record.get("level") in ("error", "critical") or (status >= 500 and status != 504)


def generate_statuses(exposition: str) -> dict[str, int]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "lowdiff_requests_total" and sample.labels.get("endpoint") == "/generate":
                out[sample.labels["status"]] = int(sample.value)
    return dict(sorted(out.items()))


def run_one(name: str, label_dim: int, api_key: str | None, args: argparse.Namespace, workdir: Path) -> int:
    checkpoint = workdir / f"{name}.pt"
    tiny_model(label_dim).save(checkpoint)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOWDIFF_API_KEY", None)
    if api_key is not None:
        env["LOWDIFF_API_KEY"] = api_key
    serve = [sys.executable, "-m", "lowdiff", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    serve += ["--threads", "1"]
    log_path = workdir / f"{name}-server.log"
    out_path = args.out_dir / f"{name}-output.txt"
    st = Path(sys.executable).with_name("schemathesis")
    command = [
        str(st),
        "--config-file",
        str(CONFIG_FILE),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
    ]
    command += ["--max-examples", str(args.max_examples if label_dim else args.max_examples_unconditional)]
    command += ["--seed", str(args.seed), "--workers", str(args.workers), "--no-color"]
    command += ["--report", "junit", "--report-junit-path", str(args.out_dir / f"{name}-junit.xml")]
    command += ["--generation-database", "none"]
    if api_key is not None:
        command += ["--header", f"Authorization: Bearer {api_key}"]
    ready_at = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, 120, log_path)
        ready_at = log_path.stat().st_size  # the 503s of /readyz while loading are expected
        shown = " ".join(shlex.quote(c) for c in command).replace(api_key or "\0", "$LOWDIFF_API_KEY")
        print(f"[{name}] {shown}", flush=True)
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        out_path.write_text(f"$ {shown}\n# exit status {result.returncode}, {elapsed:.0f} s\n\n{output}")
        print(output[-4000:], flush=True)
        statuses = generate_statuses(httpx.get(url + "/metrics", timeout=10).text)
        print(f"[{name}] POST /generate answers by status (server's counters): {statuses}", flush=True)
        with open(out_path, "a") as out:
            out.write(f"\n# POST /generate answers by status (the server's lowdiff_requests_total): {statuses}\n")
    finally:
        code = stop(proc, 60)
    bad_log = [line for line in log_path.read_bytes()[ready_at:].decode().splitlines() if bad_log_line(line)]
    if code != 0 or bad_log:
        print(f"[{name}] server exit status {code}; error lines: {bad_log[:5]}", flush=True)
        return 1
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=2500, help="cases per operation (conditional run)")
    parser.add_argument("--max-examples-unconditional", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "schemathesis")
    parser.add_argument("--only", choices=("conditional", "unconditional"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    runs = [("conditional", 10, API_KEY), ("unconditional", 0, None)]
    status = 0
    with tempfile.TemporaryDirectory(prefix="lowdiff-schemathesis-") as tmp:
        for name, label_dim, key in runs:
            if args.only in (None, name):
                status = max(status, run_one(name, label_dim, key, args, Path(tmp)))
    return status


if __name__ == "__main__":
    sys.exit(main())
