"""``GET /``: the playground, one static HTML page (inline CSS and JS, no other asset) that calls the API.

The page lists the model's classes from ``GET /v1/models``, posts to ``POST /generate`` and shows the
images (``png_base64`` as data: URLs), the timings, or the JSON ``error`` in one line. It is not
behind the API key: it is a static page, and the calls it makes carry the key typed into it
(``Authorization: Bearer …``, remembered in the tab's sessionStorage). Its Content-Security-Policy
allows only its own inline script and style (by hash), data: images and requests to this origin,
so the browser itself refuses anything that would leave the host.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


def inline_hashes(html: str, tag: str) -> str:
    """CSP sources (``'sha256-…'``) for the inline ``<tag>…</tag>`` blocks (without attributes) of a page."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" for block in blocks
    )


def content_security_policy(html: str) -> str:
    """Only this page's own inline ``<script>``/``<style>`` blocks, data: images and same-origin requests."""
    return (
        f"default-src 'none'; script-src {inline_hashes(html, 'script')}; style-src {inline_hashes(html, 'style')}; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def add_playground(app: FastAPI) -> None:
    html = resources.files("lowdiff.service").joinpath("static/playground.html").read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)
