"""SIGTERM on a real `lowdiff serve` process: readiness 503, new work 503, in-flight work finishes, exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from lowdiff.model import LowDiffModel

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_drains_in_flight_requests_then_exits_0(
    tiny_config, wait_until, metric_value, free_port, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    LowDiffModel(tiny_config()).save(tmp_path / "tiny.pt")  # fashion32's full schedule: slow enough to drain
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lowdiff", "serve", "--checkpoint", str(tmp_path / "tiny.pt"),
             "--port", str(port), "--max-batch", "1", "--max-delay-ms", "0", "--grace-s", "120", "--threads", "1"],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=120, interval=0.1)
        with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(3) as pool:
            bodies = [{"class_label": k, "seed": 10 * k, "num_images": 3} for k in range(3)]
            futures = [pool.submit(client.post, "/generate", json=b) for b in bodies]
            wait_until(lambda: metric_value(client.get("/metrics").text, "lowdiff_requests_in_flight") == 3, timeout=60)
            proc.send_signal(signal.SIGTERM)
            with httpx.Client(base_url=url, timeout=30) as probe:  # fresh connections, as a load balancer's
                wait_until(lambda: probe.get("/readyz").status_code == 503, timeout=30)
                assert probe.get("/readyz").json()["status"] == "draining"
                refused = probe.post("/generate", json={"class_label": 0, "seed": 1})
                assert refused.status_code == 503
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200, 200, 200]
        assert all(len(r.json()["images"]) == 3 for r in results)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(entry["msg"].startswith("drained") for entry in lines)
    access = [e for e in lines if e["logger"] == "lowdiff.service.access" and e.get("status") == 200]
    assert access and all("request_id" in e for e in access)
