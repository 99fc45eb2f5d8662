"""`lowdiff serve --max-connections N` as a real process: N open connections are served, the next gets 503."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def capped_server(tiny_model, tmp_path: Path, free_port):
    checkpoint = tmp_path / "tiny.pt"
    tiny_model.save(checkpoint)
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "lowdiff", "serve", "--checkpoint", str(checkpoint), "--threads", "1"]
    command += ["--port", str(port), "--max-connections", "2"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "server never became ready"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield port
    finally:
        proc.kill()
        proc.wait()


def get(conn: http.client.HTTPConnection, path: str = "/healthz") -> tuple[int, str, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.getheader("content-type", ""), response.read()


def test_past_the_connection_cap_new_connections_get_503(capped_server: int, wait_until) -> None:
    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", capped_server, timeout=30)

    first, second = connect(), connect()
    wait_until(lambda: get(first)[0] == 200, timeout=10)  # earlier probes' connections may still be closing
    assert get(second)[0] == 200  # two open (kept-alive) connections: both served
    third = connect()
    status, content_type, body = get(third)
    assert status == 503, body
    assert content_type.startswith("text/plain") and body == b"Service Unavailable"
    third.close()
    assert get(first)[0] == 200 and get(second, "/metrics")[0] == 200  # the open ones still are
    first.close()

    def a_new_connection_is_served() -> bool:
        conn = connect()
        try:
            return get(conn)[0] == 200
        finally:
            conn.close()

    wait_until(a_new_connection_is_served, timeout=10)
    second.close()
