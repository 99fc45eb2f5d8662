"""KServe's Open Inference Protocol v2 (REST), beside ``/generate``: what KServe, Triton's clients
(``tritonclient.http``) and other v2 tools speak.

``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{name}``
(model metadata), ``/v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer``. The model is the
served one (its name is ``engine_info.model``); its inputs are ``class_label`` INT32 ``[N]``
(class-conditional models only) and ``seed`` INT64 ``[N]``, one per image; its output ``image`` is
UINT8 ``[N, C, H, W]`` — the same pixels as ``/generate`` for the same (class, seed).

An inference goes the way of ``/generate``: the same bearer key, validation by
:mod:`lowdiff.requests`, the batcher's submit/await path (:func:`.routes.await_images`: batching,
the server's default deadline, 429 when the queue is full), the same metrics. Requests and answers
are the v2 JSON tensor format; the binary tensor data extension (``Inference-Header-Content-Length``)
is accepted for inputs and used for the output when asked (``binary_data_output`` or the output's
``binary_data`` parameter), as tritonclient does by default. Errors are the v2 ``{"error": …}`` object
(with this server's ``field`` and ``request_id`` beside it); a bad tensor is a 400 naming its input.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lowdiff.errors import LowDiffError
from lowdiff.requests import MAX_IMAGES_PER_REQUEST, check_class_labels, check_seeds
from lowdiff.service.errors import APIError
from lowdiff.service.openapi import RETRY_AFTER, auth_responses, error_doc
from lowdiff.service.routes import api_key_dependencies, await_images, check_accepting
from lowdiff.service.schemas import MIN_TIMEOUT_S
from lowdiff.service.state import Service, package_version

PLATFORM = "lowdiff"
VERSION = "1"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
INPUT_TYPES = {"class_label": "INT32", "seed": "INT64"}
INT_RANGES = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}
NUMPY_TYPES = {"INT32": "<i4", "INT64": "<i8"}
STRING = {"type": "string"}

_TENSOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "row-major, flat or nested"},
    },
}
_METADATA_TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "timeout_s": {"type": "number", "description": "deadline in seconds (default: the server's)"},
            },
        },
        "inputs": {
            "type": "array",
            "items": _TENSOR_SCHEMA,
            "description": "seed INT64 [N] (required) and class_label INT32 [N] (class-conditional models)",
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "enum": ["image"]}, "parameters": {"type": "object"}},
            },
        },
    },
}
INFER_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "outputs": {"type": "array", "items": _TENSOR_SCHEMA},
    },
}
MODEL_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": _METADATA_TENSOR},
        "outputs": {"type": "array", "items": _METADATA_TENSOR},
    },
}


# The model name is read from the path, not declared as a parameter: FastAPI would then document a
# 422 (HTTPValidationError) that no v2 route answers; the parameter is documented here instead.
NAME_PARAMETER = {"parameters": [{"name": "name", "in": "path", "required": True, "schema": STRING}]}
# The protocol's versioned paths (/v2/models/{name}/versions/{version}/…): the one version is VERSION.
VERSION_PARAMETERS = {
    "parameters": [*NAME_PARAMETER["parameters"], {"name": "version", "in": "path", "required": True, "schema": STRING}]
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise APIError(400, f"{name}: data must be an array", name)
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item, name) if isinstance(item, list) else [item])
    return out


def _tensor_values(tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[list[int], int]:
    """One input's integers (validated against its declared name, datatype and shape) and the offset
    of the next input's binary data."""
    name = tensor["name"]
    expected = INPUT_TYPES[name]
    datatype = tensor.get("datatype")
    if datatype != expected:
        raise APIError(400, f"{name}: datatype must be {expected}, got {datatype!r}", name)
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 1
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise APIError(400, f"{name}: shape must be [N] (one value per image), got {shape!r}", name)
    count = shape[0]
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise APIError(400, f"{name}: parameters must be an object", name)
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise APIError(400, f"{name}: both data and binary_data_size given", name)
        width = np.dtype(NUMPY_TYPES[expected]).itemsize
        if isinstance(size, bool) or not isinstance(size, int) or size != count * width:
            raise APIError(400, f"{name}: binary_data_size must be {count * width} for shape {shape}, got {size}", name)
        if offset + size > len(binary):
            raise APIError(400, f"{name}: the binary data ends before this input's {size} bytes", name)
        values = np.frombuffer(binary, dtype=NUMPY_TYPES[expected], count=count, offset=offset).tolist()
        return values, offset + size
    if "data" not in tensor:
        raise APIError(400, f"{name}: data is missing", name)
    values = _flatten(tensor["data"], name)
    if len(values) != count:
        raise APIError(400, f"{name}: shape {shape} holds {count} values, data has {len(values)}", name)
    low, high = INT_RANGES[expected]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise APIError(400, f"{name}: {expected} data must be integers, got {v!r}", name)
        if not low <= v <= high:
            raise APIError(400, f"{name}: {v} does not fit {expected}", name)
    return values, offset


