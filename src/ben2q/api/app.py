"""The HTTP API's app factory: ``create_app(settings)`` builds a FastAPI app; ``ben2q api``
serves it with uvicorn.

The process holds no job state: records, keys, limits and idempotency live in Redis, so
any number of replicas can run behind a load balancer. Every answer carries the caller's
``RateLimit`` headers once it is authenticated; every error is a problem document.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings, get_settings
from . import problems
from .deps import rate_headers
from .models import JobCreate, JobUpload, RemoveJson
from .routers import events as events_router
from .routers import health, jobs, outputs, remove
from .state import Services

DESCRIPTION = """Background removal with BEN2 as a service.

Authenticate with `Authorization: Bearer <API key>` (keys come from `ben2q keys create`).
Errors are RFC 9457 problem documents (`application/problem+json`) with a stable `code`.
Every authenticated answer carries `RateLimit-Policy` and `RateLimit` headers.
"""


class RateLimitHeaders:
    """Adds the caller's ``RateLimit`` headers (left in ``request.state.rate`` by the auth
    dependency) to the answer. Plain ASGI: a ``BaseHTTPMiddleware`` costs a task and a
    stream per request, a third of the throughput of a cheap endpoint."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                decisions = scope.get("state", {}).get("rate")
                if decisions:
                    headers = MutableHeaders(scope=message)
                    for name, value in rate_headers(decisions).items():
                        if name not in headers:
                            headers.append(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (JobCreate, JobUpload, RemoveJson):
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = problems.document(schema)
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.build(settings, started_at=time.time())
        app.state.services = services
        # Everything built so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise stall requests for milliseconds.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await services.aclose()

    app = FastAPI(
        title="ben2q",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    problems.install(app)
    app.add_middleware(RateLimitHeaders)
    if settings.api_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api_cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Prefer",
                "Last-Event-ID",
            ],
            expose_headers=[
                "Location",
                "RateLimit",
                "RateLimit-Policy",
                "Retry-After",
                "X-Job-Id",
                "X-Width",
                "X-Height",
                "X-Subject",
                "X-Foreground-Left",
                "X-Foreground-Top",
                "X-Foreground-Width",
                "X-Foreground-Height",
                "Preference-Applied",
            ],
            max_age=600,
        )
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(outputs.router)
    app.include_router(remove.router)
    app.include_router(events_router.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
