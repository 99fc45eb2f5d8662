"""/metrics: the expected names, counters that move, promtool's approval, batch-size buckets."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from lowdiff.service.metrics import batch_size_bucket

pytestmark = pytest.mark.usefixtures("one_torch_thread")


EXPECTED_METRICS = (
    "lowdiff_requests_total",
    "lowdiff_request_duration_seconds",
    "lowdiff_queue_wait_seconds",
    "lowdiff_batch_size_images",
    "lowdiff_batch_duration_seconds",
    "lowdiff_stage_duration_seconds",
    "lowdiff_images_generated_total",
    "lowdiff_images_dropped_total",
    "lowdiff_batches_total",
    "lowdiff_queue_depth_images",
    "lowdiff_requests_in_flight",
    "lowdiff_ready",
    "lowdiff_model_info",
)


def test_metrics_names_and_counts_move(live, metric_value) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with live(max_batch=4) as srv, srv.wait_ready().client() as c:
        before = c.get("/metrics").text
        names = {f.name for f in text_string_to_metric_families(before)}
        for name in EXPECTED_METRICS:
            assert name.removesuffix("_total") in names, name
        assert c.post("/generate", json={"class_label": 0, "seed": 1, "num_images": 3}).status_code == 200
        assert c.post("/generate", json={"class_label": 0, "seed": 9}).status_code == 200
        assert c.post("/generate", json={"seed": 9}).status_code == 422
        after = c.get("/metrics").text

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta("lowdiff_requests_total", {"endpoint": "/generate", "status": "200"}) == 2
    assert delta("lowdiff_requests_total", {"endpoint": "/generate", "status": "422"}) == 1
    assert delta("lowdiff_images_generated_total") == 4
    assert delta("lowdiff_batch_size_images_sum") == 4
    assert delta("lowdiff_queue_wait_seconds_count") == 4
    assert delta("lowdiff_request_duration_seconds_count", {"endpoint": "/generate"}) == 3
    batches = delta("lowdiff_batches_total", {"outcome": "ok"})
    assert batches in (1, 2)
    for r in ("8", "16", "32"):
        assert delta("lowdiff_stage_duration_seconds_count", {"resolution": r}) == batches
    assert metric_value(after, "lowdiff_ready") == 1
    assert metric_value(after, "lowdiff_model_info", {"model": "fake", "engine": "fake"}) == 1


def test_promtool_accepts_metrics(client) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI: .ci/run installs Debian's 'prometheus' package")
        pytest.skip("promtool not installed (CI installs Debian's 'prometheus' package)")
    client.post("/generate", json={"class_label": 0, "seed": 1})
    text = client.get("/metrics").text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_batch_size_bucket() -> None:
    assert [batch_size_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [
        "1", "2", "3-4", "3-4", "5-8", "5-8", "9-16", "33-64", "65-128",
    ]  # fmt: skip
