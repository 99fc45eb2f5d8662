"""Locust users for the streaming endpoint: POST /generate/stream (Server-Sent Events), read as it arrives.

    locust -f loadtests/locust_stream.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000

Each request asks for 1–``LOWDIFF_LOCUST_MAX_IMAGES`` (default 4) images and reads the event stream line
by line. The request's own row times its headers (Locust does not time a streamed body); three more rows,
from sending the request: ``time to first preview``, ``time to first image`` and ``whole stream``. A stream
fails unless: status 200, every image's previews come before it, in stage order (one per hand-off of the
model /v1/models describes, or none for an engine without a per-stage entry point), every image arrives
once with its seed and a PNG of the announced size, and ``done`` ends the stream. A separate file from
``locustfile.py`` so that the plain runs' task mix stays as measured.
"""

from __future__ import annotations

import base64
import json
import random
import time
from typing import Any

from locust import task
from locustfile import ModelUser, png_size


class StreamUser(ModelUser):
    def _timing(self, name: str, seconds: float) -> None:
        self.environment.events.request.fire(
            request_type="SSE", name=name, response_time=seconds * 1000, response_length=0, exception=None,
            context={},
        )  # fmt: skip

    @task
    def stream(self) -> None:
        count = random.randint(1, max(1, self.max_images))
        body = self._body(count)
        headers = {**self.auth, "Accept": "text/event-stream"}
        sent = time.perf_counter()
        with self.client.post(
            "/generate/stream", json=body, headers=headers, name="/generate/stream", stream=True,
            catch_response=True,
        ) as r:  # fmt: skip
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
                return
            try:
                events = self._read(r, sent)
                problem = self._check(events, body, count)
            except Exception as exc:  # noqa: BLE001 - a malformed stream is a failed request
                problem = f"bad stream: {type(exc).__name__}: {exc}"
            if problem:
                r.failure(problem)
            else:  # a failed stream's time would skew the row
                self._timing("whole stream", time.perf_counter() - sent)

    def _read(self, response: Any, sent: float) -> list[tuple[str, dict]]:
        """The stream's (event, data) pairs; reports the first preview's and the first image's times."""
        events: list[tuple[str, dict]] = []
        name = ""
        for line in self._lines(response):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                if name in ("preview", "image") and not any(kind == name for kind, _ in events):
                    self._timing(f"time to first {name}", time.perf_counter() - sent)
                events.append((name, json.loads(line[len("data: ") :])))
                if name in ("done", "error"):
                    return events
        return events

    @staticmethod
    def _lines(response: Any) -> Any:
        """The body's lines as they arrive. geventhttpclient's ``readline`` splits at CRLF unless told
        otherwise, and SSE lines end in LF; it returns what the socket has, so a preview is seen when it
        arrives (a fixed-size ``read``/``iter_content`` waits for that many bytes)."""
        while True:
            raw = response.stream.readline(b"\n")
            if not raw:
                return
            yield raw.decode("utf-8").rstrip("\r\n")

    def _check(self, events: list[tuple[str, dict]], body: dict[str, Any], count: int) -> str | None:
        if not events or events[-1][0] != "done":
            return f"the stream ended with {events[-1][0] if events else 'nothing'}, not done"
        size = (self.resolution, self.resolution)
        hand_offs = self.stage_resolutions[:-1]
        for index in range(count):
            mine = [(kind, data) for kind, data in events if data.get("index") == index]
            kinds = [kind for kind, _ in mine]
            if kinds.count("image") != 1 or kinds[-1] != "image":
                return f"image {index}: events {kinds}"
            previews = [data["resolution"] for kind, data in mine if kind == "preview"]
            if previews not in ([], hand_offs):
                return f"image {index}: previews at {previews}, expected {hand_offs} (or none)"
            image = mine[-1][1]
            if image["seed"] != body["seed"] + index:
                return f"image {index}: seed {image['seed']}, expected {body['seed'] + index}"
            if png_size(base64.b64decode(image["png_base64"])) != size:
                return f"image {index}: PNG not {size}"
        return None
