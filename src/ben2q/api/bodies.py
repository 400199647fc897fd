"""Request bodies read with limits: JSON bounded in bytes and parsed strictly, a clear
problem for anything else (415 wrong type, 413 too large, 422 naming the field)."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..errors import InvalidRequest
from .problems import Problem, invalid_fields, pointer

M = TypeVar("M", bound=BaseModel)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(request: Request) -> bool:
    kind = media_type(request)
    return kind == "application/json" or kind.endswith("+json")


async def read_bounded(request: Request, limit: int, what: str = "the body") -> bytes:
    """The whole body, refusing (413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(what, limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(what, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(what: str, limit: int) -> Problem:
    return Problem(413, "payload_too_large", f"{what} is over the limit of {limit} bytes")


def validation_problem(exc: ValidationError, prefix: tuple = ()) -> Problem:
    errors = []
    for err in exc.errors(include_url=False)[:50]:
        loc = (*prefix, *err.get("loc", ()))
        message = str(err.get("msg", "invalid"))
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, InvalidRequest):  # a rule over several fields names its field
            loc, message = (*prefix, *_field_path(cause.field)), cause.message
            message = message.removeprefix(f"{cause.field}: ")
        if err.get("type") == "json_invalid":
            message = f"not valid JSON: {err.get('ctx', {}).get('error', message)}"
        errors.append({"pointer": pointer(loc) if loc else "/", "detail": message})
    return invalid_fields(errors)


def _field_path(field: str) -> tuple[str | int, ...]:
    """``inputs[3]`` -> ("inputs", 3): the path a pointer is made of."""
    name, _, rest = field.partition("[")
    return (name, int(rest.rstrip("]"))) if rest.rstrip("]").isdigit() else (field,)


async def read_json(request: Request, model: type[M], limit: int) -> M:
    """Parse the JSON body into ``model``; a problem document for every way it can fail."""
    if not is_json(request):
        raise Problem(
            415,
            "unsupported_media_type",
            f"send application/json (got {media_type(request) or 'no Content-Type'})",
        )
    raw = await read_bounded(request, limit, "the JSON body")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise validation_problem(exc) from exc
