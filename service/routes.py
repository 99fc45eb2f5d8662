"""The routes: ``POST /generate``, ``/v1/models``, health, readiness and metrics.

Each route checks what only it knows (readiness, the Accept header, the queue) and leaves request
validation to :mod:`lowdiff.requests` and error answers to :mod:`lowdiff.service.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from lowdiff.imaging import grid_png_bytes, png_bytes
from lowdiff.requests import MAX_SEED, generation_request
from lowdiff.service.batcher import Batcher, EngineFailure, QueueFull, Ticket
from lowdiff.service.errors import APIError
from lowdiff.service.openapi import CONNECTION_CAP_503, RETRY_AFTER, auth_responses, error_doc
from lowdiff.service.schemas import GenerateRequest, GenerateResponse, HealthBody, ImageOut, ReadyBody, Timings
from lowdiff.service.settings import ServeSettings
from lowdiff.service.state import Service

log = logging.getLogger("lowdiff.service")


SERVED_TYPES = ("application/json", "image/png")
STRING = {"type": "string"}
PLAIN = {"content": {"text/plain": {"schema": STRING}}}
SEED_SCHEMA = {"type": "integer", "minimum": 0, "maximum": MAX_SEED}
_MATCHES = {
    "application/json": "application/json",
    "application/*": "application/json",
    "*/*": "application/json",
    "image/png": "image/png",
    "image/*": "image/png",
}


def negotiate(accept: str | None) -> str | None:
    """The served media type the Accept header prefers (q-values honoured, ties by order); JSON when
    there is no header; None when it accepts none of :data:`SERVED_TYPES` (answered 406)."""
    if not accept or not accept.strip():
        return "application/json"
    best: tuple[float, int] | None = None
    chosen: str | None = None
    for position, part in enumerate(accept.split(",")):
        items = [p.strip() for p in part.split(";")]
        media = _MATCHES.get(items[0].lower())
        q = 1.0
        for param in items[1:]:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if media is None or not q > 0:
            continue
        rank = (q, -position)
        if best is None or rank > best:
            best, chosen = rank, media
    return chosen


def wants_png(accept: str | None) -> bool:
    return negotiate(accept) == "image/png"


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def check_accepting(service: Service) -> Batcher:
    if service.draining:
        raise APIError(503, "server is shutting down", None, {"Retry-After": "5", "Connection": "close"})
    if service.state == "failed":
        raise APIError(503, f"engine failed to load: {service.failure}")
    if not service.ready or service.batcher is None or service.engine_info is None:
        raise APIError(503, f"not ready ({service.state})", None, {"Retry-After": "5"})
    return service.batcher


def api_key_dependencies(settings: ServeSettings) -> list[Any]:
    """The route dependencies that require ``Authorization: Bearer <key>``: none without a key (the
    key is fixed at start; without one no route depends on it and the document shows no security)."""
    if settings.api_key is None:
        return []
    key = settings.api_key
    bearer = HTTPBearer(auto_error=False, description="the server's LOWDIFF_API_KEY")

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(
                401, "Authorization: missing or wrong bearer token", "Authorization", {"WWW-Authenticate": "Bearer"}
            )

    return [Depends(require_api_key)]


async def await_images(
    service: Service,
    batcher: Batcher,
    request: Request,
    seeds: list[int],
    labels: list[int | None],
    accepted: float,
    timeout: float,
    timeout_field: str = "timeout_s",
) -> tuple[Ticket, list[torch.Tensor]] | None:
    """Queue one request's images and wait for them: the one submit/await path of every endpoint
    that generates (``/generate``, the v2 ``infer``). Returns the ticket and its uint8 images, or
    None when the client disconnected (its unstarted work dropped). Refuses with 429 (queue full),
    500 (engine failure), 503 (grace over) and 504 (not done ``timeout`` seconds after ``accepted``,
    a ``time.monotonic()`` instant; the message names ``timeout_field``)."""
    deadline = accepted + timeout
    service.in_flight += 1
    service.metrics.in_flight.inc()
    ticket = None
    try:
        try:
            ticket = batcher.submit(seeds, labels, deadline=deadline)
        except QueueFull as exc:
            raise APIError(429, "queue full, retry later", None, {"Retry-After": str(exc.retry_after_s)}) from None
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        aborted = asyncio.ensure_future(service.aborted.wait())
        try:
            done, _ = await asyncio.wait(
                {ticket.future, watcher, aborted},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            watcher.cancel()
            aborted.cancel()
        if ticket.future in done and not ticket.future.cancelled():
            failure = ticket.future.exception()
            if failure is not None:
                message = str(failure) if isinstance(failure, EngineFailure) else repr(failure)
                raise APIError(500, f"engine failed: {message}")
            return ticket, ticket.future.result()
        if watcher in done:
            batcher.cancel(ticket, "disconnect")
            log.info("client disconnected; unstarted work dropped")
            return None
        if aborted in done or ticket.cancelled not in (None, "deadline"):  # grace is over
            batcher.cancel(ticket, "shutdown")
            raise APIError(
                503,
                "server is shutting down; retry on another replica",
                None,
                {"Retry-After": "1", "Connection": "close"},
            )
        batcher.cancel(ticket, "deadline")
        raise APIError(504, f"{timeout_field}: not done within {timeout:g} s", timeout_field)
    finally:
        if ticket is not None and not ticket.future.done():
            batcher.cancel(ticket, "disconnect")  # the handler itself was cancelled
        service.in_flight -= 1
        service.metrics.in_flight.dec()


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event (the JSON has no newline, so one ``data:`` line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def next_event(service: Service, ticket: Ticket, deadline: float) -> tuple[str, int, dict] | None:
    """The ticket's next event in order, or None when waiting ended without one (engine failure,
    shutdown, the deadline, or nothing but a spurious wake-up: :func:`stream_failure` tells)."""
    assert ticket.events is not None
    if not ticket.events.empty():
        return ticket.events.get_nowait()
    getter = asyncio.ensure_future(ticket.events.get())
    aborted = asyncio.ensure_future(service.aborted.wait())
    watch: set[asyncio.Future[Any]] = {getter, aborted}
    if not ticket.future.done():
        watch.add(ticket.future)
    try:
        await asyncio.wait(watch, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        aborted.cancel()
        if not getter.done():
            getter.cancel()  # a cancelled Queue.get loses no item
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None


def stream_failure(
    service: Service, batcher: Batcher, ticket: Ticket, deadline: float, timeout: float
) -> dict[str, Any] | None:
    """Why a stream must end early, as its ``error`` event's data (the ticket cancelled), or None."""
    if service.aborted.is_set():
        batcher.cancel(ticket, "shutdown")
        return {"status": 503, "error": "server is shutting down", "field": None}
    future = ticket.future
    if future.done() and not future.cancelled() and future.exception() is not None:
        return {"status": 500, "error": f"engine failed: {future.exception()}", "field": None}
    if time.monotonic() >= deadline:
        batcher.cancel(ticket, "deadline")
        return {"status": 504, "error": f"timeout_s: not done within {timeout:g} s", "field": "timeout_s"}
    return None