def parse_infer_body(raw: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary data after it (binary tensor data extension)."""
    binary = b""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(raw):
            raise APIError(400, f"Inference-Header-Content-Length: {header_length!r} is not a length within the body")
        raw, binary = raw[: int(header_length)], raw[int(header_length) :]
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"body: not a JSON inference request ({type(exc).__name__})", "body") from None
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object", "body")
    return body, binary


def add_oip_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings
    keyed = api_key_dependencies(settings)
    auth = auth_responses(settings)
    not_ready = error_doc("not ready (loading, warming up, engine failed) or shutting down")
    unknown = error_doc("no model of that name: this server serves one model (GET /v1/models)")
    max_images = min(MAX_IMAGES_PER_REQUEST, settings.max_queue)

    def served(request: Request) -> Any:
        info = service.engine_info
        if info is None:
            raise APIError(503, f"not ready ({service.state})", None, {"Retry-After": "5"})
        name = request.path_params["name"]
        if name != info.model:
            raise APIError(404, f"model {name!r} not found; this server serves {info.model!r}", "name")
        version = request.path_params.get("version", VERSION)
        if version != VERSION:
            raise APIError(404, f"model {name!r} has no version {version!r}; its versions: [{VERSION!r}]", "version")
        return info

    @app.get(
        "/v2",
        tags=["Open Inference Protocol v2"],
        responses={
            200: _json(
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "extensions": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "server metadata",
            )
        },
    )
    async def server_metadata() -> JSONResponse:
        """Server metadata: name, version, extensions."""
        return JSONResponse({"name": "lowdiff-serve", "version": package_version(), "extensions": EXTENSIONS})

    ready_body = {"type": "object", "properties": {"live": {"type": "boolean"}, "ready": {"type": "boolean"}}}

    @app.get(
        "/v2/health/live",
        tags=["Open Inference Protocol v2"],
        responses={200: _json(ready_body, "live"), 503: _json(ready_body, "the engine failed to load")},
    )
    async def server_live() -> JSONResponse:
        """Liveness (as /healthz): 200 while the process serves; 503 if the engine failed to load."""
        live = service.state != "failed"
        return JSONResponse({"live": live}, status_code=200 if live else 503)

    @app.get(
        "/v2/health/ready",
        tags=["Open Inference Protocol v2"],
        responses={200: _json(ready_body, "ready"), 503: _json(ready_body, "loading, warming up, draining or failed")},
    )
    async def server_ready() -> JSONResponse:
        """Readiness (as /readyz): 200 once the engine is loaded and warmed up; 503 before and while draining."""
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    metadata_responses = {200: _json(MODEL_METADATA_SCHEMA, "model metadata"), **auth, 404: unknown, 503: not_ready}

    @app.get(
        "/v2/models/{name}",
        tags=["Open Inference Protocol v2"],
        dependencies=keyed,
        openapi_extra=NAME_PARAMETER,
        responses=metadata_responses,
    )
    @app.get(
        "/v2/models/{name}/versions/{version}",
        tags=["Open Inference Protocol v2"],
        dependencies=keyed,
        openapi_extra=VERSION_PARAMETERS,
        responses=metadata_responses,
    )
    async def model_metadata(request: Request) -> JSONResponse:
        """Model metadata: inputs class_label INT32 [-1] (class-conditional models) and seed INT64 [-1];
        output image UINT8 [-1, C, H, W]."""
        info = served(request)
        inputs = [{"name": "seed", "datatype": "INT64", "shape": [-1]}]
        if info.conditional:
            inputs.insert(0, {"name": "class_label", "datatype": "INT32", "shape": [-1]})
        image = {"name": "image", "datatype": "UINT8", "shape": [-1, info.image_channels, *[info.image_resolution] * 2]}
        return JSONResponse(
            {"name": info.model, "versions": [VERSION], "platform": PLATFORM, "inputs": inputs, "outputs": [image]}
        )

    ready_responses = {200: _json(ready_body, "ready"), 404: unknown, 503: _json(ready_body, "not ready")}

    @app.get(
        "/v2/models/{name}/ready",
        tags=["Open Inference Protocol v2"],
        openapi_extra=NAME_PARAMETER,
        responses=ready_responses,
    )
    @app.get(
        "/v2/models/{name}/versions/{version}/ready",
        tags=["Open Inference Protocol v2"],
        openapi_extra=VERSION_PARAMETERS,
        responses=ready_responses,
    )
    async def model_ready(request: Request) -> JSONResponse:
        """Model readiness: the server's (it serves one model)."""
        name = request.path_params["name"]
        if service.engine_info is not None:
            served(request)
        return JSONResponse({"name": name, "ready": service.ready}, status_code=200 if service.ready else 503)

    infer_request = {"required": True, "content": {"application/json": {"schema": INFER_REQUEST_SCHEMA}}}
    infer_responses: dict[int | str, Any] = {
        200: {
            **_json(INFER_RESPONSE_SCHEMA, "output image UINT8 [N, C, H, W]"),
            "headers": {"Server-Timing": {"description": "queue and compute time (ms)", "schema": STRING}},
        },
        400: error_doc("a bad tensor (datatype, shape, missing input, value out of range), named in `field`"),
        **auth,
        404: unknown,
        408: error_doc("the request body was not received within --body-timeout-s"),
        413: error_doc("body larger than --max-body-bytes"),
        429: error_doc(
            "more than --max-queue images queued; retry after Retry-After seconds",
            headers={"Retry-After": {**RETRY_AFTER, "required": True}},
        ),
        500: error_doc("the engine failed on a batch holding this request"),
        503: not_ready,
        504: error_doc("not done within the server's --timeout-s (or parameters.timeout_s)"),
    }

    @app.post(
        "/v2/models/{name}/infer",
        tags=["Open Inference Protocol v2"],
        dependencies=keyed,
        openapi_extra={**NAME_PARAMETER, "requestBody": infer_request},
        responses=infer_responses,
    )
    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["Open Inference Protocol v2"],
        dependencies=keyed,
        openapi_extra={**VERSION_PARAMETERS, "requestBody": infer_request},
        responses=infer_responses,
    )
    async def infer(request: Request) -> Response:
        """Generate one image per (class_label, seed): v2 JSON tensors (or binary tensor data) in,
        output image UINT8 [N, C, H, W] out."""
        accepted = time.monotonic()
        info = served(request)
        body, binary = parse_infer_body(await request.body(), request.headers.get(HEADER_LENGTH))
        batcher = check_accepting(service)

        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise APIError(400, "parameters: must be an object", "parameters")
        timeout = parameters.get("timeout_s", settings.timeout_s)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise APIError(400, "timeout_s: must be a number of seconds", "timeout_s")
        if not MIN_TIMEOUT_S <= timeout <= settings.max_timeout_s:
            raise APIError(400, f"timeout_s: must be in {MIN_TIMEOUT_S:g}…{settings.max_timeout_s:g}", "timeout_s")
        request_id = body.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise APIError(400, "id: must be a string", "id")

        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise APIError(400, "inputs: a non-empty array of tensors is required", "inputs")
        values: dict[str, list[int]] = {}
        offset = 0
        for tensor in inputs:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise APIError(400, "inputs: each input is an object with a name, shape, datatype and data", "inputs")
            input_name = tensor["name"]
            if input_name not in INPUT_TYPES or (input_name == "class_label" and not info.conditional):
                names = [n for n in INPUT_TYPES if n != "class_label" or info.conditional]
                takes = ", ".join(f"{n} ({INPUT_TYPES[n]})" for n in names)
                raise APIError(400, f"{input_name}: unknown input; {info.model} takes {takes}", input_name)
            if input_name in values:
                raise APIError(400, f"{input_name}: given twice", input_name)
            values[input_name], offset = _tensor_values(tensor, binary, offset)
        if "seed" not in values:
            raise APIError(400, "seed: required input (INT64 [N], one per image)", "seed")
        seeds = values["seed"]
        count = len(seeds)
        if not 1 <= count <= max_images:
            raise APIError(400, f"seed: this server takes 1…{max_images} images per request, got {count}", "seed")

        binary_output = parameters.get("binary_data_output") is True
        outputs = body.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list):
                raise APIError(400, "outputs: must be an array", "outputs")
            for output in outputs:
                if not isinstance(output, dict) or output.get("name") != "image":
                    wrong = output.get("name") if isinstance(output, dict) else output
                    raise APIError(400, f"outputs: unknown output {wrong!r}; this model has image", "outputs")
                flag = (output.get("parameters") or {}).get("binary_data")
                if isinstance(flag, bool):
                    binary_output = flag

        try:
            checked_seeds = check_seeds(seeds)
            labels = check_class_labels(info, values.get("class_label"), count)
        except LowDiffError as exc:
            raise APIError(400, exc.one_line(flag_style=False), exc.field) from None

        outcome = await await_images(
            service,
            batcher,
            request,
            list(checked_seeds),
            list(labels) if labels is not None else [None] * count,
            accepted,
            float(timeout),
            "timeout_s",
        )
        if outcome is None:
            return Response(status_code=499)  # the client is gone
        ticket, images = outcome
        pixels = torch.stack(list(images)).to(torch.uint8).numpy()
        out: dict[str, Any] = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape)}
        response: dict[str, Any] = {"model_name": info.model, "model_version": VERSION}
        if request_id is not None:
            response["id"] = request_id
        response["parameters"] = {"seeds": list(checked_seeds)}
        headers = {
            "Server-Timing": f"queue;dur={ticket.queue_s * 1000:.1f}, compute;dur={ticket.compute_s * 1000:.1f}",
            "X-LowDiff-Model": info.model,
        }
        if binary_output:
            data = pixels.tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            response["outputs"] = [out]
            header = json.dumps(response, separators=(",", ":")).encode()
            headers["Inference-Header-Content-Length"] = str(len(header))
            return Response(header + data, media_type="application/octet-stream", headers=headers)
        out["data"] = pixels.reshape(-1).tolist()
        response["outputs"] = [out]
        if count > 8:
            content = await asyncio.to_thread(json.dumps, response, separators=(",", ":"))
        else:
            content = json.dumps(response, separators=(",", ":"))
        return Response(content, media_type="application/json", headers=headers)
