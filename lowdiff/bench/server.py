"""A ``lowdiff serve`` process for benchmarks and load tests: a free port, and waiting until it is ready.

Shared by loadtests/saturation.py, loadtests/service_overhead.py, benchmarks/soak/run.py and
scripts/run_schemathesis.py (standard library only: the load-test client packages are dev extras).
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600, log_path: Path | None = None) -> None:
    """Poll ``url``/readyz until 200; exit with the log's tail if the server dies or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path is not None and log_path.is_file() else "see its log"
            raise SystemExit(f"lowdiff serve exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"lowdiff serve not ready within {timeout:g} s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM (the server drains), then SIGKILL after ``timeout``; the exit status."""
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
