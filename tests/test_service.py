"""The HTTP service on loopback: API, validation, backpressure, deadlines, faults, auth, metrics."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from lowdiff.service.app import create_app
from lowdiff.service.metrics import batch_size_bucket
from lowdiff.service.routes import wants_png
from lowdiff.service.settings import ServeSettings, SettingsError, resolve_settings
from tests.service_support import FakeEngine, LiveServer, metric_value, tiny_fast_model, wait_until


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)))


def live(engine: FakeEngine | None = None, **settings: object) -> LiveServer:
    return LiveServer(create_app(ServeSettings(**settings), engine=engine or FakeEngine()))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from threads, and on a shared 2-core machine extra OpenMP threads
    spinning against other processes make them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server():
    with live(max_queue=128, timeout_s=30) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


# ---------------------------------------------------------------------------- the API
def test_generate_json(client) -> None:
    r = client.post("/generate", json={"class_label": 3, "seed": 10, "num_images": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake"
    assert [im["seed"] for im in body["images"]] == [10, 11, 12]
    assert {im["class_label"] for im in body["images"]} == {3}
    pixels = [decode_png(base64.b64decode(im["png_base64"])) for im in body["images"]]
    assert all(p.shape == (32, 32) for p in pixels)
    assert not np.array_equal(pixels[0], pixels[1])
    t = body["timings"]
    assert 0 <= t["queue_s"] and 0 <= t["compute_s"] and t["queue_s"] + t["compute_s"] <= t["total_s"]


def test_generate_png_and_grid(client) -> None:
    one = client.post("/generate", json={"class_label": 1, "seed": 5}, headers={"Accept": "image/png"})
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    assert decode_png(one.content).shape == (32, 32)
    body = {"class_label": 1, "seed": 5, "num_images": 5}
    grid = client.post("/generate", json=body, headers={"Accept": "image/png"})
    assert grid.status_code == 200
    pixels = decode_png(grid.content)
    assert pixels.shape == (64, 96)  # 2 rows × 3 columns of 32×32
    np.testing.assert_array_equal(pixels[:32, :32], decode_png(one.content))  # image 0 = seed 5, top left
    assert grid.headers["x-lowdiff-seed"] == "5"


def test_seed_drawn_and_returned_when_omitted(client) -> None:
    body = client.post("/generate", json={"class_label": 2, "num_images": 2}).json()
    s0, s1 = (im["seed"] for im in body["images"])
    assert s1 == s0 + 1 and 0 <= s0 < 2**32 - 1
    again = client.post("/generate", json={"class_label": 2, "seed": s0}).json()
    assert again["images"][0]["png_base64"] == body["images"][0]["png_base64"]


def test_models_info_health_docs(client) -> None:
    info = client.get("/v1/models").json()
    keys = ("model", "config", "resolutions", "schedule", "nfe_per_stage", "engine", "device", "precision", "version")
    for key in keys:
        assert key in info, key
    assert client.get("/info").json() == info
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    assert "/generate" in client.get("/openapi.json").json()["paths"]


def test_request_id_is_honoured_or_made(client) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    err = client.post("/generate", json={"seed": 1}, headers={"X-Request-ID": "req-7"})
    assert err.json()["request_id"] == "req-7"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ('{"class_label": 1', 400, "body"),
        ("[1, 2]", 422, "body"),
        ("", 422, "body"),
        ('{"seed": 1}', 422, "class_label"),
        ('{"class_label": "1"}', 422, "class_label"),
        ('{"class_label": 1.0}', 422, "class_label"),
        ('{"class_label": -1}', 422, "class_label"),
        ('{"class_label": 10}', 422, "class_label"),
        ('{"class_label": 1, "seed": "7"}', 422, "seed"),
        ('{"class_label": 1, "seed": true}', 422, "seed"),
        ('{"class_label": 1, "seed": -1}', 422, "seed"),
        ('{"class_label": 1, "seed": 4294967296}', 422, "seed"),
        ('{"class_label": 1, "seed": 4294967295, "num_images": 2}', 422, "seed"),
        ('{"class_label": 1, "num_images": 0}', 422, "num_images"),
        ('{"class_label": 1, "num_images": 65}', 422, "num_images"),
        ('{"class_label": 1, "num_images": [1]}', 422, "num_images"),
        ('{"class_label": 1, "timeout_s": 0}', 422, "timeout_s"),
        ('{"class_label": 1, "timeout_s": "soon"}', 422, "timeout_s"),
        ('{"class_label": 1, "timeout_s": 100000}', 422, "timeout_s"),
        ('{"class_label": 1, "num_imagez": 2}', 422, "num_imagez"),
    ],
)
def test_bad_input_names_the_field(client, body: str, status: int, field: str) -> None:
    r = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert r.json()["error"].startswith(field)


def test_oversize_body_is_413(client, server) -> None:
    limit = server.service.settings.max_body_bytes
    r = client.post("/generate", content=b'{"class_label": 1, "pad": "' + b"x" * limit + b'"}')
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    r = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_class_label_rejected_for_unconditional_model() -> None:
    with live(FakeEngine(conditional=False)) as srv, srv.wait_ready().client() as c:
        r = c.post("/generate", json={"class_label": 0, "seed": 1})
        assert r.status_code == 422 and r.json()["field"] == "class_label"
        ok = c.post("/generate", json={"seed": 1})
        assert ok.status_code == 200 and ok.json()["images"][0]["class_label"] is None


def test_wants_png() -> None:
    assert wants_png("image/png")
    assert not wants_png(None) and not wants_png("application/json") and not wants_png("*/*")
    assert wants_png("image/png, application/json") and not wants_png("application/json, image/png")
    assert wants_png("application/json;q=0.5, image/png") and not wants_png("image/png;q=0")


# ---------------------------------------------------------------------------- overload and faults
def test_queue_full_is_429_and_accepted_work_survives() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    with live(engine, max_batch=1, max_queue=2, max_delay_ms=0) as srv, srv.wait_ready().client() as c:
        pool = ThreadPoolExecutor(4)
        try:
            running = pool.submit(c.post, "/generate", json={"class_label": 0, "seed": 100})
            wait_until(lambda: len(engine.batches) == 1)  # seed 100 holds the engine
            queued = pool.submit(c.post, "/generate", json={"class_label": 0, "seed": 200, "num_images": 2})
            wait_until(lambda: srv.service.batcher.queue_depth == 2)
            full = c.post("/generate", json={"class_label": 0, "seed": 300})
            assert full.status_code == 429
            assert int(full.headers["retry-after"]) >= 1
        finally:
            engine.gate.set()
        assert running.result().status_code == 200
        assert queued.result().status_code == 200  # nothing already accepted was dropped
        assert not engine.ran(300)
        pool.shutdown()


def test_deadline_is_504_and_unstarted_work_dropped() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    with live(engine, max_batch=1, max_delay_ms=0) as srv, srv.wait_ready().client() as c:
        pool = ThreadPoolExecutor(2)
        try:
            running = pool.submit(c.post, "/generate", json={"class_label": 0, "seed": 100})
            wait_until(lambda: len(engine.batches) == 1)
            late = c.post("/generate", json={"class_label": 0, "seed": 500, "num_images": 3, "timeout_s": 0.2})
            assert late.status_code == 504 and late.json()["field"] == "timeout_s"
        finally:
            engine.gate.set()
        assert running.result().status_code == 200
        wait_until(lambda: srv.service.batcher.queue_depth == 0)
        assert not any(engine.ran(s) for s in (500, 501, 502))
        assert metric_value(c.get("/metrics").text, "lowdiff_images_dropped_total", {"reason": "deadline"}) == 3
        pool.shutdown()


def test_client_disconnect_cancels_unstarted_work() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    with live(engine, max_batch=1, max_delay_ms=0) as srv, srv.wait_ready().client() as c:
        pool = ThreadPoolExecutor(2)
        try:
            running = pool.submit(c.post, "/generate", json={"class_label": 0, "seed": 100})
            wait_until(lambda: len(engine.batches) == 1)
            with pytest.raises(httpx.ReadTimeout), srv.client(timeout=0.3) as impatient:
                impatient.post("/generate", json={"class_label": 0, "seed": 700, "num_images": 2})

            def dropped() -> float:
                return metric_value(c.get("/metrics").text, "lowdiff_images_dropped_total", {"reason": "disconnect"})

            wait_until(lambda: dropped() == 2)
        finally:
            engine.gate.set()
        assert running.result().status_code == 200
        assert not engine.ran(700) and not engine.ran(701)
        pool.shutdown()


def test_engine_failure_is_500_and_server_keeps_serving() -> None:
    engine = FakeEngine()
    engine.fail_seeds = {666}
    engine.gate.clear()
    with live(engine, max_batch=4, max_delay_ms=0) as srv, srv.wait_ready().client() as c:
        pool = ThreadPoolExecutor(3)
        try:
            first = pool.submit(c.post, "/generate", json={"class_label": 0, "seed": 1})
            wait_until(lambda: len(engine.batches) == 1)
            # Both wait for the engine, so they share the next batch, which fails.
            doomed = pool.submit(c.post, "/generate", json={"class_label": 0, "seed": 665, "num_images": 2})
            neighbour = pool.submit(c.post, "/generate", json={"class_label": 1, "seed": 20})
            wait_until(lambda: srv.service.batcher.queue_depth == 3)
        finally:
            engine.gate.set()
        assert first.result().status_code == 200
        for r in (doomed.result(), neighbour.result()):
            assert r.status_code == 500
            assert "injected engine failure" in r.json()["error"]
        assert sorted(engine.batches[1]) == [20, 665, 666]
        assert c.post("/generate", json={"class_label": 0, "seed": 1}).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert metric_value(c.get("/metrics").text, "lowdiff_batches_total", {"outcome": "error"}) == 1
        pool.shutdown()


def test_readiness_waits_for_warmup() -> None:
    engine = FakeEngine()
    engine.warmup_gate.clear()
    with live(engine) as srv, srv.client() as c:
        try:
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] in ("loading", "warming up")
            assert c.get("/healthz").status_code == 200  # alive while warming up
            busy = c.post("/generate", json={"class_label": 0, "seed": 1})
            assert busy.status_code == 503 and "retry-after" in busy.headers
        finally:
            engine.warmup_gate.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert engine.warmed_up
        assert c.post("/generate", json={"class_label": 0, "seed": 1}).status_code == 200


def test_draining_refuses_new_work() -> None:
    """In-process part of the drain (the SIGTERM path is test_service_drain.py)."""
    with live() as srv, srv.wait_ready().client() as c:
        srv.service.begin_drain()
        assert c.get("/readyz").status_code == 503
        assert c.post("/generate", json={"class_label": 0, "seed": 1}).status_code == 503
        assert c.get("/healthz").status_code == 200


def test_api_key() -> None:
    settings = ServeSettings()
    settings.api_key = "s3cret"
    with LiveServer(create_app(settings, engine=FakeEngine())) as srv, srv.wait_ready().client() as c:
        body = {"class_label": 0, "seed": 1}
        missing = c.post("/generate", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert c.post("/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes stay open
            assert c.get(open_path).status_code == 200


# ---------------------------------------------------------------------------- determinism
def test_determinism_under_concurrent_mixed_load() -> None:
    """A request's images equal the same request made alone, whatever shares its batches."""
    model = tiny_fast_model()
    requests = [
        {"class_label": k % 10, "seed": 1000 + 37 * k, "num_images": 1 + k % 3, "timeout_s": 300} for k in range(8)
    ]
    with (
        LiveServer(create_app(ServeSettings(max_batch=6, max_delay_ms=200), model=model)) as srv,
        srv.wait_ready(timeout=120).client(timeout=300) as c,
    ):
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda body: c.post("/generate", json=body), requests))
        assert all(r.status_code == 200 for r in together)
        batches = srv.service.batcher.batches_run
        assert batches < len(requests)  # requests really shared batches
        alone = [c.post("/generate", json=body) for body in requests]
    for body, mixed, single in zip(requests, together, alone):
        a = [decode_png(base64.b64decode(im["png_base64"])) for im in mixed.json()["images"]]
        b = [decode_png(base64.b64decode(im["png_base64"])) for im in single.json()["images"]]
        assert len(a) == body["num_images"]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # Not vacuous: different seeds give different pixels.
    first = [decode_png(base64.b64decode(im["png_base64"])) for im in together[2].json()["images"]]
    assert not np.array_equal(first[0], first[1])


