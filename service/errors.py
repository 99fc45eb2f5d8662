"""The service's one error boundary: every refusal becomes ``{"error", "field", "request_id"}`` JSON.

Routes raise :class:`APIError` (an HTTP status with a message) or let a
:class:`lowdiff.errors.LowDiffError` from the layers below through (a request the model cannot
serve → 422 naming the field); request-body validation errors, Starlette's HTTP errors and anything
unexpected are answered here too, in the same shape. Nothing else writes an error response.
"""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowdiff.errors import LowDiffError
from lowdiff.service.logs import request_id_var

log = logging.getLogger("lowdiff.service")


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


def _field_from_loc(loc: tuple[object, ...]) -> str:
    """The request field an error is about. Bodies are flat, so it is the first name after ``body``;
    what follows is pydantic's path inside the value (for a union, the member tried: ``int``, ``str``)."""
    parts = [str(p) for p in loc if p != "body"]
    return parts[0] if parts else "body"


def validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    field = _field_from_loc(tuple(first.get("loc", ("body",))))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return error_response(400, f"body: malformed JSON ({first.get('ctx', {}).get('error', 'parse error')})", "body")
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


def body_problem(cause: BaseException) -> str:
    """Why a body that is not a JSON decode error could not be parsed (FastAPI answers these with a
    bare "There was an error parsing the body" and keeps the reason as the exception's cause)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "body: nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"body: integer too large (more than {sys.get_int_max_str_digits()} digits)"
    return f"body: could not be parsed ({type(cause).__name__})"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(LowDiffError)
    async def on_lowdiff_error(_: Request, exc: LowDiffError) -> JSONResponse:
        return error_response(422, exc.one_line(flag_style=False), exc.field)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # the body could not be parsed
            return error_response(400, body_problem(exc.__cause__), "body")
        return error_response(exc.status_code, str(exc.detail), None, dict(exc.headers or {}))
