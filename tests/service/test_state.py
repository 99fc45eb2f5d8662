"""The service's lifecycle in-process: not ready until warm-up ends, draining refuses new work."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_readiness_waits_for_warmup(fake_engine, live, wait_until) -> None:
    engine = fake_engine()
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


def test_draining_refuses_new_work(live) -> None:
    """In-process part of the drain (the SIGTERM path is tests/service/test_drain.py)."""
    with live() as srv, srv.wait_ready().client() as c:
        srv.service.begin_drain()
        assert c.get("/readyz").status_code == 503
        assert c.post("/generate", json={"class_label": 0, "seed": 1}).status_code == 503
        assert c.get("/healthz").status_code == 200
