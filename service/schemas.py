"""The HTTP protocol: request and response bodies of the service's endpoints (pydantic models)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from lowdiff.requests import MAX_IMAGES_PER_REQUEST, MAX_SEED

# A deadline shorter than this cannot be met by any batch; it is a client error, not a 504.
MIN_TIMEOUT_S = 0.1


def _integral(value: object) -> object:
    """7.0 is the integer 7 in JSON (and to JSON Schema's "integer"); 7.5, "7" and true are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integer fields of a strict model that take JSON numbers with no fractional part, as their schema says
# (the validator wraps the whole union: inside it, pydantic would write ge/le into the schema as such).
JSONInt = Annotated[int, BeforeValidator(_integral)]
OptionalJSONInt = Annotated[int | None, BeforeValidator(_integral)]
ClassLabel = Annotated[int | str | None, BeforeValidator(_integral)]


class GenerateRequest(BaseModel):
    """Strict types: "7" is not a class label and true is not a seed (7.0 is 7, as in JSON Schema)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    class_label: ClassLabel = Field(
        None,
        description="class index or class name (GET /v1/models lists them); required for conditional models, "
        "rejected for unconditional ones",
    )
    seed: OptionalJSONInt = Field(
        None, ge=0, le=MAX_SEED, description="image k uses seed + k; drawn and returned if omitted"
    )
    num_images: JSONInt = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST, description="images in this request")
    timeout_s: float | None = Field(
        None, ge=MIN_TIMEOUT_S, description="deadline for this request in seconds (default: the server's)"
    )


class ImageOut(BaseModel):
    seed: int
    class_label: int | None = Field(description="the class index (also when the request named the class)")
    class_name: str | None = Field(None, description="the class's name, when the model has names")
    png_base64: str


class Timings(BaseModel):
    queue_s: float = Field(description="from acceptance until its first batch started")
    compute_s: float = Field(description="from its first batch's start to its last batch's end")
    total_s: float = Field(description="from acceptance until the response was ready")


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    model: str
    timings: Timings


class ErrorBody(BaseModel):
    """Every error: a one-line message, the field it concerns (or null) and the request id."""

    error: str
    field: str | None
    request_id: str | None


class HealthBody(BaseModel):
    """``/healthz``: ``ok``, or ``failed`` with the reason."""

    status: str
    error: str | None = None


class ReadyBody(BaseModel):
    """``/readyz``: the lifecycle state (``loading``, ``warming up``, ``ready``, ``draining``, ``failed``)
    and, once the batcher runs, the queued images."""

    status: str
    queue_depth_images: int | None = None
