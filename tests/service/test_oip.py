"""KServe's Open Inference Protocol v2 with a real client (tritonclient.http) against a live server:
health, metadata, inference equal to /generate pixel for pixel, v2 errors, the key, shared metrics."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def triton(srv) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=srv.url.removeprefix("http://"), network_timeout=300)


def inputs(labels: list[int] | None, seeds: list[int], binary: bool = False) -> list:
    out = []
    if labels is not None:
        label = httpclient.InferInput("class_label", [len(labels)], "INT32")
        label.set_data_from_numpy(np.array(labels, dtype=np.int32), binary_data=binary)
        out.append(label)
    seed = httpclient.InferInput("seed", [len(seeds)], "INT64")
    seed.set_data_from_numpy(np.array(seeds, dtype=np.int64), binary_data=binary)
    out.append(seed)
    return out


@pytest.fixture(scope="module")
def tiny_server(live_server, tiny_fast_model):
    """The real tiny model (class-conditional, 10 classes, 1×32×32) behind a live server."""
    with live_server(create_app(ServeSettings(max_batch=4, timeout_s=300), model=tiny_fast_model())) as srv:
        srv.wait_ready(timeout=120)
        yield srv


def test_server_and_model_metadata(tiny_server) -> None:
    client = triton(tiny_server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "lowdiff-serve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["platform"] == "lowdiff" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "class_label", "datatype": "INT32", "shape": [-1]},
        {"name": "seed", "datatype": "INT64", "shape": [-1]},
    ]
    assert meta["outputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 32, 32]}]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_generate(tiny_server, decode_png, binary: bool) -> None:
    """Per-image (class, seed) through v2 gives the pixels /generate gives for the same (class, seed)."""
    labels, seeds = [3, 3, 7], [11, 12, 40]
    client = triton(tiny_server)
    outputs = [httpclient.InferRequestedOutput("image", binary_data=binary)]
    result = client.infer("tiny", inputs(labels, seeds, binary), outputs=outputs, request_id="req-1")
    images = result.as_numpy("image")
    assert images.dtype == np.uint8 and images.shape == (3, 1, 32, 32)
    assert result.get_response()["id"] == "req-1"
    with tiny_server.client(timeout=300) as c:
        for label, seed, image in zip(labels, seeds, images):
            r = c.post("/generate", json={"class_label": label, "seed": seed})
            assert r.status_code == 200, r.text
            expected = decode_png(base64.b64decode(r.json()["images"][0]["png_base64"]))
            np.testing.assert_array_equal(image[0], expected)
    assert not np.array_equal(images[0], images[1])  # not vacuous


def test_infer_default_outputs_are_binary_and_equal(tiny_server) -> None:
    """tritonclient's defaults (binary inputs, all outputs binary) give the same pixels as JSON."""
    client = triton(tiny_server)
    binary = client.infer("tiny", inputs([5], [99], binary=True)).as_numpy("image")
    plain = client.infer(
        "tiny", inputs([5], [99]), outputs=[httpclient.InferRequestedOutput("image", binary_data=False)]
    ).as_numpy("image")
    np.testing.assert_array_equal(binary, plain)


