"""A real Prometheus scraping a real `lowdiff serve`, queried with the Grafana dashboard's own queries.

Starts `lowdiff serve` (a tiny model, 127.0.0.1) and Debian's `prometheus` binary (127.0.0.1,
temporary config and storage, 1 s scrape interval), sends /generate requests, then asks
Prometheus' HTTP API for the dashboard's queries (helm/lowdiff/dashboards/lowdiff.json), with the
dashboard variables replaced as Grafana replaces them when "All" is selected. Checks that every
dashboard query is valid PromQL, and that the throughput rate(), the p99 latency
histogram_quantile() and the other main panels return values.

Skipped only when the prometheus binary is missing; CI installs it (scripts/check-deploy.sh).
Bounded: every wait has a deadline, and both processes are stopped at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "helm" / "lowdiff" / "dashboards" / "lowdiff.json"
PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL_S = 1
# What Grafana puts in for the dashboard's variables with "All" selected (allValue ".*"), and a
# rate window of several scrape intervals, as $__rate_interval is for a 1 s scrape interval.
VARIABLES = {"$namespace": ".*", "$job": ".*", "$__rate_interval": "20s"}

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not installed (apt-get install prometheus; CI installs it in "
    "scripts/check-deploy.sh)",
)


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with status {proc.returncode}")
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def dashboard_queries() -> dict[tuple[str, str], str]:
    """(panel title, legend) → the query, with Grafana's variable substitution."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            queries[(panel["title"], target.get("legendFormat", ""))] = expr
    return queries


@pytest.fixture
def stack(tiny_fast_model, free_port, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(service URL, Prometheus URL), both on 127.0.0.1; both processes stopped afterwards."""
    checkpoint = tmp_path / "tiny.pt"
    tiny_fast_model().save(checkpoint)
    port, prom_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOWDIFF_API_KEY", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "lowdiff", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--max-delay-ms", "5", "--threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("wb"),
    )  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"scrape_configs:\n  - job_name: lowdiff\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    prometheus = None
    try:
        service_url, prom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
        wait_for(lambda: httpx.get(f"{service_url}/readyz", timeout=2).status_code == 200, 120, "service ready", server)
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"),
        )  # fmt: skip
        wait_for(lambda: httpx.get(f"{prom_url}/-/ready", timeout=2).status_code == 200, 60, "prometheus", prometheus)
        yield service_url, prom_url
    except AssertionError:
        for log in ("serve.log", "prometheus.log"):
            if (tmp_path / log).exists():
                print(f"--- {log}\n{(tmp_path / log).read_text(errors='replace')[-3000:]}")
        raise
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(server)


def query(prom_url: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def has_values(prom_url: str, expr: str, positive: bool = True) -> list[dict[str, Any]]:
    result = query(prom_url, expr)
    finite = [v for v in values(result) if math.isfinite(v) and (v > 0 or not positive)]
    return result if finite else []


def generate(client: httpx.Client, url: str, body: dict[str, Any]) -> int:
    return client.post(f"{url}/generate", json=body, timeout=30).status_code


def test_prometheus_scrapes_service_and_dashboard_queries_return_values(stack: tuple[str, str]) -> None:
    service_url, prom_url = stack
    queries = dashboard_queries()
    # Every dashboard query is valid PromQL for this Prometheus.
    for expr in queries.values():
        query(prom_url, expr)

    wait_for(lambda: values(query(prom_url, 'up{job="lowdiff"}')) == [1.0], 30, "first scrape")
    with httpx.Client() as client:
        # A first wave creates the labelled series (e.g. endpoint="/generate"); a scrape sees them;
        # the second wave then moves them, so that rate() over the window is above zero.
        assert generate(client, service_url, {"class_label": 1, "seed": 0}) == 200
        assert generate(client, service_url, {"class_label": 99, "seed": 0}) == 422
        time.sleep(2.5 * SCRAPE_INTERVAL_S)
        for k in range(6):
            assert generate(client, service_url, {"class_label": k, "seed": k, "num_images": 1 + k % 3}) == 200
        assert generate(client, service_url, {"class_label": -1}) == 422

    rate_query = queries[("Throughput", "images/s")]
    p99_query = queries[("Request latency, POST /generate (p50, p99)", "p99")]
    assert rate_query.startswith("sum(rate(lowdiff_images_generated_total")
    assert p99_query.startswith("histogram_quantile(0.99,")

    throughput = wait_for(lambda: has_values(prom_url, rate_query), 30, f"rate query {rate_query}")
    p99 = wait_for(lambda: has_values(prom_url, p99_query), 30, f"histogram_quantile query {p99_query}")
    assert 0 < values(p99)[0] < 30, p99
    assert values(throughput)[0] > 0

    # The other main panels have data too.
    for key in [
        ("Request latency, POST /generate (p50, p99)", "p50"),
        ("Queue wait (p50, p99)", "p99"),
        ("Batch size", "mean"),
        ("Requests by status, POST /generate", "{{status}}"),
    ]:
        wait_for(lambda key=key: has_values(prom_url, queries[key]), 15, f"{key}: {queries[key]}")
    stage_query = queries[("Per-stage latency (p50, p99 by resolution)", "{{resolution}}×{{resolution}} p50")]
    stages = wait_for(lambda: has_values(prom_url, stage_query), 15, f"per-stage latency {stage_query}")
    assert sorted(int(s["metric"]["resolution"]) for s in stages) == [8, 16, 32]
    errors = wait_for(
        lambda: has_values(prom_url, queries[("Error rate by status (share of POST /generate)", "{{status}}")]),
        15,
        "error rate by status",
    )
    assert {s["metric"]["status"] for s in errors} == {"422"}
    depth = query(prom_url, queries[("Queue depth", "total")])
    assert values(depth) and values(depth)[0] >= 0
    assert values(query(prom_url, queries[("Ready replicas", "ready")])) == [1.0]
