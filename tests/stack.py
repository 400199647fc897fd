"""The running service for end-to-end tests: environment, real worker processes, helpers."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image
from servers import S3_ENV

from ben2q.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def service_env(redis_server, s3_server, **extra: str) -> dict[str, str]:
    """Worker/producer environment: our Redis and S3, the tiny network on the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
    env.update(S3_ENV)
    env.update(
        {
            "BEN2Q_BROKER_URL": redis_server.url,
            "BEN2Q_S3_ENDPOINT_URL": s3_server.url,
            "BEN2Q_MODEL_SPEC": "tiny",
            "BEN2Q_DEVICE": "cpu",
            "BEN2Q_PRECISION": "float32",  # the conforming path, the same on every CPU
            "BEN2Q_ALLOW_PRIVATE_URLS": "true",  # test receivers and servers live on loopback
            "BEN2Q_MAX_IMAGE_PIXELS": "4000000",
            "BEN2Q_LOG_FORMAT": "text",
            **extra,
        }
    )
    return env


def settings_of(env: dict[str, str]) -> Settings:
    """The producer's Settings for the same environment (parsed as from the environment)."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("BEN2Q_")]:
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if k.startswith("BEN2Q_")})
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def aws_env() -> Iterator[None]:
    """boto3's credential chain for this process, restored afterwards."""
    old = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Worker:
    """A real ``ben2q worker`` process (Celery prefork, one child) with its log.

    ``kill`` kills the parent and its prefork child together (as a machine loss would);
    ``stop`` is a warm shutdown that leaves no child behind.
    """

    model = True
    """False: a worker with no model (webhook deliveries) is ready without one."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        name: str = "w1",
        *,
        wait: bool = True,
        args: Sequence[str] = (),
        model: bool = True,
    ) -> None:
        self.model = model
        self.log = log
        self.name = name
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ben2q.cli",
                "worker",
                "--hostname",
                f"{name}@%h",
                "--loglevel",
                "INFO",
                *args,
            ],
            env=env,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log.read_text()[-3000:]}")
            text = self.log.read_text(errors="replace")
            if " ready." in text and (not self.model or "BEN2 tiny ready" in text):
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready: {self.log.read_text()[-3000:]}")

    def children(self) -> list[int]:
        """Pids of the parent's child processes (the prefork pool), from /proc."""
        pid = self.proc.pid
        found: list[int] = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        found += [int(x) for x in f.read().split()]
        return sorted(set(found))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the parent and then to its children (the whole worker)."""
        pids = [self.proc.pid, *self.children()]  # the parent first: it must not react
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)
            _wait_gone(pids[1:])

    def stop(self) -> None:
        children = self.children()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in children:  # a child left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(children)


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Wait until ``pids`` (orphans, reaped by init) no longer exist."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
