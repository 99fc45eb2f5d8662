"""`lowdiff serve` with a latent model: decoded RGB images, the same whatever shares a batch, with either
scheduler; the decode stage shows in the per-stage metrics under its image size."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("scheduler", ["cascade", "staged"])
def test_serves_a_latent_model(tiny_latent_model, live_server, decode_png, metric_value, scheduler: str) -> None:
    model = tiny_latent_model(guidance_scale=2.0)
    settings = ServeSettings(engine="torch", max_batch=4, scheduler=scheduler)
    with live_server(create_app(settings, model=model)) as srv, srv.wait_ready(120).client() as c:
        info = c.get("/v1/models").json()
        assert (info["image_channels"], info["image_resolution"]) == (3, 16)
        r = c.post("/generate", json={"class_label": 3, "seed": 4, "num_images": 3})
        assert r.status_code == 200, r.text
        images = [decode_png(base64.b64decode(im["png_base64"])) for im in r.json()["images"]]
        alone = c.post("/generate", json={"class_label": 3, "seed": 5, "num_images": 1})
        metrics = c.get("/metrics").text
    assert images[0].shape == (16, 16, 3) and not np.array_equal(images[0], images[2])
    expected = model.generate([4, 5, 6], [3, 3, 3])
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(got, want.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(decode_png(base64.b64decode(alone.json()["images"][0]["png_base64"])), images[1])
    assert metric_value(metrics, "lowdiff_stage_duration_seconds_count", {"resolution": "16"}) >= 1