async def stream_events(
    service: Service,
    batcher: Batcher,
    ticket: Ticket,
    seeds: list[int],
    label: int | None,
    name: str | None,
    model_name: str,
    accepted: float,
    timeout: float,
) -> AsyncIterator[bytes]:
    """The events of one ``/generate/stream`` request. The client going away cancels this generator
    (Starlette does so on ``http.disconnect``): its ``finally`` cancels the ticket, so queued images are
    dropped and started ones stop at their next stage boundary."""
    deadline = accepted + timeout
    remaining = len(seeds)
    service.in_flight += 1
    service.metrics.in_flight.inc()
    try:
        while remaining:
            event = await next_event(service, ticket, deadline)
            if event is None:
                failure = stream_failure(service, batcher, ticket, deadline, timeout)
                if failure is not None:
                    yield sse("error", failure)
                    return
                continue
            kind, index, payload = event
            png = base64.b64encode(png_bytes(payload["image"])).decode("ascii")
            if kind == "preview":
                item = {"index": index, "seed": seeds[index], "class_label": label, "resolution": payload["resolution"],
                        "sigma": payload["sigma"], "png_base64": png}  # fmt: skip
                yield sse("preview", item)
                continue
            out = ImageOut(seed=seeds[index], class_label=label, class_name=name, png_base64=png)
            yield sse("image", {"index": index, **out.model_dump()})
            remaining -= 1
        timings = Timings(queue_s=ticket.queue_s, compute_s=ticket.compute_s, total_s=time.monotonic() - accepted)
        yield sse("done", {"model": model_name, "timings": timings.model_dump()})
    finally:
        if remaining:
            batcher.cancel(ticket, "disconnect")
        service.in_flight -= 1
        service.metrics.in_flight.dec()


