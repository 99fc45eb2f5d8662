"""POST /generate/stream: Server-Sent Events — previews at every hand-off before the image, the image
equal to /generate's (same PNG bytes), a done event; bad bodies refused like /generate's."""

from __future__ import annotations

import json
import time

import pytest

from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.fixture(scope="module", params=["staged", "cascade"])
def model_server(request, tiny_fast_model, live_server):
    """A real (tiny) model behind either scheduler: both make previews (the cascade batcher runs a batch
    holding a stream's images one stage per engine call)."""
    settings = ServeSettings(scheduler=request.param, max_batch=4, timeout_s=120)
    with live_server(create_app(settings, model=tiny_fast_model())) as srv:
        srv.wait_ready(120)
        yield srv


def test_previews_come_before_the_image_and_the_image_is_generates(model_server, metric_value) -> None:
    body = {"class_label": 2, "seed": 77, "num_images": 2}
    with model_server.client() as c:
        r = c.post("/generate/stream", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        plain = c.post("/generate", json=body).json()
        metrics = c.get("/metrics").text
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("image") == 2
    for index in (0, 1):
        mine = [(k, e) for k, e in events if e.get("index") == index]
        previews = [e for k, e in mine if k == "preview"]
        # One preview per hand-off (8→16, 16→32), in stage order, all before the image.
        assert [p["resolution"] for p in previews] == [8, 16]
        assert [k for k, _ in mine] == ["preview", "preview", "image"]
        stages = model_server.service.model.config.schedule.stages
        assert [p["sigma"] for p in previews] == pytest.approx([float(s.sigmas()[-1]) for s in stages[:2]])
        assert all(p["seed"] == 77 + index and p["class_label"] == 2 for p in previews)
        image = next(e for k, e in mine if k == "image")
        expected = dict(plain["images"][index])
        assert {k: v for k, v in image.items() if k != "index"} == expected  # same PNG bytes, same fields
        assert previews[1]["png_base64"] != image["png_base64"]
    done = events[-1][1]
    assert done["model"] == "tiny" and done["timings"]["total_s"] > 0
    assert metric_value(metrics, "lowdiff_time_to_first_preview_seconds_count") >= 1


def test_stream_refuses_bad_bodies_like_generate(model_server) -> None:
    with model_server.client() as c:
        r = c.post("/generate/stream", json={"class_label": 99, "seed": 1})
        assert r.status_code == 422 and r.json()["field"] == "class_label"
        r = c.post("/generate/stream", json={"class_label": 1, "num_images": 0})
        assert r.status_code == 422


def test_an_engine_without_the_stage_api_streams_images_without_previews(fake_engine, live) -> None:
    """FakeEngine has ``generate`` only: no hand-off to show, the stream carries the images."""
    with live(fake_engine(), max_queue=16) as srv, srv.wait_ready().client() as c:
        events = parse_sse(c.post("/generate/stream", json={"class_label": 1, "seed": 5, "num_images": 3}).text)
        plain = c.post("/generate", json={"class_label": 1, "seed": 5, "num_images": 3}).json()
    assert [k for k, _ in events] == ["image", "image", "image", "done"]
    assert sorted(e["seed"] for k, e in events if k == "image") == [5, 6, 7]
    for _, e in events[:-1]:
        assert {key: v for key, v in e.items() if key != "index"} == plain["images"][e["index"]]


def test_disconnect_cancels_the_remaining_work(fake_engine, live, wait_until, metric_value) -> None:
    engine = fake_engine()
    with live(engine, max_queue=16, max_batch=1) as srv, srv.wait_ready().client() as c:
        engine.gate.clear()  # the first image's batch holds the engine
        with c.stream("POST", "/generate/stream", json={"class_label": 1, "seed": 40, "num_images": 4}) as r:
            assert r.status_code == 200
            wait_until(lambda: engine.ran(40))
        # the client went away with images 41…43 still queued
        wait_until(
            lambda: metric_value(c.get("/metrics").text, "lowdiff_images_dropped_total", {"reason": "disconnect"}) >= 3
        )
        engine.gate.set()
        time.sleep(0.2)
        assert not any(engine.ran(s) for s in (41, 42, 43))


def test_failures_after_the_stream_began_are_error_events(fake_engine, live) -> None:
    engine = fake_engine()
    engine.fail_seeds = {60}
    with live(engine, max_queue=16) as srv, srv.wait_ready().client() as c:
        events = parse_sse(c.post("/generate/stream", json={"class_label": 1, "seed": 60}).text)
        assert [k for k, _ in events] == ["error"]
        assert events[0][1]["status"] == 500 and "injected engine failure" in events[0][1]["error"]
        engine.gate.clear()  # nothing finishes: the deadline ends the stream
        events = parse_sse(c.post("/generate/stream", json={"class_label": 1, "seed": 70, "timeout_s": 0.3}).text)
        engine.gate.set()
        assert events == [("error", {"status": 504, "error": "timeout_s: not done within 0.3 s", "field": "timeout_s"})]
        assert srv.service.in_flight == 0
