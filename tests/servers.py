"""Real servers for tests: ``redis-server`` and moto's standalone S3 server, on free ports.

Each runs as its own process on loopback and can be stopped and started again (fault
tests). Nothing here fakes a protocol: clients talk Redis and S3 over TCP/HTTP.
``TcpProxy`` stands between a client and a server whose state must survive an outage
(moto keeps its buckets in memory): closing the proxy makes the server unreachable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up in {timeout} s: {last}")


class RedisServer:
    """A private ``redis-server`` (optionally append-only) in ``workdir``."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self._ping, f"redis-server on port {self.port}")
        return self

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self, sig: str = "term") -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if sig == "kill" else self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


class S3Server:
    """moto's standalone server, a real S3 endpoint over HTTP."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        env = {**os.environ, **S3_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "moto.log", "ab"),
            env=env,
        )
        _wait(
            lambda: urllib.request.urlopen(self.url + "/moto-api/", timeout=1).status == 200,
            f"moto server on port {self.port}",
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


_METHODS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ")


class TcpProxy:
    """A loopback TCP proxy in front of ``target_port``, to take a server away and back.

    ``close()`` stops listening (new connections are refused) and drops every open
    connection; ``open()`` listens again on the same port. On the way to the server it
    watches HTTP requests (a chunk that begins with a method): ``requests`` lists their
    first lines; ``mode`` ``"drop_puts"`` drops the connection of every ``PUT`` (an upload
    that never arrives), ``"hold_puts"`` holds each ``PUT`` (``put_seen`` is set) until
    ``release()``, which drops it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "forward"
        self.requests: list[bytes] = []
        self.put_seen = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> TcpProxy:
        if self._listener is not None:
            return self
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()
        return self

    def close(self) -> None:
        """Refuse new connections and drop the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            if self._accepting is not None:
                self._accepting.join(5)
        self._drop_all()

    def hold(self) -> None:
        """Hold every upload from now on (until ``release``)."""
        self._release.clear()
        self.put_seen.clear()
        self.mode = "hold_puts"

    def release(self) -> None:
        """Stop holding uploads: the held ones are dropped, later ones pass."""
        self.mode = "forward"
        self._release.set()

    def puts(self) -> list[bytes]:
        with self._lock:
            return [r for r in self.requests if r.startswith(b"PUT ")]

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            _shut(conn)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _shut(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                if to_server and chunk.startswith(_METHODS):
                    with self._lock:
                        self.requests.append(chunk.split(b"\r\n", 1)[0])
                    if chunk.startswith(b"PUT ") and self.mode == "drop_puts":
                        break
                    if chunk.startswith(b"PUT ") and self.mode == "hold_puts":
                        self.put_seen.set()
                        self._release.wait(120)
                        break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            _shut(src)
            _shut(dst)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
