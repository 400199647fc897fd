"""Errors of the HTTP API: one exception type, rendered in one place as RFC 9457 problems.

Every error answer is ``application/problem+json`` with ``type``, ``title``, ``status``,
``detail`` and our stable ``code`` (the job error codes of ``ben2q.errors``, plus the ones
only HTTP has: ``unauthorized``, ``forbidden``, ``rate_limited``, ``payload_too_large``,
``unsupported_media_type``, ``overloaded``, ``idempotency_*``). ``invalid_request``
problems carry ``errors``: one ``{"pointer", "detail"}`` per bad field, the field named by
its JSON pointer (``/inputs/3``). A handler for everything else answers 500 ``internal``
without a stack trace (the trace goes to the log).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import BEN2QError, InvalidRequest

log = logging.getLogger("ben2q.api")

PROBLEM_TYPE = "tag:ben2q.dev,2026:problem/"
"""``type`` of our problems: ``tag:`` URIs, as RFC 9457 suggests for non-resolvable ones."""
MEDIA_TYPE = "application/problem+json"

STATUS_OF: dict[str, int] = {
    "invalid_request": 422,
    "invalid_image": 422,
    "image_too_large": 413,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "forbidden_url": 422,
    "fetch_failed": 422,
    "forbidden": 403,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "not_acceptable": 406,
    "rate_limited": 429,
    "overloaded": 503,
    "unavailable": 503,
    "storage_error": 503,
    "upload_failed": 503,
    "idempotency_key_in_use": 409,
    "idempotency_key_mismatch": 422,
    "idempotency_key_invalid": 400,
    "timeout": 504,
    "internal": 500,
}


class Problem(Exception):
    """An HTTP error answer. Raise it anywhere in the API; ``install`` renders it."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        errors: Sequence[Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = list(errors) if errors else None
        self.headers = dict(headers or {})

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body

    def response(self, instance: str | None = None) -> JSONResponse:
        return JSONResponse(
            self.body(instance),
            status_code=self.status,
            headers=self.headers,
            media_type=MEDIA_TYPE,
        )

    @classmethod
    def of(cls, exc: BEN2QError, *, status: int | None = None, field: str | None = None) -> Problem:
        """The problem for one of our errors, naming its field: ``InvalidRequest``'s own,
        or ``field`` for an error about a request field that does not know it."""
        status = status or STATUS_OF.get(exc.code, 500)
        if field is not None:
            errors = [{"pointer": pointer(field), "detail": exc.message}]
            return cls(status, exc.code, f"{field}: {exc.message}", errors=errors)
        field = getattr(exc, "field", None)
        short = exc.message.removeprefix(f"{field}: ") if field else exc.message
        errors = [{"pointer": pointer(field), "detail": short}] if field else None
        return cls(status, exc.code, exc.message, errors=errors)


def invalid(field: str, message: str) -> Problem:
    """422 ``invalid_request`` naming one field (``inputs[3]`` or ``/inputs/3``)."""
    return Problem.of(InvalidRequest(field, message))


_INDEX = re.compile(r"\[(\d+)\]")


def pointer(field: str | Sequence[Any]) -> str:
    """A JSON pointer (RFC 6901) for ``inputs[3]``, ``('body', 'inputs', 3)`` or ``/x``."""
    if isinstance(field, str):
        if field.startswith("/"):
            return field
        parts: list[Any] = [p for p in _INDEX.sub(r".\1", field).split(".") if p != ""]
    else:
        parts = list(field)
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _validation_problem(exc: RequestValidationError) -> Problem:
    errors = []
    for err in exc.errors()[:50]:
        loc = list(err.get("loc", ()))
        where = loc[0] if loc else "body"
        rest = loc[1:] if where in ("body", "query", "path", "header", "form") else loc
        name = pointer(rest) if rest else "/"
        if where in ("query", "header", "path"):
            name = f"{where}:{rest[0] if rest else ''}"
        errors.append({"pointer": name, "detail": str(err.get("msg", "invalid"))})
    return invalid_fields(errors)


def invalid_fields(errors: list[dict[str, str]]) -> Problem:
    """422 ``invalid_request`` for several bad fields (``{"pointer", "detail"}`` each)."""
    detail = "; ".join(f"{e['pointer']}: {e['detail']}" for e in errors[:5])
    return Problem(422, "invalid_request", detail or "invalid request", errors=errors)


_HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document with our stable `code`.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "code": {"type": "string", "enum": sorted(STATUS_OF)},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["pointer", "detail"],
                "properties": {"pointer": {"type": "string"}, "detail": {"type": "string"}},
            },
        },
    },
}

_COMMON = {
    "401": "No, unknown or revoked API key",
    "422": "Invalid request; `errors` names each field",
    "429": "Over the key's rate limit (`Retry-After` says when to retry)",
}
_RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 0},
}


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI document say what the API answers on errors: every 4xx/5xx is
    ``application/problem+json`` (a ``Problem``), and every authenticated operation may
    answer 401, 422 and 429. Routes then only name their own statuses."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    content = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            if operation.get("security"):
                for code, description in _COMMON.items():
                    responses.setdefault(code, {"description": description})
            for code, response in responses.items():
                if code[:1] not in ("4", "5"):
                    continue
                response["content"] = dict(content)
                if code in ("429", "503"):
                    response.setdefault("headers", {})["Retry-After"] = _RETRY_AFTER
    return schema


def _allowed(request: Request) -> list[str]:
    """Every method the API documents for this path (Starlette's ``Allow`` names only the
    first matching route's, so ``/v1/jobs`` would claim POST alone). Read from the OpenAPI
    document, the one public map of routes to methods."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods.update(m.upper() for m in operations if m in _METHODS)
    return sorted(methods)


_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def install(app: FastAPI) -> None:
    """Render every error of ``app`` as a problem document."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(BEN2QError)
    async def _ours(request: Request, exc: BEN2QError) -> JSONResponse:
        return Problem.of(exc).response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_problem(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal"
        )
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed(request))
        problem = Problem(exc.status_code, code, detail, headers=headers)
        return problem.response(request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client left mid-body: nobody reads this answer, and it is no server fault
        detail = "the client closed the connection before the body ended"
        return Problem(400, "invalid_request", detail).response(request.url.path)

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        # Redis away, or every pooled connection busy past the pool's wait (a surge):
        # the caller should come back, not read it as a bug.
        log.warning("Redis unavailable on %s %s: %r", request.method, request.url.path, exc)
        problem = Problem(
            503,
            "unavailable",
            "the service's store is busy or unreachable; retry shortly",
            headers={"Retry-After": "2"},
        )
        return problem.response(request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return Problem(500, "internal", "internal error; it was logged").response(request.url.path)
