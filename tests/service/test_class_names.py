"""Class names: /v1/models lists them, class_label takes a name, errors list the valid ones, the
OpenAPI document offers them."""

from __future__ import annotations

import dataclasses

from lowdiff.configs import FASHION_MNIST_CLASSES
from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings


def test_names_in_models_requests_errors_and_schema(tiny_fast_model, live_server) -> None:
    model = tiny_fast_model()
    model.config = dataclasses.replace(model.config, class_names=FASHION_MNIST_CLASSES)
    app = create_app(ServeSettings(max_batch=4, max_delay_ms=0), model=model)
    with live_server(app) as server:
        server.wait_ready()
        with server.client() as client:
            info = client.get("/v1/models").json()
            assert info["class_names"] == list(FASHION_MNIST_CLASSES)
            by_name = client.post("/generate", json={"class_label": "sneaker", "seed": 3}).json()
            by_index = client.post("/generate", json={"class_label": 7, "seed": 3}).json()
            assert by_name["images"] == by_index["images"]
            assert by_name["images"][0]["class_label"] == 7 and by_name["images"][0]["class_name"] == "Sneaker"
            bad = client.post("/generate", json={"class_label": "Hat", "seed": 3})
            assert bad.status_code == 422 and bad.json()["field"] == "class_label"
            assert "'Ankle boot'" in bad.json()["error"]
            schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
            label = schema["properties"]["class_label"]
            assert {"type": "string", "enum": list(FASHION_MNIST_CLASSES)} in label["anyOf"]
