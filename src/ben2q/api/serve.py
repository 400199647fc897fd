"""``ben2q api``: serve ``create_app`` with uvicorn (uvloop and httptools when present)."""

from __future__ import annotations

from ..config import Settings


def run_api(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    access_log: bool = False,
) -> int:
    import uvicorn

    uvicorn.run(
        "ben2q.api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=settings.api_port if port is None else port,
        workers=workers or settings.api_workers,
        access_log=access_log,
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=10,
        # Bounded request lines and headers: h11's default cap applies to the whole head.
        h11_max_incomplete_event_size=64 * 1024,
    )
    return 0
