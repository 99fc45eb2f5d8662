"""Content negotiation: an Accept the endpoint cannot serve is 406, naming what it serves."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("accept", ["image/jpeg", "text/html", "image/png;q=0, image/jpeg", "application/json;q=0"])
def test_unserved_accept_is_406_naming_the_served_types(client, accept: str) -> None:
    r = client.post("/generate", json={"class_label": 1, "seed": 0}, headers={"Accept": accept})
    assert r.status_code == 406, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["field"] == "Accept"
    assert "application/json" in body["error"] and "image/png" in body["error"]


@pytest.mark.parametrize(
    ("accept", "media"),
    [("image/jpeg, image/png;q=0.5", "image/png"), ("image/*", "image/png"), ("*/*", "application/json")],
)
def test_a_served_type_anywhere_in_accept_is_served(client, accept: str, media: str) -> None:
    r = client.post("/generate", json={"class_label": 1, "seed": 0}, headers={"Accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media
