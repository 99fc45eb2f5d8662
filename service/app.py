"""The HTTP service: FastAPI app factory, request validation, backpressure, health, metrics.

``create_app(settings, model=..., engine=...)`` builds one service instance. Tests inject a tiny
model or a fake engine; ``lowdiff serve`` passes the model it loaded. The engine is loaded and
warmed up in the background after start-up, in the engine thread, so ``/healthz`` answers at once
and ``/readyz`` turns 200 only when a warm-up batch has run.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import Batcher, Engine, EngineFailure, QueueFull
from service.imaging import grid_png_bytes, png_bytes
from service.logs import request_id_var
from service.metrics import ServiceMetrics
from service.settings import ServeSettings, settings_dict

log = logging.getLogger("lowdiff.service")
access_log = logging.getLogger("lowdiff.service.access")

MAX_IMAGES_PER_REQUEST = 64
MAX_SEED = 2**32 - 1
ENDPOINTS = ("/generate", "/v1/models", "/info", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def package_version() -> str:
    try:
        return metadata.version("lowdiff-serve")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------- schemas
class GenerateRequest(BaseModel):
    """Strict types: "7" is not a class label and true is not a seed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    class_label: int | None = Field(
        None, ge=0, description="class index; required for conditional models, rejected for unconditional ones"
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="image k uses seed + k; drawn and returned if omitted"
    )
    num_images: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST, description="images in this request")
    timeout_s: float | None = Field(None, gt=0, description="deadline for this request (default: the server's)")


class ImageOut(BaseModel):
    seed: int
    class_label: int | None
    png_base64: str


class Timings(BaseModel):
    queue_s: float = Field(description="from acceptance until its first batch started")
    compute_s: float = Field(description="from its first batch's start to its last batch's end")
    total_s: float = Field(description="from acceptance until the response was ready")


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    model: str
    timings: Timings


class APIError(Exception):
    """An error answered as ``{"error": message, "field": field, "request_id": …}``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_response(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": message, "field": field, "request_id": request_id_var.get()}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------- service state
class Service:
    """Everything one app instance owns: settings, metrics, engine, batcher, lifecycle flags."""

    def __init__(self, settings: ServeSettings, model: Any = None, engine: Engine | None = None):
        self.settings = settings
        self.model = model
        self.engine = engine
        self.metrics = ServiceMetrics()
        # One engine thread: loading, warm-up and every batch run there (some runtimes, CUDA graphs
        # and TensorRT contexts, are happiest on the thread that created them).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowdiff-engine")
        self.batcher: Batcher | None = None
        self.state = "loading"  # loading → warming up → ready → draining; or failed
        self.failure: str | None = None
        self.in_flight = 0
        self.info: dict[str, Any] = {}
        self._load_task: asyncio.Task[None] | None = None

    # --- lifecycle
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def draining(self) -> bool:
        return self.state == "draining"

    def begin_drain(self) -> None:
        """SIGTERM: readiness and new requests turn 503; accepted requests still finish."""
        if self.state != "draining":
            log.info("draining: %d request(s) in flight", self.in_flight)
        self.state = "draining"
        self.metrics.ready.set(0)

    def idle(self) -> bool:
        return self.in_flight == 0

    async def start(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="lowdiff-load")

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(self.executor, self._load_engine)
            self.engine = engine
            self.info = self._describe(engine)
            self.metrics.info.info(
                {k: str(self.info.get(k)) for k in ("model", "engine", "device", "precision", "version")}
            )
            if self.state == "loading":
                self.state = "warming up"
            started = time.monotonic()
            await loop.run_in_executor(self.executor, engine.warmup, self.settings.warmup_batch)
            log.info(
                "engine ready",
                extra={
                    "warmup_s": round(time.monotonic() - started, 3),
                    **{k: self.info.get(k) for k in ("model", "engine", "device")},
                },
            )
            self.batcher = Batcher(
                engine,
                self.executor,
                self.metrics,
                max_batch=self.settings.max_batch,
                max_delay_s=self.settings.max_delay_ms / 1000,
                max_queue=self.settings.max_queue,
            )
            self.batcher.start()
            if self.state == "warming up":
                self.state = "ready"
                self.metrics.ready.set(1)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.exception("engine failed to load or warm up")

    def _load_engine(self) -> Engine:
        """Runs in the engine thread."""
        if self.engine is not None:
            return self.engine
        from engines import load_engine
        from service.loading import load_model

        if self.model is None:
            self.model = load_model(self.settings)
        s = self.settings
        return load_engine(
            self.model, s.engine, s.device, s.precision, engine_dir=s.engine_dir, threads=s.threads or None
        )

    def _describe(self, engine: Engine) -> dict[str, Any]:
        info = dict(engine.info())
        config = getattr(getattr(self.model, "config", None), "name", None)
        info.setdefault("model", config or "unknown")
        info["config"] = config or info["model"]
        info["version"] = package_version()
        info["max_batch"] = self.settings.max_batch
        info["max_images_per_request"] = min(MAX_IMAGES_PER_REQUEST, self.settings.max_queue)
        return info

    # --- request validation that needs the model
    def check_class_label(self, label: int | None) -> None:
        conditional = bool(self.info.get("conditional", True))
        num_classes = int(self.info.get("num_classes", 0) or 0)
        if conditional and label is None:
            raise APIError(
                422, f"class_label: required for {self.info.get('model')} (0…{num_classes - 1})", "class_label"
            )
        if not conditional and label is not None:
            raise APIError(
                422, f"class_label: {self.info.get('model')} is unconditional and takes no class label", "class_label"
            )
        if conditional and label is not None and label >= num_classes:
            raise APIError(422, f"class_label: {label} is out of range 0…{num_classes - 1}", "class_label")


# ---------------------------------------------------------------------------- middleware
def _endpoint_label(path: str) -> str:
    return path if path in ENDPOINTS else "other"


def _clean_request_id(value: str | None) -> str:
    """Honour a caller's X-Request-ID if it is short printable ASCII (it goes into logs and headers)."""
    if value and len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return uuid.uuid4().hex


