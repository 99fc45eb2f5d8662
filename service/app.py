"""The FastAPI app factory: one service instance = state + middleware + error boundary + routes.

``create_app(settings, model=..., engine=...)`` builds one. Tests inject a tiny model or a fake
engine; ``lowdiff serve`` passes the model it loaded. Where things live: request/response bodies in
:mod:`.schemas`, the lifecycle in :mod:`.state`, the error boundary in :mod:`.errors`, request ids,
body limits and access logs in :mod:`.middleware`, endpoints in :mod:`.routes` (KServe's Open
Inference Protocol v2 in :mod:`.oip`), the OpenAPI document narrowed to the served model in
:mod:`.openapi`, ``/docs`` and ``/redoc`` with local assets in :mod:`.apidocs`, the playground page at
``/`` in :mod:`.playground`; a new endpoint goes into :mod:`.routes` (or a sibling module registered here).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lowdiff.model import LowDiffModel
from lowdiff.service.apidocs import add_docs
from lowdiff.service.batcher import Engine
from lowdiff.service.errors import install_error_handlers
from lowdiff.service.middleware import RequestContext
from lowdiff.service.oip import add_oip_routes
from lowdiff.service.openapi import install_openapi
from lowdiff.service.playground import add_playground
from lowdiff.service.routes import add_routes
from lowdiff.service.settings import ServeSettings, settings_dict
from lowdiff.service.state import Service, package_version

log = logging.getLogger("lowdiff.service")


def create_app(
    settings: ServeSettings | None = None, *, model: LowDiffModel | None = None, engine: Engine | None = None
) -> FastAPI:
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
        docs_url=None,  # /docs and /redoc: served offline by add_docs
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(
        RequestContext,
        metrics=service.metrics,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    install_error_handlers(app)
    add_routes(app, service)
    add_docs(app)
    add_playground(app)
    add_oip_routes(app, service)  # KServe / Triton: Open Inference Protocol v2
    # The request schema of this model: known now when it was given (`lowdiff serve` always gives it).
    classes = engine.info() if engine is not None else model.config if model is not None else None
    install_openapi(app, classes, settings)
    return app
