"""Starting workers: ``ben2q worker`` (one per GPU), ``--gpus all`` and ``ben2q up``.

``ben2q worker`` is ``celery -A ben2q.worker worker`` with our defaults: the prefork pool
with one child (one model per GPU), the job queue, and an explicit hostname. ``--gpu N``
pins the worker to GPU N through ``CUDA_VISIBLE_DEVICES`` before anything touches CUDA.
``--gpus all`` supervises one such worker per visible device and restarts one that dies.
``ben2q up`` runs the whole service on one machine: a private ``redis-server``, a worker
and ``file://`` storage under a local root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import get_settings


def _has_option(argv: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def worker_argv(passthrough: Sequence[str], *, queues: str | None, gpu: int | None) -> list[str]:
    """The ``celery worker`` arguments for one ben2q worker."""
    argv = ["worker", "--pool=prefork", "--concurrency=1"]
    s = get_settings()
    argv.append(f"--queues={queues or f'{s.queue},{s.webhook_queue}'}")
    if not _has_option(passthrough, "--hostname", "-n"):
        name = f"gpu{gpu}" if gpu is not None else "ben2q"
        argv.append(f"--hostname={name}@%h")
    if not _has_option(passthrough, "--loglevel", "-l"):
        argv.append("--loglevel=INFO")
    return argv + list(passthrough)


def pin_gpu(gpu: int, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Make GPU ``gpu`` the only one this process sees (before CUDA is initialised)."""
    environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    environ.setdefault("BEN2Q_DEVICE", "cuda:0")


def run_worker(passthrough: Sequence[str], *, queues: str | None, gpu: int | None) -> int:
    """Run one worker in this process (returns when it stops)."""
    if gpu is not None:
        pin_gpu(gpu)
    get_settings.cache_clear()
    # after the environment is final: the app reads Settings
    from .worker import ConfigurationError, app, check_visibility_timeout

    try:
        check_visibility_timeout(app.conf.ben2q_settings)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app.worker_main(worker_argv(passthrough, queues=queues, gpu=gpu))
    return 0


def visible_gpus(spec: str) -> list[int]:
    """``all`` (every CUDA device torch sees) or a comma list such as ``0,2``."""
    if spec != "all":
        return [int(x) for x in spec.split(",") if x.strip()]
    import torch

    return list(range(torch.cuda.device_count()))


def supervise(commands: dict[str, list[str]], env: dict[str, str] | None = None) -> int:
    """Run the commands, restart any that dies (with backoff), stop all on SIGTERM/SIGINT."""
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}
    restarts = dict.fromkeys(commands, 0)
    while not stopping:
        time.sleep(0.5)
        for name, proc in procs.items():
            if proc.poll() is not None and not stopping:
                restarts[name] += 1
                delay = min(60, 2 ** restarts[name])
                print(
                    f"{name} exited ({proc.returncode}); restarting in {delay} s", file=sys.stderr
                )
                time.sleep(delay)
                procs[name] = subprocess.Popen(commands[name], env=env)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown: running jobs finish
    for proc in procs.values():
        proc.wait()
    return 0


def run_gpus(spec: str, passthrough: Sequence[str], *, queues: str | None) -> int:
    """One supervised worker per GPU."""
    gpus = visible_gpus(spec)
    if not gpus:
        print("error: no CUDA device visible", file=sys.stderr)
        return 2
    base = [sys.executable, "-m", "ben2q.cli", "worker"]
    if queues:
        base += ["--queues", queues]
    return supervise({f"gpu{g}": base + ["--gpu", str(g), *passthrough] for g in gpus})


def run_up(*, root: Path, port: int, passthrough: Sequence[str]) -> int:
    """Redis + one worker + file:// storage under ``root``, until interrupted."""
    redis = shutil.which("redis-server")
    if redis is None:
        print("error: redis-server not found (apt-get install redis-server)", file=sys.stderr)
        return 2
    root = root.resolve()
    data = root / ".ben2q" / "redis"
    data.mkdir(parents=True, exist_ok=True)
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = subprocess.Popen(
        [
            redis,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    env = {**os.environ, "BEN2Q_BROKER_URL": url, "BEN2Q_LOCAL_ROOT": str(root)}
    print(
        f"ben2q is up: broker {url}, local root {root}\n"
        f"  export BEN2Q_BROKER_URL={url} BEN2Q_LOCAL_ROOT={root}\n"
        f"  ben2q submit file://{root}/photo.jpg --output file://{root}/out/ --wait\n"
        "Ctrl-C stops the worker and Redis.",
        flush=True,
    )
    try:
        return supervise(
            {"worker": [sys.executable, "-m", "ben2q.cli", "worker", *passthrough]}, env=env
        )
    finally:
        redis_proc.terminate()
        redis_proc.wait(20)


def flower_command(passthrough: Sequence[str], *, port: int) -> tuple[list[str], dict[str, str]]:
    """The Flower command line and environment: basic auth goes through the environment
    (``FLOWER_BASIC_AUTH``) so the password never shows in the process list."""
    env = dict(os.environ)
    auth = get_settings().flower_basic_auth
    if auth is not None:
        env["FLOWER_BASIC_AUTH"] = auth.get_secret_value()
    argv = [sys.executable, "-m", "celery", "-A", "ben2q.worker", "flower", f"--port={port}"]
    return argv + list(passthrough), env


def run_flower(passthrough: Sequence[str], *, port: int) -> int:
    """Flower on the job broker (replaces this process)."""
    argv, env = flower_command(passthrough, port=port)
    os.execve(argv[0], argv, env)
    return 0  # not reached
