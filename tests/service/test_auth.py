"""API-key authentication (middleware): bearer token on the API, probes and scrapes open."""

from __future__ import annotations

import pytest

from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_api_key(fake_engine, live_server) -> None:
    settings = ServeSettings()
    settings.api_key = "s3cret"
    with live_server(create_app(settings, engine=fake_engine())) as srv, srv.wait_ready().client() as c:
        body = {"class_label": 0, "seed": 1}
        missing = c.post("/generate", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert c.post("/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes stay open
            assert c.get(open_path).status_code == 200
