"""`lowdiff serve` as a real process: start-up refusals, drain past grace, a second SIGTERM, slow bodies."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from lowdiff.model import LowDiffModel, config_to_dict

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowdiff", "serve", "--threads", "1", *args]


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(serve_cmd("--port", "0", *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def one_line_error(result: subprocess.CompletedProcess[str], flag: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith(f"lowdiff serve: error: {flag}: "), line
    assert "Traceback" not in result.stderr
    assert len(line) < 400, line
    return line


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: LowDiffModel) -> Path:
    path = tmp_path / "tiny.pt"
    tiny_model.save(path)
    return path


def write_payload(path: Path, payload: object) -> Path:
    torch.save(payload, path)
    return path


def test_checkpoints_with_bad_contents_are_one_line_errors(tmp_path: Path, tiny_model: LowDiffModel) -> None:
    good = {
        "format": "lowdiff-checkpoint-v1",
        "config": config_to_dict(tiny_model.config),
        "state_dict": tiny_model.denoiser.net.state_dict(),
        "metadata": {},
    }
    bad_schedule = config_to_dict(tiny_model.config)
    bad_schedule["schedule"] = {"stages": [{"resolution": 8, "num_steps": 0}]}
    unknown_key = {**config_to_dict(tiny_model.config), "colour": "blue"}
    shapes = {k: torch.zeros(3) for k in tiny_model.denoiser.net.state_dict()}
    cases = {
        "empty-config": {**good, "config": {}},
        "no-weights": {k: v for k, v in good.items() if k != "state_dict"},
        "unknown-key": {**good, "config": unknown_key},
        "bad-schedule": {**good, "config": bad_schedule},
        "metadata-list": {**good, "metadata": [1, 2]},
        "wrong-shapes": {**good, "state_dict": shapes},
    }
    for name, payload in cases.items():
        result = run_serve("--checkpoint", str(write_payload(tmp_path / f"{name}.pt", payload)))
        line = one_line_error(result, "--checkpoint")
        assert f"{name}.pt" in line, line


def test_engine_options_are_refused_before_the_port_opens(tiny_checkpoint: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        assert "GPU" in one_line_error(
            run_serve("--checkpoint", str(tiny_checkpoint), "--engine", "cudagraph"), "--engine"
        )
    one_line_error(run_serve("--checkpoint", str(tiny_checkpoint), "--engine-dir", str(tmp_path)), "--engine-dir")
    missing = tmp_path / "nowhere"
    one_line_error(
        run_serve("--checkpoint", str(tiny_checkpoint), "--engine", "onnxruntime", "--engine-dir", str(missing)),
        "--engine-dir",
    )


def test_tampered_engine_folder_fails_in_the_loading_thread_with_one_line(
    tiny_model: LowDiffModel, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from lowdiff.export.onnx_stages import export_onnx

    folder = tmp_path / "engines"
    export_onnx(tiny_model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stages"][-1]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = run_serve("--checkpoint", str(tiny_checkpoint), "--engine", "onnxruntime", "--engine-dir", str(folder))
    line = one_line_error(result, "--engine-dir")
    assert "stage32.onnx" in line and "sha256" in line


class Server:
    def __init__(self, checkpoint: Path, tmp_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "serve.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                serve_cmd("--checkpoint", str(checkpoint), "--port", str(self.port), *args),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server never became ready")

    def in_flight(self) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "lowdiff_requests_in_flight":
                    return sample.value
        return 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _start_long_requests(server: Server, pool: ThreadPoolExecutor, count: int) -> list:
    body = {"class_label": 1, "seed": 0, "num_images": 64, "timeout_s": 300}
    futures = [pool.submit(httpx.post, server.url + "/generate", json=body, timeout=120) for _ in range(count)]
    deadline = time.monotonic() + 60
    while server.in_flight() < count:
        assert time.monotonic() < deadline, "requests never arrived"
        time.sleep(0.05)
    return futures


@pytest.mark.parametrize("second_signal", [False, True], ids=["grace-ends", "second-sigterm"])
def test_requests_open_at_the_end_of_the_drain_get_503_never_500(
    tiny_checkpoint: Path, tmp_path: Path, second_signal: bool
) -> None:
    grace = 30.0 if second_signal else 1.0
    server = Server(tiny_checkpoint, tmp_path, "--max-batch", "1", "--max-delay-ms", "0", "--grace-s", str(grace))
    try:
        server.wait_ready()
        with ThreadPoolExecutor(2) as pool:
            futures = _start_long_requests(server, pool, 2)  # 64 one-image batches each: far longer than grace
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            if second_signal:
                time.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
            code = server.proc.wait(timeout=grace + 30)
            elapsed = time.monotonic() - started
        assert [r.status_code for r in results] == [503, 503], [r.text for r in results]
        assert all(r.headers.get("retry-after") for r in results)
        assert all(r.json()["error"].startswith("server is shutting down") for r in results)
        assert code == 0, server.log_path.read_text()[-3000:]
        # The 503s above already show the queued work was cut off, not finished. The bound shows the exit
        # follows the grace (or the second signal, which cuts a 30 s grace short) and not the work: the
        # batch in flight must still end, which took up to 4.6 s at load average 7–9 on a 2-core machine.
        limit = 12.0 if second_signal else grace + 8.0
        assert elapsed < limit, f"exited {elapsed:.1f} s after SIGTERM (limit {limit} s)"
    finally:
        server.close()


def test_a_body_that_never_finishes_gets_408_and_the_connection_closes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    server = Server(tiny_checkpoint, tmp_path, "--body-timeout-s", "1")
    try:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"class_label": '
            )
            started = time.monotonic()
            data = b""
            while True:  # read until the server closes the connection
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            elapsed = time.monotonic() - started
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b'"field":"body"' in data
        assert 0.5 < elapsed < 10
    finally:
        server.close()