def add_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings
    keyed = api_key_dependencies(settings)
    auth = auth_responses(settings)
    not_ready = error_doc(
        "not ready (loading, warming up, engine failed) or shutting down",
        headers={"Retry-After": RETRY_AFTER},
        plain_503=True,
    )

    def parse_generate(body: GenerateRequest) -> tuple[int, list[int], list[int | None], int | None, str | None, float]:
        """The checks and defaults shared by ``/generate`` and ``/generate/stream``: (seed, seeds, labels,
        label, class name, timeout); refusals are 422s naming the field."""
        count = body.num_images
        if count > settings.max_queue:
            raise APIError(422, f"num_images: this server queues at most {settings.max_queue} images", "num_images")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - count + 2)
        assert service.engine_info is not None  # check_accepting
        request_ = generation_request(service.engine_info, body.class_label, seed, count)
        timeout = body.timeout_s if body.timeout_s is not None else settings.timeout_s
        if timeout > settings.max_timeout_s:
            raise APIError(422, f"timeout_s: must be ≤ {settings.max_timeout_s:g}", "timeout_s")
        seeds = list(request_.seeds)
        label = request_.class_labels[0] if request_.class_labels is not None else None
        names = service.engine_info.class_names
        name = names[label] if label is not None and label < len(names) else None
        labels = list(request_.class_labels) if request_.class_labels is not None else [None] * count
        return seed, seeds, labels, label, name, timeout

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        dependencies=keyed,
        responses={
            200: {
                "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}},
                "description": "JSON, or with Accept: image/png the PNG (a grid if num_images > 1)",
                "headers": {
                    "X-LowDiff-Seed": {
                        "description": "the first image's seed",
                        "required": True,
                        "schema": SEED_SCHEMA,
                    },
                    "X-LowDiff-Model": {"description": "the model's name", "required": True, "schema": STRING},
                    "Server-Timing": {"description": "queue and compute time (ms)", "required": True, "schema": STRING},
                },
            },
            400: error_doc("the body is not JSON: malformed, not UTF-8, an integer too large, nested too deeply"),
            **auth,
            406: error_doc("the Accept header allows neither application/json nor image/png"),
            408: error_doc("the request body was not received within --body-timeout-s"),
            413: error_doc("body larger than --max-body-bytes"),
            422: error_doc("a field is missing, of the wrong type or out of range (named in `field`)"),
            429: error_doc(
                "more than --max-queue images queued; retry after Retry-After seconds",
                headers={"Retry-After": {**RETRY_AFTER, "required": True}},
            ),
            500: error_doc("the engine failed on a batch holding this request"),
            503: not_ready,
            504: error_doc("not done within timeout_s (its unstarted images are dropped)"),
        },
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate `num_images` images of `class_label`; image k uses seed `seed + k`."""
        accepted = time.monotonic()
        media = negotiate(request.headers.get("accept"))
        if media is None:
            raise APIError(406, f"Accept: this endpoint serves {' or '.join(SERVED_TYPES)}", "Accept")
        batcher = check_accepting(service)
        count = body.num_images
        seed, seeds, labels, label, name, timeout = parse_generate(body)

        outcome = await await_images(service, batcher, request, seeds, labels, accepted, timeout)
        if outcome is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        ticket, images = outcome

        model_name = service.engine_info.model
        timing_header = {
            "Server-Timing": f"queue;dur={ticket.queue_s * 1000:.1f}, compute;dur={ticket.compute_s * 1000:.1f}",
            "X-LowDiff-Seed": str(seed),
            "X-LowDiff-Model": model_name,
        }
        if media == "image/png":
            content = await asyncio.to_thread(grid_png_bytes, images) if count > 8 else grid_png_bytes(images)
            if label is not None:
                timing_header["X-LowDiff-Class-Label"] = str(label)
            return Response(content, media_type="image/png", headers=timing_header)
        out = [
            ImageOut(
                seed=s,
                class_label=label,
                class_name=name,
                png_base64=base64.b64encode(png_bytes(im)).decode("ascii"),
            )
            for s, im in zip(seeds, images)
        ]
        timings = Timings(queue_s=ticket.queue_s, compute_s=ticket.compute_s, total_s=time.monotonic() - accepted)
        payload = GenerateResponse(images=out, model=model_name, timings=timings)
        return JSONResponse(payload.model_dump(), headers=timing_header)

    @app.post(
        "/generate/stream",
        dependencies=keyed,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": STRING}},
                "description": "Server-Sent Events: `preview` {index, seed, class_label, resolution, sigma, "
                "png_base64} at each stage hand-off (an engine with a per-stage entry point, either scheduler), "
                "`image` (an item of /generate's images[], with its index) as each image is done, then `done` "
                "{model, timings}; an `error` "
                "event {status, error, field} ends a stream that fails after it began",
            },
            **auth,
            422: error_doc("a field is missing, of the wrong type or out of range (named in `field`)"),
            429: error_doc(
                "more than --max-queue images queued; retry after Retry-After seconds",
                headers={"Retry-After": {**RETRY_AFTER, "required": True}},
            ),
            503: not_ready,
        },
    )
    async def generate_stream(body: GenerateRequest, request: Request) -> Response:
        """The body of `/generate`, answered as Server-Sent Events: previews, then each image as it is done.

        Disconnecting cancels the images' remaining work (started images: at the next stage hand-off)."""
        accepted = time.monotonic()
        batcher = check_accepting(service)
        seed, seeds, labels, label, name, timeout = parse_generate(body)
        try:
            ticket = batcher.submit(seeds, labels, deadline=accepted + timeout, stream=True)
        except QueueFull as exc:
            raise APIError(429, "queue full, retry later", None, {"Retry-After": str(exc.retry_after_s)}) from None
        assert service.engine_info is not None
        model_name = service.engine_info.model
        return StreamingResponse(
            stream_events(service, batcher, ticket, seeds, label, name, model_name, accepted, timeout),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-LowDiff-Seed": str(seed), "X-LowDiff-Model": model_name},
        )

    def model_info() -> dict[str, Any]:
        info = service.info()
        if not info:
            raise APIError(503, f"not ready ({service.state})", None, {"Retry-After": "5"})
        return info

    @app.get("/v1/models", dependencies=keyed, responses={**auth, 503: not_ready})
    async def models() -> dict[str, Any]:
        """Model name, config, resolutions, cascade schedule, NFE per stage, engine, device, precision, version."""
        return model_info()

    @app.get("/info", dependencies=keyed, include_in_schema=False)
    async def info() -> dict[str, Any]:
        return model_info()

    @app.get(
        "/healthz",
        response_model=HealthBody,
        responses={
            503: {"model": HealthBody, "description": f"the engine failed to load; {CONNECTION_CAP_503}", **PLAIN}
        },
    )
    async def healthz() -> JSONResponse:
        """Liveness: 200 while the process serves; 503 if the engine failed to load."""
        if service.state == "failed":
            return JSONResponse({"status": "failed", "error": service.failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        response_model=ReadyBody,
        responses={
            503: {
                "model": ReadyBody,
                "description": f"loading, warming up, draining or failed; {CONNECTION_CAP_503}",
                **PLAIN,
            }
        },
    )
    async def readyz() -> JSONResponse:
        """Readiness: 200 once the engine is loaded and warmed up; 503 before, and while draining."""
        body: dict[str, Any] = {"status": service.state}
        if service.batcher is not None:
            body["queue_depth_images"] = service.batcher.queue_depth
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {"content": {"text/plain": {"schema": STRING}}, "description": "Prometheus text exposition"},
            503: {"content": {"text/plain": {"schema": STRING}}, "description": CONNECTION_CAP_503},
        },
    )
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
