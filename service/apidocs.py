"""``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc), served offline: no request leaves the host.

FastAPI's own pages load their JavaScript, CSS and favicon from CDNs (and ReDoc's from Google
Fonts). Here the app is built with ``docs_url=None, redoc_url=None`` and the pages come from
FastAPI's documented helpers (``get_swagger_ui_html``, ``get_redoc_html``) pointed at
``/static/docs/…``: the Swagger UI and ReDoc bundles that the ``fastapi-offline`` package ships
(swagger-ui-dist 5, ReDoc 2), mounted with ``StaticFiles``. Swagger UI's online validator is off,
ReDoc's Google Fonts link is left out, and a Content-Security-Policy lets the browser load from this origin only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from lowdiff.service.playground import inline_hashes

ASSETS_URL = "/static/docs"


def docs_policy(html: str) -> str:
    """The pages' Content-Security-Policy: scripts, styles, images, fonts and requests from this origin only
    (plus the page's own inline script by hash, the inline styles both UIs inject, data: images, and the
    blob: worker of ReDoc's search). ReDoc 2 always renders an ``<img>`` of Redocly's logo from its CDN:
    the browser refuses it (the image hides itself on error), so nothing leaves the host."""
    script = " ".join(filter(None, ["'self'", inline_hashes(html, "script")]))
    return (
        f"default-src 'self'; script-src {script}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = docs_policy(bytes(page.body).decode("utf-8"))
    return page


def asset_folder() -> Path:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fastapi-offline package (Swagger UI and ReDoc assets) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def add_docs(app: FastAPI) -> None:
    """``/docs``, ``/redoc`` and their assets under ``/static/docs``; the app must have been built with
    ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=asset_folder()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_policy(
            get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_policy(
            get_redoc_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )
