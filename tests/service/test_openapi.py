"""The OpenAPI document describes this server: its model's request schema, its statuses, its key."""

from __future__ import annotations

import pytest

from lowdiff.requests import MAX_SEED
from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def document(engine=None, model=None, api_key: str | None = None, **settings: object) -> dict:
    s = ServeSettings(**settings)
    s.api_key = api_key
    return create_app(s, engine=engine, model=model).openapi()


def operation(doc: dict, method: str, path: str) -> dict:
    return doc["paths"][path][method]


def request_schema(doc: dict) -> dict:
    return doc["components"]["schemas"]["GenerateRequest"]


def test_metrics_is_documented_as_prometheus_text(fake_engine) -> None:
    responses = operation(document(fake_engine()), "get", "/metrics")["responses"]
    assert list(responses["200"]["content"]) == ["text/plain"]
    assert responses["200"]["content"]["text/plain"]["schema"] == {"type": "string"}


def test_401_and_the_security_scheme_only_when_the_server_has_a_key(fake_engine) -> None:
    open_doc = document(fake_engine())
    keyed_doc = document(fake_engine(), api_key="s3cret")
    for method, path in (("post", "/generate"), ("get", "/v1/models")):
        assert "401" not in operation(open_doc, method, path)["responses"]
        assert "security" not in operation(open_doc, method, path)
        keyed = operation(keyed_doc, method, path)
        assert keyed["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
        assert keyed["security"] == [{"HTTPBearer": []}]
    assert "securitySchemes" not in open_doc.get("components", {})
    assert keyed_doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in ("/healthz", "/readyz", "/metrics"):  # open with or without a key
        assert "401" not in operation(keyed_doc, "get", path)["responses"]
        assert "security" not in operation(keyed_doc, "get", path)


def test_every_status_an_endpoint_answers_is_documented_with_its_body(fake_engine) -> None:
    doc = document(fake_engine())
    generate = operation(doc, "post", "/generate")["responses"]
    assert set(generate) == {"200", "400", "406", "408", "413", "422", "429", "500", "503", "504"}
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for status in ("400", "406", "408", "413", "422", "429", "500", "503", "504"):
        assert generate[status]["content"]["application/json"]["schema"] == error_ref, status
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # 422 is ours, not FastAPI's
    assert generate["429"]["headers"]["Retry-After"]["required"] is True
    assert set(generate["200"]["content"]) == {"application/json", "image/png"}
    assert "text/plain" in generate["503"]["content"]  # uvicorn's own answer past --max-connections
    assert set(operation(doc, "get", "/v1/models")["responses"]) == {"200", "503"}
    for probe, body in (("/healthz", "HealthBody"), ("/readyz", "ReadyBody")):
        responses = operation(doc, "get", probe)["responses"]
        assert set(responses) == {"200", "503"}
        assert responses["503"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}


def test_request_schema_of_a_conditional_model(fake_engine) -> None:
    schema = request_schema(document(fake_engine(num_classes=7), max_queue=100, max_timeout_s=600))
    label = schema["properties"]["class_label"]
    assert "class_label" in schema["required"]  # so {} is no longer schema-valid
    assert (label["type"], label["minimum"], label["maximum"]) == ("integer", 0, 6)
    assert "anyOf" not in label  # null is not a class label of a conditional model
    assert schema["properties"]["num_images"]["maximum"] == 64
    assert schema["properties"]["timeout_s"]["anyOf"][0] == {"type": "number", "minimum": 0.1, "maximum": 600}
    assert schema["additionalProperties"] is False


def test_request_schema_of_an_unconditional_model(fake_engine) -> None:
    schema = request_schema(document(fake_engine(conditional=False)))
    assert schema["properties"]["class_label"]["type"] == "null"
    assert "class_label" not in schema.get("required", [])  # {} is valid: every field has a default


def test_request_schema_from_a_model_and_from_the_server_limits(tiny_model) -> None:
    schema = request_schema(document(model=tiny_model, max_batch=8, max_queue=16))
    assert schema["properties"]["class_label"]["maximum"] == tiny_model.config.num_classes - 1
    assert schema["properties"]["num_images"]["maximum"] == 16  # a server that queues 16 images


def seed_limit(schema: dict, num_images: int) -> int:
    """The largest seed the schema allows with this num_images (through its anyOf of bounds)."""
    fitting = [
        branch["properties"]["seed"]["maximum"]
        for branch in schema["anyOf"]
        if branch["properties"]["num_images"]["maximum"] >= num_images
    ]
    return max(fitting)


def test_seed_plus_num_images_stays_in_the_seed_range(fake_engine) -> None:
    schema = request_schema(document(fake_engine()))
    assert seed_limit(schema, 1) == MAX_SEED
    assert seed_limit(schema, 2) == MAX_SEED - 1
    assert seed_limit(schema, 64) == MAX_SEED - 63


def test_schema_valid_bodies_are_accepted(fake_engine, live) -> None:
    """The boundaries the document states are the server's: at the bound 200, past it 422."""
    with live(fake_engine(num_classes=7), max_queue=100) as srv, srv.wait_ready().client() as c:
        doc = c.get("/openapi.json").json()
        assert request_schema(doc)["properties"]["class_label"]["maximum"] == 6
        accepted = [
            {"class_label": 6, "seed": MAX_SEED},
            {"class_label": 0, "seed": MAX_SEED - 1, "num_images": 2},
            {"class_label": 3.0, "seed": 1.0, "num_images": 2.0},  # JSON integers, as the schema's "integer"
            {"class_label": 1, "timeout_s": 0.1 + 1e-9},
        ]
        for body in accepted:
            r = c.post("/generate", json=body)
            assert r.status_code in (200, 504), (body, r.text)  # 504: a 0.1 s deadline may pass
        refused = [
            ({}, "class_label"),
            ({"class_label": 7}, "class_label"),
            ({"class_label": 0, "seed": MAX_SEED, "num_images": 2}, "seed"),
            ({"class_label": 1.5}, "class_label"),
            ({"class_label": "1"}, "class_label"),
            ({"class_label": 1, "timeout_s": 3601}, "timeout_s"),
        ]
        for body, field in refused:
            r = c.post("/generate", json=body)
            assert (r.status_code, r.json()["field"]) == (422, field), (body, r.text)
