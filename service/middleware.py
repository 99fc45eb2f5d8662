"""ASGI middleware: request id, body-size limit, access log and per-endpoint request metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import MutableHeaders

from lowdiff.service.errors import error_response
from lowdiff.service.logs import request_id_var
from lowdiff.service.metrics import ServiceMetrics

access_log = logging.getLogger("lowdiff.service.access")

ENDPOINTS = (
    "/generate",
    "/generate/stream",
    "/v1/models",
    "/info",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/docs",
    "/redoc",
    "/openapi.json",
    # KServe's Open Inference Protocol v2 (lowdiff.service.oip): model paths by their template
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{name}",
    "/v2/models/{name}/ready",
    "/v2/models/{name}/infer",
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def endpoint_label(path: str) -> str:
    """The endpoint a path is counted under: itself, a v2 model path's template, or "other"."""
    if path.startswith("/v2/models/"):
        name, _, rest = path[len("/v2/models/") :].partition("/")
        if name:
            path = "/v2/models/{name}" + (f"/{rest}" if rest else "")
    return path if path in ENDPOINTS else "other"


def clean_request_id(value: str | None) -> str:
    """Honour a caller's X-Request-ID if it is short printable ASCII (it goes into logs and headers)."""
    if value and len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return uuid.uuid4().hex


class RequestContext:
    """Pure ASGI (not BaseHTTPMiddleware, which would hide client disconnects from the handler):
    request id, body-size limit, access log and per-endpoint request metrics."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, max_body_bytes: int, body_timeout_s: float = 30.0):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = clean_request_id(headers.get("x-request-id"))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            replay = await self._read_body(scope, receive, headers, send_with_id)
            if replay is not None:
                await self.app(scope, replay, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            endpoint = endpoint_label(scope.get("path", ""))
            metrics = self.metrics
            metrics.requests.labels(endpoint, str(status[0])).inc()
            metrics.request_duration.labels(endpoint).observe(elapsed)
            if endpoint not in ("/metrics", "/healthz", "/readyz") or status[0] >= 400:
                client = scope.get("client")
                access_log.info(
                    "%s %s %d",
                    scope.get("method"),
                    scope.get("path"),
                    status[0],
                    extra={
                        "status": status[0],
                        "duration_s": round(elapsed, 4),
                        "client": client[0] if client else None,
                    },
                )
            request_id_var.reset(token)

    async def _read_body(self, scope: Scope, receive: Receive, headers: dict[str, str], send: Send) -> Receive | None:
        """Buffer the body up to the limit, then replay it; None when already answered (413) or gone."""
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        limit = self.max_body_bytes
        too_large = error_response(413, f"body: larger than {limit} bytes", "body")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # A body that never finishes would hold its connection forever: answer and close.
                await error_response(
                    408, f"body: not received within {self.body_timeout_s:g} s", "body", {"Connection": "close"}
                )(scope, receive, send)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: blocks until the client disconnects

        return replay
