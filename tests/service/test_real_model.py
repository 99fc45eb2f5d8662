"""The service in front of the real tiny model: determinism whatever shares a batch, real engines."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_determinism_under_concurrent_mixed_load(tiny_fast_model, live_server, decode_png) -> None:
    """A request's images equal the same request made alone, whatever shares its batches."""
    model = tiny_fast_model()
    requests = [
        {"class_label": k % 10, "seed": 1000 + 37 * k, "num_images": 1 + k % 3, "timeout_s": 300} for k in range(8)
    ]
    with (
        live_server(create_app(ServeSettings(max_batch=6, max_delay_ms=200), model=model)) as srv,
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


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_serves_real_engines(tiny_fast_model, live_server, decode_png, kind: str) -> None:
    """The tiny model through engines.load_engine, as `lowdiff serve --engine KIND` runs it."""
    if kind == "onnxruntime":
        pytest.importorskip("onnxruntime")
    settings = ServeSettings(engine=kind, max_batch=4)
    with live_server(create_app(settings, model=tiny_fast_model())) as srv, srv.wait_ready(120).client() as c:
        assert c.get("/v1/models").json()["engine"] == kind
        r = c.post("/generate", json={"class_label": 3, "seed": 4, "num_images": 2})
        assert r.status_code == 200, r.text
        a, b = (decode_png(base64.b64decode(im["png_base64"])) for im in r.json()["images"])
        assert a.shape == (32, 32) and not np.array_equal(a, b)
