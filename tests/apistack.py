"""The HTTP API for end-to-end tests: a real ``ben2q api`` process (uvicorn on a free
loopback port) beside real workers, redis-server and SeaweedFS; clients are httpx."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from servers import free_port
from stack import ROOT, Worker, png_bytes, service_env, settings_of

from ben2q.api.problems import PROBLEM_TYPE
from ben2q.config import Settings
from ben2q.keys import ApiKey, KeyStore

API_DB = 5
"""Redis database of the API tests' service (broker, records, keys): no other module's."""
TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def photo_image(seed: int = 0, size=(64, 48)) -> Image.Image:
    """A noisy RGB picture, different for each seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8))


def photo(seed: int = 0, size=(64, 48)) -> bytes:
    """``photo_image`` as PNG bytes."""
    return png_bytes(photo_image(seed, size))


def problem(response: httpx.Response, status: int, code: str, pointer: str | None = None) -> dict:
    """The problem document of ``response``, checked: status, code, type and the named
    field (``pointer``) when given."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert body["type"] == PROBLEM_TYPE + code and body["title"] and body["detail"]
    if pointer is not None:
        assert pointer in [e["pointer"] for e in body.get("errors", [])], body
    return body


def wait_done(http: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    """The job's record once it is in a terminal state (polled over the API)."""
    deadline = time.monotonic() + timeout
    record: dict = {}
    while time.monotonic() < deadline:
        record = http.get(f"/v1/jobs/{job_id}").json()
        if record["state"] in TERMINAL:
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not done: {record}")


class ApiServer:
    """A real ``ben2q api`` process; ``stop`` ends it, ``start`` runs it again."""

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 1) -> None:
        self.env = env
        self.log = log
        self.workers = workers
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ApiServer:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ben2q.cli",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
            ],
            env=self.env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"api not up: {self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class ApiStack:
    """What the API tests share: the service's environment, its processes and helpers."""

    env: dict[str, str]
    settings: Settings
    api: ApiServer
    worker: Worker
    redis_url: str
    root: Path
    s3: object
    logs: Path
    keys: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.api.url

    def key(self, name: str = "tenant", **options) -> tuple[ApiKey, str]:
        """A new API key (record, token); inputs default to the ``api-in`` bucket and
        outputs to ``s3://api-out/<name>-<id>/``."""
        options.setdefault("input_prefixes", ["s3://api-in/"])
        store = KeyStore(self.redis_url)
        try:
            return store.create(name, **options)
        finally:
            store.close()

    def revoke(self, key_id: str) -> None:
        store = KeyStore(self.redis_url)
        try:
            store.revoke(key_id)
        finally:
            store.close()

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def put(self, key: str, data: bytes, bucket: str = "api-in") -> str:
        self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def read(self, uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def api_env(redis_server, s3_server, root: Path, **extra: str) -> dict[str, str]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{API_DB}"
    return service_env(
        redis_server,
        s3_server,
        BEN2Q_BROKER_URL=url,
        BEN2Q_LOCAL_ROOT=str(root),
        BEN2Q_API_OUTPUT_LOCATION="s3://api-out/",
        BEN2Q_API_UPLOAD_LOCATION="s3://api-up/",
        BEN2Q_API_RATE_REQUESTS="100000",
        BEN2Q_API_RATE_IMAGES="100000",
        BEN2Q_HEARTBEAT_INTERVAL="1",
        BEN2Q_HEALTH_DIR=str(root / ".health"),
        **extra,
    )


def start_stack(redis_server, s3_server, tmp: Path) -> ApiStack:
    import redis

    root = tmp / "root"
    root.mkdir()
    logs = tmp / "logs"
    logs.mkdir()
    env = api_env(redis_server, s3_server, root)
    url = env["BEN2Q_BROKER_URL"]
    redis.Redis.from_url(url).flushdb()
    for bucket in ("api-in", "api-out", "api-up", "api-other"):
        s3_server.create_bucket(bucket)
    worker = Worker(env, logs / "worker.log", name="apiw")
    api = ApiServer(env, logs / "api.log").start()
    return ApiStack(
        env=env,
        settings=settings_of(env),
        api=api,
        worker=worker,
        redis_url=url,
        root=root,
        s3=s3_server.client(),
        logs=logs,
    )
