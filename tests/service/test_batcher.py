"""The batcher under overload and faults: 429 on a full queue, 504 past a deadline, cancelled work on
disconnect, an engine failure answered 500 while the server keeps serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_queue_full_is_429_and_accepted_work_survives(fake_engine, live, wait_until) -> None:
    engine = fake_engine()
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


def test_deadline_is_504_and_unstarted_work_dropped(fake_engine, live, wait_until, metric_value) -> None:
    engine = fake_engine()
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


def test_client_disconnect_cancels_unstarted_work(fake_engine, live, wait_until, metric_value) -> None:
    engine = fake_engine()
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


def test_engine_failure_is_500_and_server_keeps_serving(fake_engine, live, wait_until, metric_value) -> None:
    engine = fake_engine()
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
