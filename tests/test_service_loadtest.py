"""CI smoke: a short headless Locust run against `lowdiff serve` on 127.0.0.1; any failed request fails."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from lowdiff.model import default_checkpoint_path
from tests.service_support import wait_until
from tests.test_service_drain import free_port

ROOT = Path(__file__).resolve().parents[1]
USERS = 4
SECONDS = 20


def test_locust_smoke_against_default_model(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    assert default_checkpoint_path().is_file(), "the embedded default model is part of the package"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "lowdiff.cli", "serve", "--port", str(port), "--max-batch", "8",
             "--warmup-batch", "4", "--timeout-s", "300", "--threads", "1"],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert server.poll() is None, log_path.read_text()
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=300, interval=0.2)
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
             "-u", str(USERS), "-r", str(USERS), "-t", f"{SECONDS}s", "--stop-timeout", "120", "--host", url,
             "--only-summary", "--csv", str(tmp_path / "smoke")],
            capture_output=True, text=True, timeout=SECONDS + 300,
        )  # fmt: skip
        assert locust.returncode == 0, locust.stdout[-3000:] + locust.stderr[-3000:]
        with open(tmp_path / "smoke_stats.csv") as f:
            rows = {row["Name"]: row for row in csv.DictReader(f)}
        total = rows["Aggregated"]
        assert int(total["Failure Count"]) == 0
        generated = sum(int(row["Request Count"]) for name, row in rows.items() if name.startswith("/generate"))
        assert generated >= USERS, rows
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
    assert server.returncode == 0, log_path.read_text()[-3000:]


def test_saturation_keepalive_users_against_live_server() -> None:
    """The sweep's own HTTP client (loadtests/saturation.py) against the real app: every request answered
    with a PNG, batches formed from several users, errors counted rather than raised."""
    sys.path.insert(0, str(ROOT / "loadtests"))
    import asyncio

    from saturation import KeepAliveClient, sweep_point

    from service.app import create_app
    from service.settings import ServeSettings
    from tests.service_support import FakeEngine, LiveServer

    engine = FakeEngine()
    with LiveServer(create_app(ServeSettings(max_batch=8, max_delay_ms=20), engine=engine)) as srv:
        srv.wait_ready()
        info = httpx.get(srv.url + "/v1/models").json()
        row = asyncio.run(sweep_point(srv.url, 8, 0.3, 1.5, info))
        assert row["failures"] == 0
        assert row["requests_in_window"] > 8
        assert row["mean_batch_size"] > 1  # several users' single-image requests shared batches

        async def bad_request() -> tuple[int, bytes]:
            host, port = srv.url.removeprefix("http://").split(":")
            client = KeepAliveClient(host, int(port))
            try:
                return await client.post_json("/generate", {"class_label": 99, "seed": 0}, "image/png")
            finally:
                await client.close()

        status, content = asyncio.run(bad_request())
        assert status == 422 and b"class_label" in content