# ---------------------------------------------------------------------------- metrics
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


def test_metrics_names_and_counts_move() -> None:
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


# ---------------------------------------------------------------------------- settings
def test_settings_from_flags_and_environment() -> None:
    import argparse

    from lowdiff.service.settings import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    env = {"LOWDIFF_MAX_BATCH": "16", "LOWDIFF_PORT": "9001", "LOWDIFF_API_KEY": "k", "LOWDIFF_MAX_DELAY_MS": "2.5"}
    s = resolve_settings(parser.parse_args(["--port", "9002"]), env)
    assert (s.max_batch, s.port, s.api_key, s.max_delay_ms) == (16, 9002, "k", 2.5)  # the flag wins
    with pytest.raises(SettingsError, match=r"^LOWDIFF_MAX_BATCH: must be ≥ 1"):
        resolve_settings(parser.parse_args([]), {"LOWDIFF_MAX_BATCH": "0"})
    with pytest.raises(SettingsError, match=r"^--max-queue"):
        resolve_settings(parser.parse_args(["--max-batch", "64", "--max-queue", "8"]), {})
    with pytest.raises(SettingsError, match=r"^--engine: unknown engine"):
        resolve_settings(parser.parse_args(["--engine", "warp-drive"]), {})
    with pytest.raises(SettingsError, match=r"^LOWDIFF_PORT: invalid value"):
        resolve_settings(parser.parse_args([]), {"LOWDIFF_PORT": "http"})


def test_serve_cli_bad_flags_exit_2(tmp_path, capsys) -> None:
    from lowdiff.cli import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch: must be ≥ 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "--checkpoint: checkpoint not found" in capsys.readouterr().err


def test_form_encoded_body_gets_a_content_type_hint(client) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl -d sends by default
    r = client.post("/generate", content=b'{"class_label": 1}', headers=form)
    assert r.status_code == 422 and r.json()["field"] == "body"
    assert "Content-Type: application/json" in r.json()["error"]


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_serves_real_engines(kind: str) -> None:
    """The tiny model through engines.load_engine, as `lowdiff serve --engine KIND` runs it."""
    if kind == "onnxruntime":
        pytest.importorskip("onnxruntime")
    settings = ServeSettings(engine=kind, max_batch=4)
    with LiveServer(create_app(settings, model=tiny_fast_model())) as srv, srv.wait_ready(120).client() as c:
        assert c.get("/v1/models").json()["engine"] == kind
        r = c.post("/generate", json={"class_label": 3, "seed": 4, "num_images": 2})
        assert r.status_code == 200, r.text
        a, b = (decode_png(base64.b64decode(im["png_base64"])) for im in r.json()["images"])
        assert a.shape == (32, 32) and not np.array_equal(a, b)
