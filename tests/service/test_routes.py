"""The HTTP API on loopback: /generate (JSON, PNG, grids), seeds, info and health routes, request ids,
input validation naming the field, body limits, content negotiation."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from lowdiff.service.routes import wants_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generate_json(decode_png, client) -> None:
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


def test_generate_png_and_grid(decode_png, client) -> None:
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
        ('{"class_label": 1.5}', 422, "class_label"),  # 1.0 is the integer 1 (JSON numbers, since 3d1e5de)
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


def test_class_label_rejected_for_unconditional_model(fake_engine, live) -> None:
    with live(fake_engine(conditional=False)) as srv, srv.wait_ready().client() as c:
        r = c.post("/generate", json={"class_label": 0, "seed": 1})
        assert r.status_code == 422 and r.json()["field"] == "class_label"
        ok = c.post("/generate", json={"seed": 1})
        assert ok.status_code == 200 and ok.json()["images"][0]["class_label"] is None


def test_wants_png() -> None:
    assert wants_png("image/png")
    assert not wants_png(None) and not wants_png("application/json") and not wants_png("*/*")
    assert wants_png("image/png, application/json") and not wants_png("application/json, image/png")
    assert wants_png("application/json;q=0.5, image/png") and not wants_png("image/png;q=0")


def test_form_encoded_body_gets_a_content_type_hint(client) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl -d sends by default
    r = client.post("/generate", content=b'{"class_label": 1}', headers=form)
    assert r.status_code == 422 and r.json()["field"] == "body"
    assert "Content-Type: application/json" in r.json()["error"]