def test_v2_errors(tiny_server) -> None:
    client = triton(tiny_server)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", inputs([1], [1]))
    assert unknown.value.status() == "404" and "nope" in unknown.value.message()
    with pytest.raises(InferenceServerException) as bad_label:
        client.infer("tiny", inputs([12], [1]))
    assert bad_label.value.status() == "400" and "class_label" in bad_label.value.message()

    url = tiny_server.url + "/v2/models/tiny/infer"

    def post(*tensors: dict) -> httpx.Response:
        return httpx.post(url, json={"inputs": list(tensors)}, timeout=60)

    label = {"name": "class_label", "shape": [1], "datatype": "INT32", "data": [1]}
    seed = {"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]}
    cases = {
        "seed": [
            post(label, {**seed, "datatype": "FP32"}),  # wrong datatype
            post(label, {**seed, "shape": [2]}),  # shape mismatch
            post(label),  # missing input
            post(label, {**seed, "data": [2**32]}),  # out of the seed range
            post(label, {**seed, "data": [1.5]}),  # not an integer
        ],
        "class_label": [
            post({**label, "shape": [2], "data": [1, 2]}, seed),  # mixed lengths
            post(seed),  # required for a conditional model
        ],
        "colour": [post(label, seed, {"name": "colour", "shape": [1], "datatype": "INT32", "data": [1]})],
    }
    for name, responses in cases.items():
        for r in responses:
            assert r.status_code == 400, r.text
            assert r.json()["error"].startswith(f"{name}: "), r.json()
            assert r.json()["field"] == name
    unknown_model = httpx.get(tiny_server.url + "/v2/models/nope", timeout=60)
    assert unknown_model.status_code == 404 and "nope" in unknown_model.json()["error"]


def test_api_key_and_metrics(fake_engine, live_server, metric_value) -> None:
    settings = ServeSettings()
    settings.api_key = "s3cret"
    with live_server(create_app(settings, engine=fake_engine())) as srv:
        srv.wait_ready()
        client = triton(srv)
        assert client.is_server_live() and client.is_server_ready()  # probes stay open
        assert client.is_model_ready("fake")
        with pytest.raises(InferenceServerException) as refused:
            client.infer("fake", inputs([1], [2]))
        assert refused.value.status() == "401"
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("fake", headers={"Authorization": "Bearer nope"})
        key = {"Authorization": "Bearer s3cret"}
        assert client.get_model_metadata("fake", headers=key)["name"] == "fake"
        image = client.infer("fake", inputs([1, 2], [2, 3]), headers=key).as_numpy("image")
        assert image.shape == (2, 1, 32, 32)
        with srv.client(headers=key) as c:
            text = c.get("/metrics").text
    infer = {"endpoint": "/v2/models/{name}/infer"}
    assert metric_value(text, "lowdiff_requests_total", {**infer, "status": "200"}) == 1
    assert metric_value(text, "lowdiff_requests_total", {**infer, "status": "401"}) == 1
    assert metric_value(text, "lowdiff_requests_total", {"endpoint": "/v2/health/ready", "status": "200"}) >= 1
    assert metric_value(text, "lowdiff_images_generated_total") >= 2  # the batcher ran them


def test_backpressure_is_shared_with_generate(fake_engine, live_server, wait_until) -> None:
    """/generate and v2 infer share one queue: behind a held /generate, v2 is refused 429 + Retry-After."""
    engine = fake_engine()
    with live_server(create_app(ServeSettings(max_queue=2, max_batch=1), engine=engine)) as srv:
        srv.wait_ready()
        engine.gate.clear()
        with ThreadPoolExecutor(1) as pool, srv.client() as c:
            held = pool.submit(c.post, "/generate", json={"class_label": 0, "seed": 1, "num_images": 2})
            try:
                wait_until(lambda: srv.service.batcher.queue_depth == 1 and engine.batches)  # 1 running, 1 queued
                with pytest.raises(InferenceServerException) as full:
                    triton(srv).infer("fake", inputs([0, 0], [5, 6]))
                assert full.value.status() == "429"
            finally:
                engine.gate.set()
            assert held.result(timeout=60).status_code == 200


def test_oip_paths_are_in_the_openapi_document(fake_engine) -> None:
    open_doc = create_app(ServeSettings(), engine=fake_engine()).openapi()
    paths = ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready")
    for path in paths:
        assert "get" in open_doc["paths"][path], path
    infer = open_doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert "inputs" in infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"200", "400", "404", "429", "503", "504"} <= set(infer["responses"]) and "401" not in infer["responses"]
    keyed = ServeSettings()
    keyed.api_key = "s3cret"
    keyed_doc = create_app(keyed, engine=fake_engine()).openapi()
    assert keyed_doc["paths"]["/v2/models/{name}/infer"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in keyed_doc["paths"]["/v2/health/ready"]["get"]
    assert keyed_doc["paths"]["/v2/models/{name}"]["get"]["parameters"][0]["name"] == "name"


def test_versioned_paths_serve_version_1_and_refuse_others(fake_engine, live_server) -> None:
    with live_server(create_app(ServeSettings(), engine=fake_engine())) as srv:
        srv.wait_ready()
        client = triton(srv)
        plain = client.infer("fake", inputs([1, 2], [2, 3])).as_numpy("image")
        versioned = client.infer("fake", inputs([1, 2], [2, 3]), model_version="1").as_numpy("image")
        assert (plain == versioned).all()
        assert client.get_model_metadata("fake", model_version="1")["versions"] == ["1"]
        assert client.is_model_ready("fake", model_version="1")
        with pytest.raises(InferenceServerException) as other:
            client.infer("fake", inputs([1], [2]), model_version="2")
        assert other.value.status() == "404" and "version" in other.value.message()
        r = httpx.get(srv.url + "/v2/models/fake/versions/7", timeout=60)
        assert r.status_code == 404 and r.json()["field"] == "version"
    doc = create_app(ServeSettings(), engine=fake_engine()).openapi()["paths"]
    for path, method in (("", "get"), ("/ready", "get"), ("/infer", "post")):
        params = doc["/v2/models/{name}/versions/{version}" + path][method]["parameters"]
        assert [p["name"] for p in params] == ["name", "version"]