class RequestContext:
    """Pure ASGI (not BaseHTTPMiddleware, which would hide client disconnects from the handler):
    request id, body-size limit, access log and per-endpoint request metrics."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = _clean_request_id(headers.get("x-request-id"))
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
            endpoint = _endpoint_label(scope.get("path", ""))
            metrics = self.service.metrics
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
        limit = self.service.settings.max_body_bytes
        too_large = error_response(413, f"body: larger than {limit} bytes", "body")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
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


# ---------------------------------------------------------------------------- helpers
def wants_png(accept: str | None) -> bool:
    """True when the Accept header prefers image/png to JSON (q-values honoured, ties by order)."""
    if not accept:
        return False
    best: tuple[float, int] | None = None
    png: tuple[float, int] | None = None
    for position, part in enumerate(accept.split(",")):
        items = [p.strip() for p in part.split(";")]
        media = items[0].lower()
        q = 1.0
        for param in items[1:]:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        rank = (q, -position)
        if media == "image/png" and (png is None or rank > png):
            png = rank
        elif media in ("application/json", "*/*", "application/*") and (best is None or rank > best):
            best = rank
    return png is not None and (best is None or png > best)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _field_from_loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


# ---------------------------------------------------------------------------- app
def create_app(settings: ServeSettings | None = None, *, model: Any = None, engine: Engine | None = None) -> FastAPI:
    """One service instance. ``model``: a LowDiffModel to serve (default: from ``settings``);
    ``engine``: an already-built engine (tests), which then bypasses engine loading."""
    settings = settings or ServeSettings()
    service = Service(settings, model=model, engine=engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("starting", extra={"settings": settings_dict(settings)})
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            log.info("stopped")

    app = FastAPI(
        title="LowDiff Serve",
        version=package_version(),
        description="Class-conditional image generation with LowDiff, a cascaded low-resolution diffusion model.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(RequestContext, service=service)
    bearer = HTTPBearer(auto_error=False, description="required when the server sets LOWDIFF_API_KEY")

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(
                401, "Authorization: missing or wrong bearer token", "Authorization", {"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
        field = _field_from_loc(tuple(first.get("loc", ("body",))))
        kind = first.get("type", "")
        if kind == "json_invalid":
            return error_response(
                400, f"body: malformed JSON ({first.get('ctx', {}).get('error', 'parse error')})", "body"
            )
        if field == "body" and kind == "missing":
            message = "body: a JSON object is required"
        elif field == "body":
            message = "body: expected a JSON object"
            if "json" not in request.headers.get("content-type", ""):
                message += " (send Content-Type: application/json)"
        elif kind == "extra_forbidden":
            message = f"{field}: unknown field"
        else:
            message = f"{field}: {first.get('msg', 'invalid value')}"
        return error_response(422, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, dict(exc.headers or {}))

    def check_accepting() -> Batcher:
        if service.draining:
            raise APIError(503, "server is shutting down", None, {"Retry-After": "5", "Connection": "close"})
        if service.state == "failed":
            raise APIError(503, f"engine failed to load: {service.failure}")
        if not service.ready or service.batcher is None:
            raise APIError(503, f"not ready ({service.state})", None, {"Retry-After": "5"})
        return service.batcher

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        dependencies=[Depends(require_api_key)],
        responses={
            200: {
                "content": {"image/png": {}},
                "description": "JSON, or with Accept: image/png the PNG (a grid if num_images > 1)",
            },
            400: {"description": "malformed JSON"},
            401: {"description": "API key required"},
            413: {"description": "body too large"},
            422: {"description": "a field is missing, of the wrong type or out of range (named in `field`)"},
            429: {"description": "queue full; see Retry-After"},
            500: {"description": "the engine failed on a batch holding this request"},
            503: {"description": "not ready, or shutting down"},
            504: {"description": "not done within timeout_s"},
        },
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate `num_images` images of `class_label`; image k uses seed `seed + k`."""
        accepted = time.monotonic()
        batcher = check_accepting()
        service.check_class_label(body.class_label)
        count = body.num_images
        if count > settings.max_queue:
            raise APIError(422, f"num_images: this server queues at most {settings.max_queue} images", "num_images")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - count + 2)
        if seed + count - 1 > MAX_SEED:
            raise APIError(422, f"seed: seed + num_images − 1 must be ≤ {MAX_SEED}", "seed")
        timeout = body.timeout_s if body.timeout_s is not None else settings.timeout_s
        if timeout > settings.max_timeout_s:
            raise APIError(422, f"timeout_s: must be ≤ {settings.max_timeout_s:g}", "timeout_s")
        seeds = [seed + k for k in range(count)]
        labels = [body.class_label] * count

        service.in_flight += 1
        service.metrics.in_flight.inc()
        ticket = None
        try:
            try:
                ticket = batcher.submit(seeds, labels, deadline=accepted + timeout)
            except QueueFull as exc:
                raise APIError(429, "queue full, retry later", None, {"Retry-After": str(exc.retry_after_s)}) from None
            watcher = asyncio.ensure_future(_wait_disconnect(request))
            try:
                done, _ = await asyncio.wait(
                    {ticket.future, watcher},
                    timeout=max(0.0, accepted + timeout - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                watcher.cancel()
            if ticket.future in done and not ticket.future.cancelled():
                failure = ticket.future.exception()
                if failure is not None:
                    message = str(failure) if isinstance(failure, EngineFailure) else repr(failure)
                    raise APIError(500, f"engine failed: {message}")
                images = ticket.future.result()
            elif watcher in done:
                batcher.cancel(ticket, "disconnect")
                log.info("client disconnected; unstarted work dropped")
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            elif ticket.cancelled not in (None, "deadline"):  # the batcher closed under it (forced shutdown)
                raise APIError(503, "server is shutting down", None, {"Connection": "close"})
            else:
                batcher.cancel(ticket, "deadline")
                raise APIError(504, f"timeout_s: not done within {timeout:g} s", "timeout_s")
        finally:
            if ticket is not None and not ticket.future.done():
                batcher.cancel(ticket, "disconnect")  # the handler itself was cancelled
            service.in_flight -= 1
            service.metrics.in_flight.dec()

        model_name = str(service.info.get("model"))
        timing_header = {
            "Server-Timing": f"queue;dur={ticket.queue_s * 1000:.1f}, compute;dur={ticket.compute_s * 1000:.1f}",
            "X-LowDiff-Seed": str(seed),
            "X-LowDiff-Model": model_name,
        }
        if wants_png(request.headers.get("accept")):
            content = await asyncio.to_thread(grid_png_bytes, images) if count > 8 else grid_png_bytes(images)
            if body.class_label is not None:
                timing_header["X-LowDiff-Class-Label"] = str(body.class_label)
            return Response(content, media_type="image/png", headers=timing_header)
        out = [
            ImageOut(seed=s, class_label=body.class_label, png_base64=base64.b64encode(png_bytes(im)).decode("ascii"))
            for s, im in zip(seeds, images)
        ]
        timings = Timings(queue_s=ticket.queue_s, compute_s=ticket.compute_s, total_s=time.monotonic() - accepted)
        payload = GenerateResponse(images=out, model=model_name, timings=timings)
        return JSONResponse(payload.model_dump(), headers=timing_header)

    def model_info() -> dict[str, Any]:
        if not service.info:
            raise APIError(503, f"not ready ({service.state})", None, {"Retry-After": "5"})
        return service.info

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models() -> dict[str, Any]:
        """Model name, config, resolutions, cascade schedule, NFE per stage, engine, device, precision, version."""
        return model_info()

    @app.get("/info", dependencies=[Depends(require_api_key)], include_in_schema=False)
    async def info() -> dict[str, Any]:
        return model_info()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: 200 while the process serves; 503 if the engine failed to load."""
        if service.state == "failed":
            return JSONResponse({"status": "failed", "error": service.failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 once the engine is loaded and warmed up; 503 before, and while draining."""
        body: dict[str, Any] = {"status": service.state}
        if service.batcher is not None:
            body["queue_depth_images"] = service.batcher.queue_depth
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
