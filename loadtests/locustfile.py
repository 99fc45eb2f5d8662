"""Locust users for LowDiff Serve: POST /generate with random class labels and seeds.

``GenerateUser`` is a ``FastHttpUser`` (geventhttpclient: more requests/s per core than the
python-requests ``HttpUser``). Two tasks, tagged so a run can pick one (``--tags single``): single
images as PNG bodies, and small batches as JSON. Every response is checked: status 200 and decodable
PNGs of the size the server's /v1/models announces; anything else is a failure.

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000

``LOWDIFF_API_KEY`` (if the server needs one) is sent as a bearer token; ``LOWDIFF_LOCUST_MAX_IMAGES``
bounds the small-batch task (default 4). When Locust warns that its CPU is saturated, add worker
processes (``--processes N``).
The concurrency sweeps use ``locust_sweep.py`` (single-image users and a stepped ``LoadTestShape``).
"""

from __future__ import annotations

import base64
import io
import os
import random

from locust import FastHttpUser, constant, tag, task
from PIL import Image

MAX_SEED = 2**32 - 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, fully decoded so that a truncated body fails."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


class ModelUser(FastHttpUser):
    """What the users here share (``locust_stream.py`` too): the model's description from /v1/models, the
    API key, request bodies with random seeds and class labels. Abstract: Locust never spawns it."""

    abstract = True
    wait_time = constant(0)  # closed loop: a user sends its next request when the last one is answered
    network_timeout = 600.0  # a loaded CPU server may take minutes; the server's own deadline decides

    def on_start(self) -> None:
        key = os.environ.get("LOWDIFF_API_KEY")
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        info = self.client.get("/v1/models", name="/v1/models", headers=self.auth).json()
        self.num_classes = int(info.get("num_classes") or 0) if info.get("conditional", True) else 0
        self.stage_resolutions = [int(r) for r in info["resolutions"]]
        # A latent model's stages are latent resolutions; its images have image_resolution.
        self.resolution = int(info.get("image_resolution") or self.stage_resolutions[-1])
        self.max_images = int(os.environ.get("LOWDIFF_LOCUST_MAX_IMAGES", "4"))

    def _body(self, num_images: int) -> dict[str, int]:
        body = {"seed": random.randint(0, MAX_SEED - num_images + 1), "num_images": num_images}
        if self.num_classes:
            body["class_label"] = random.randrange(self.num_classes)
        return body


class GenerateUser(ModelUser):
    """POST /generate: single images as PNG bodies, small batches as JSON."""

    @tag("single")
    @task(3)
    def single_png(self) -> None:
        headers = {**self.auth, "Accept": "image/png"}
        with self.client.post(
            "/generate", json=self._body(1), headers=headers, name="/generate [1, png]", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                size = png_size(r.content)
            except Exception as exc:  # noqa: BLE001 - any decode error is a failed request
                r.failure(f"bad PNG: {exc}")
                return
            if size != (self.resolution, self.resolution):
                r.failure(f"PNG is {size}, expected {self.resolution}²")

    @tag("batch")
    @task(1)
    def small_batch_json(self) -> None:
        count = random.randint(2, max(2, self.max_images))
        body = self._body(count)
        with self.client.post(
            "/generate", json=body, headers=self.auth, name="/generate [2-4, json]", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                images = r.json()["images"]
                seeds = [im["seed"] for im in images]
                sizes = [png_size(base64.b64decode(im["png_base64"])) for im in images]
            except Exception as exc:  # noqa: BLE001 - malformed body or PNG
                r.failure(f"bad response: {exc}")
                return
            if seeds != [body["seed"] + k for k in range(count)]:
                r.failure(f"seeds {seeds} do not follow {body['seed']}")
            elif any(s != (self.resolution, self.resolution) for s in sizes):
                r.failure(f"PNG sizes {sizes}")
