"""The OpenAPI document of one server: what this model, with these settings, accepts and answers.

FastAPI derives the document from the routes and :mod:`.schemas`. What only the running server
knows is filled in here, by overriding ``app.openapi`` (FastAPI's documented way to change the
generated document): ``GenerateRequest`` for the loaded model — ``class_label`` required with bounds
0…num_classes−1 for a class-conditional model, null-only for an unconditional one — with
``num_images`` and ``timeout_s`` up to this server's limits (``--max-queue``, ``--max-timeout-s``) and
``seed + num_images − 1`` within the seed range. A schema-valid body is then a request the server
accepts. Which statuses each endpoint answers (401 only when the server has a key) is declared on
the routes in :mod:`.routes`, with the helpers below.

When neither a model nor an engine is given to ``create_app`` (the model is loaded in the
background from the settings), the request schema is the generic one until the engine is loaded.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lowdiff.requests import MAX_IMAGES_PER_REQUEST, MAX_SEED, ClassSpace
from lowdiff.service.schemas import ErrorBody
from lowdiff.service.settings import ServeSettings

CONNECTION_CAP_503 = "past --max-connections the server itself answers 503 text/plain before any route runs"


def error_doc(description: str, *, headers: dict[str, Any] | None = None, plain_503: bool = False) -> dict:
    """One documented error status: ``ErrorBody`` JSON (and, for 503, uvicorn's text/plain refusal)."""
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        out["headers"] = headers
    if plain_503:
        out["description"] = f"{description}; {CONNECTION_CAP_503}"
        out["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return out


RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
WWW_AUTHENTICATE = {"description": "Bearer", "required": True, "schema": {"type": "string"}}


def auth_responses(settings: ServeSettings) -> dict[int | str, dict[str, Any]]:
    """401 where the key applies, and only when this server has one."""
    if settings.api_key is None:
        return {}
    return {
        401: error_doc("missing or wrong 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": WWW_AUTHENTICATE})
    }


def generate_request_schema(
    schema: dict[str, Any], classes: ClassSpace | None, settings: ServeSettings
) -> dict[str, Any]:
    """``GenerateRequest`` as FastAPI generated it, narrowed to this server (a copy)."""
    schema = {**schema, "properties": {k: dict(v) for k, v in schema["properties"].items()}}
    props = schema["properties"]
    required = [name for name in schema.get("required", []) if name != "class_label"]
    max_images = min(MAX_IMAGES_PER_REQUEST, settings.max_queue)
    props["num_images"]["maximum"] = max_images
    props["timeout_s"]["anyOf"] = [
        {"type": "number", "minimum": _bound(props["timeout_s"], "minimum"), "maximum": settings.max_timeout_s},
        {"type": "null"},
    ]
    if classes is not None:
        label = props["class_label"]
        for key in ("anyOf", "type", "minimum", "maximum", "default"):
            label.pop(key, None)
        if classes.conditional:
            top = classes.num_classes - 1
            index = {"type": "integer", "minimum": 0, "maximum": top}
            if classes.class_names:
                label["anyOf"] = [index, {"type": "string", "enum": list(classes.class_names)}]
            else:
                label.update(index)
            label["description"] = f"class index 0…{top} or class name; required (the model is class-conditional)"
            required.append("class_label")
        else:
            label.update(type="null")
            label["description"] = "the served model is unconditional: omit class_label (or send null)"
    # Image k uses seed + k, so seed + num_images − 1 must stay ≤ MAX_SEED. JSON Schema has no sums
    # (and the generators of test tools choke on if/then): the union over n of "num_images ≤ n and
    # seed ≤ MAX_SEED − n + 1" is exact (an absent num_images is 1, an absent seed is drawn to fit).
    schema["anyOf"] = [
        {"properties": {"num_images": {"maximum": n}, "seed": {"maximum": MAX_SEED - n + 1}}}
        for n in range(1, max_images + 1)
    ]
    schema["required"] = required
    if not required:
        schema.pop("required")
    return schema


def _bound(prop: dict[str, Any], key: str) -> Any:
    for option in prop.get("anyOf", [prop]):
        if key in option:
            return option[key]
    raise KeyError(key)


def install_openapi(app: FastAPI, classes: ClassSpace | None, settings: ServeSettings) -> None:
    """Replace ``app.openapi`` by one that narrows the request schema to the served model.
    ``classes`` is the model (or engine info) when known at start; else ``app.state.service``'s
    engine info once loaded (the document is cached from then on)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        known = classes if classes is not None else app.state.service.engine_info
        document = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
        schemas = document["components"]["schemas"]
        schemas["GenerateRequest"] = generate_request_schema(schemas["GenerateRequest"], known, settings)
        if known is not None:
            app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
