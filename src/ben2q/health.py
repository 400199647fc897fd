"""Cheap, truthful worker probes: a few small files each worker keeps up to date.

A probe must not import the Celery app, load torch or call the broker: it runs every few
seconds in every container, and a probe that asks the broker says more about the broker
than about the worker. So each worker keeps a directory ``<BEN2Q_HEALTH_DIR>/<node name>/``:

- ``alive``: written by the worker's main process when it starts (its pid) and touched
  from its consumer loop every ``BEN2Q_HEARTBEAT_INTERVAL`` seconds (also while it waits
  for the model, and while it retries an unreachable broker). Its age is the liveness
  signal: a main loop that stopped turning stops touching it.
- ``ready-<pid>``: written by a pool process once its model is loaded and the warm-up
  forward has run (JSON: model, device, precision, warm-up seconds).
- ``consuming``: present while the consumer is connected and taking jobs (written when
  it starts, removed when it stops: broker lost, shutdown).
  Ready means: alive, consuming, and a process that holds a warm model is still running.
- ``failed``: the one-line reason a worker went out of service (model unavailable, device
  failure, its pool process dying again and again). The worker exits right after.

``ben2q health --worker`` checks liveness and ``--ready`` readiness (exit status 0 or 1,
one line); this module has no dependency beyond the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

__all__ = ["EXIT_OUT_OF_SERVICE", "Verdict", "WorkerFiles", "check_workers", "pid_running"]

EXIT_OUT_OF_SERVICE = 69
"""Exit status of a worker that cannot run jobs (``EX_UNAVAILABLE``): supervisors
(``ben2q up``, ``ben2q worker --gpus all``) report it and do not restart it."""


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) S ...": the state follows the last ')'
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class WorkerFiles:
    """The probe files of one worker (``node``, e.g. ``gpu0@host``) under ``directory``."""

    def __init__(self, directory: Path, node: str) -> None:
        self.node = node
        self.dir = Path(directory) / quote(node, safe="@._-")
        self.alive = self.dir / "alive"
        self.consuming = self.dir / "consuming"
        self.failed = self.dir / "failed"

    def ready_file(self, pid: int) -> Path:
        return self.dir / f"ready-{pid}"

    # --- the worker's main process ---------------------------------------------------

    def start(self) -> None:
        """A new worker under this name: forget the previous one's state, write ``alive``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _write_atomic(self.alive, json.dumps({"pid": os.getpid(), "node": self.node}))

    def beat(self) -> None:
        """Touch ``alive`` (recreated if it went missing)."""
        try:
            os.utime(self.alive)
        except FileNotFoundError:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.alive, json.dumps({"pid": os.getpid(), "node": self.node}))

    def consumer_started(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.consuming.touch()

    def consumer_stopped(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.consuming.unlink()

    def draining(self) -> None:
        """The worker stops taking jobs: it is no longer ready."""
        self.consumer_stopped()
        for path in self.dir.glob("ready-*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def forget_process(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ready_file(pid).unlink()

    def stopped(self) -> None:
        """The worker exited: its files go, except ``failed`` (the reason it stopped)."""
        self.draining()
        with contextlib.suppress(FileNotFoundError):
            self.alive.unlink()
        with contextlib.suppress(OSError):  # not empty: ``failed`` stays for the probes
            self.dir.rmdir()

    # --- a pool process ---------------------------------------------------------------

    def mark_ready(self, info: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        _write_atomic(self.ready_file(pid), json.dumps({"pid": pid, "at": time.time(), **info}))

    def mark_failed(self, reason: str) -> None:
        """Record why this worker cannot serve (first reason wins)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.failed.exists():
            _write_atomic(self.failed, reason.strip().splitlines()[0] if reason.strip() else "?")

    # --- readers ----------------------------------------------------------------------

    def failure(self) -> str | None:
        try:
            return self.failed.read_text().strip() or None
        except FileNotFoundError:
            return None

    def ready_processes(self) -> dict[int, dict[str, Any]]:
        """The pool processes that reported a warm model, by pid (dead ones included)."""
        found: dict[int, dict[str, Any]] = {}
        for path in self.dir.glob("ready-*"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(path.name.removeprefix("ready-"))
                found[pid] = json.loads(path.read_text())
        return found


@dataclass(frozen=True)
class Verdict:
    """The result of a probe: healthy or not, with one line per worker."""

    ok: bool
    lines: tuple[str, ...]


def _check_one(files: WorkerFiles, *, ready: bool, max_age: float, now: float) -> tuple[bool, str]:
    name = files.node
    reason = files.failure()
    if reason is not None:
        return False, f"{name}: out of service: {reason}"
    try:
        info = json.loads(files.alive.read_text())
        age = now - files.alive.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return False, f"{name}: not running (no heartbeat file)"
    pid = int(info.get("pid", 0))
    if not pid_running(pid):
        return False, f"{name}: not running (pid {pid} is gone)"
    if age > max_age:
        return False, f"{name}: no heartbeat for {age:.0f} s (at most {max_age:g} s)"
    if not ready:
        return True, f"{name}: alive (pid {pid}, heartbeat {age:.1f} s ago)"
    warm = {p: i for p, i in files.ready_processes().items() if pid_running(p)}
    if not warm:
        return False, f"{name}: alive, not ready (no process with a warm model yet)"
    if not files.consuming.exists():
        return False, f"{name}: alive, not ready (not consuming: broker unreachable or stopping)"
    first = next(iter(warm.values()))
    if first.get("model") == "none":
        return True, f"{name}: ready (no model: webhook deliveries only)"
    what = f"{first.get('model')} {first.get('precision')} on {first.get('device')}"
    return True, f"{name}: ready ({len(warm)} warm: {what})"


def check_workers(
    directory: Path,
    *,
    name: str | None = None,
    ready: bool = False,
    max_age: float = 60.0,
    now: float | None = None,
) -> Verdict:
    """Liveness (``ready=False``) or readiness of the worker ``name``, or of every worker
    that keeps its files in ``directory`` (each must pass)."""
    now = time.time() if now is None else now
    directory = Path(directory)
    if name is not None:
        workers = [WorkerFiles(directory, name)]
    else:
        subdirs = sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        workers = [WorkerFiles(directory, unquote(p.name)) for p in subdirs]
    if not workers:
        return Verdict(False, (f"no worker keeps its health files in {directory}",))
    results = [_check_one(w, ready=ready, max_age=max_age, now=now) for w in workers]
    return Verdict(all(ok for ok, _ in results), tuple(line for _, line in results))
