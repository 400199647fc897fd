"""A loopback HTTP server for the corpus's URL cases: static bodies, hostile behaviours, and a
log of every request it received (so a test can prove a refused URL was never fetched).

Routes:

* any path registered with :meth:`HostileServer.put` answers its body (200);
* ``/drip``: headers at once, then one byte every 0.2 s for 10 s (a slow-drip attack);
* ``/huge-declared``: ``Content-Length`` of 10**12, a few bytes, then the connection closes;
* ``/huge-streamed``: no ``Content-Length``, ``streamed_bytes`` bytes of body;
* ``/status/<n>``: that status with a short body;
* ``/redirect/<name>``: 302 to ``redirects[name]``, formatted with ``{port}`` and ``{port6}``;
* anything else: 404.

Nothing here listens anywhere but ``127.0.0.1`` or ``::1``.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        owner: HostileServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path
        owner.requests.append((path, self.headers.get("Host", "")))
        route = path.split("?", 1)[0]
        if path in owner.bodies:
            self._reply(200, owner.bodies[path], {"Content-Type": "image/png"})
        elif route == "/drip":
            self._drip()
        elif route == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"\x89PNG\r\n\x1a\n")
        elif route == "/huge-streamed":
            self._stream(owner.streamed_bytes)
        elif route.startswith("/status/"):
            self._reply(int(route.rsplit("/", 1)[1]), b"status page")
        elif route.startswith("/redirect/") and route[10:] in owner.redirects:
            location = owner.redirects[route[10:]].format(port=owner.port, port6=owner.port6)
            self._reply(302, b"", {"Location": location})
        else:
            self._reply(404, b"not found")

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()  # no length: the body ends when the connection closes
        try:
            for _ in range(50):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up, as it should

    def _stream(self, total: int) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            sent = 0
            while sent < total:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the client stopped reading at its limit


class HostileServer:
    """Threaded HTTP servers on ``127.0.0.1`` and (where there is IPv6) ``::1``, sharing
    routes and a log."""

    def __init__(self, redirects: dict[str, str], streamed_bytes: int) -> None:
        self.bodies: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.redirects = redirects
        self.streamed_bytes = streamed_bytes
        self._servers = [_Server(("127.0.0.1", 0), _Handler)]
        try:
            self._servers.append(_Server6(("::1", 0), _Handler))
        except OSError:  # no IPv6 loopback here: the ::1 cases are refused before connecting
            pass
        for server in self._servers:
            server.owner = self  # type: ignore[attr-defined]
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
        self.port = self._servers[0].server_address[1]
        self.port6 = self._servers[-1].server_address[1]

    def put(self, path: str, body: bytes) -> None:
        self.bodies[path] = body

    def hits(self, path_prefix: str) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0].startswith(path_prefix)]

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
