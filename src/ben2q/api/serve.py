"""``ben2q api``: serve ``create_app`` with uvicorn (uvloop and httptools when present).

uvicorn's httptools protocol, the fast one, puts no bound on a request's head (a 200 MB
header was accepted, growing the process by as much) and no deadline on reading it (slow
clients hold connections). ``BoundedHttpToolsProtocol`` adds both: a head over
``MAX_HEAD_BYTES`` gets ``431`` and the connection is closed, and a head not complete
within ``HEAD_TIMEOUT`` seconds of its first byte closes the connection. Without httptools,
h11 bounds the head with the same number.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..config import Settings
from .problems import Problem

MAX_HEAD_BYTES = 64 * 1024
"""Request line and headers of one request, at most."""
HEAD_TIMEOUT = 30.0
"""Seconds from a request's first byte until its head must be complete."""

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn uses h11, bounded by h11_max_incomplete_event_size
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _problem_bytes(status: int, code: str, detail: str) -> bytes:
    """A whole HTTP answer carrying a problem document, written by the protocol itself
    (before any request reaches the app)."""
    problem = Problem(status, code, detail)
    body = json.dumps(problem.body()).encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, problem.title.encode()),
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class _HeadTooLarge(Exception):
    """Raised from the parser's callback to stop a request whose head is too large."""


if HttpToolsProtocol is not None:

    class BoundedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol with a bounded, timed request head."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._too_large = False

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_head_timer()
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > MAX_HEAD_BYTES:  # the whole head came in one read
                self._too_large = True
                raise _HeadTooLarge  # stops the parser; uvicorn answers via send_400_response
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                self._refuse(
                    431,
                    "request_header_too_large",
                    f"the request's head is over {MAX_HEAD_BYTES} bytes",
                )
            else:
                super().send_400_response(msg)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_expired)
            super().data_received(data)
            # Checked after parsing: a chunk that completes the head (and carries body bytes)
            # is never refused; one that leaves it incomplete is, once past the bound.
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(
                    431,
                    "request_header_too_large",
                    f"the request's head is over {MAX_HEAD_BYTES} bytes",
                )

        def _refuse(self, status: int, code: str, detail: str) -> None:
            self._cancel_head_timer()
            if not self.transport.is_closing():
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.write(_problem_bytes(status, code, detail))
                self.transport.close()

        def _head_expired(self) -> None:
            self._head_timer = None
            if self._in_head and self._head_bytes:
                self._refuse(400, "request_timeout", "the request's head came too slowly")

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)


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
        http=BoundedHttpToolsProtocol if HttpToolsProtocol is not None else "h11",
        access_log=access_log,
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    return 0
