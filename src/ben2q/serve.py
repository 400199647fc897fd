"""Starting workers: ``ben2q worker`` (one per GPU), ``--gpus all`` and ``ben2q up``.

``ben2q worker`` is ``celery -A ben2q.worker worker`` with our defaults: the prefork pool
with one child (one model per GPU), the job queue, and an explicit hostname. ``--gpu N``
pins the worker to GPU N through ``CUDA_VISIBLE_DEVICES`` before anything touches CUDA.
``--gpus all`` supervises one such worker per visible device and restarts one that dies.
``ben2q up`` runs the whole service on one machine: a private ``redis-server``, a worker
and ``file://`` storage under a local root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .broker import held_options, unacked_key
from .config import Settings, get_settings
from .health import EXIT_OUT_OF_SERVICE


def _has_option(argv: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def default_queues(s: Settings) -> str:
    """What a worker consumes, in order of precedence: webhook deliveries (short), image
    jobs, then batch chunks (``queue_order_strategy=priority`` reads them in this order)."""
    return f"{s.webhook_queue},{s.queue},{s.batch_queue}"


def worker_argv(passthrough: Sequence[str], *, queues: str | None, gpu: int | None) -> list[str]:
    """The ``celery worker`` arguments for one ben2q worker.

    Without mingle and gossip: mingle waits a second at every start for other workers to
    send their revoked task ids and clocks, and gossip has every worker consume every other
    worker's events; ben2q uses neither (cancellation lives in the status store, health in
    probe files), and an autoscaled worker's start is queue wait (see README, Cold start).
    """
    argv = ["worker", "--pool=prefork", "--concurrency=1", "--without-mingle", "--without-gossip"]
    s = get_settings()
    argv.append(f"--queues={queues or default_queues(s)}")
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


def run_worker(
    passthrough: Sequence[str], *, queues: str | None, gpu: int | None, quiet: bool = False
) -> int:
    """Run one worker in this process; returns its exit status when it stops
    (``EXIT_OUT_OF_SERVICE`` if it could not run jobs)."""
    if gpu is not None:
        pin_gpu(gpu)
    get_settings.cache_clear()
    # after the environment is final: the app reads Settings
    from .worker import ConfigurationError, app, check_visibility_timeout, guard

    try:
        check_visibility_timeout(app.conf.ben2q_settings)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    queues = queues or default_queues(app.conf.ben2q_settings)
    argv = worker_argv(passthrough, queues=queues, gpu=gpu)
    consumed = [q.strip() for q in queues.split(",") if q.strip()]
    key = unacked_key(app.conf.ben2q_settings, consumed)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **held_options(key)}
    app.worker_main(["--quiet", *argv] if quiet else argv)
    return guard.exitcode or 0  # EXIT_OUT_OF_SERVICE when it could not run jobs


def visible_gpus(spec: str) -> list[int]:
    """``all`` (every CUDA device torch sees) or a comma list such as ``0,2``."""
    if spec != "all":
        return [int(x) for x in spec.split(",") if x.strip()]
    import torch

    return list(range(torch.cuda.device_count()))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if its supervisor dies, instead of running on alone."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """A supervised child in its own session: a Ctrl-C at the terminal reaches only the
    supervisor, which stops its children once each and in order (workers, then Redis)."""
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent, **kwargs
    )


class Supervisor:
    """Runs named commands, restarts one that dies (with backoff), and does not restart
    one that exits ``EXIT_OUT_OF_SERVICE`` (it cannot run jobs; it said why in its log):
    that one is reported and left stopped."""

    def __init__(
        self,
        commands: dict[str, list[str]],
        env: dict[str, str] | None = None,
        *,
        report: bool = True,
    ) -> None:
        self.commands = commands
        self.env = env
        self.report = report
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = dict.fromkeys(commands, 0)
        self.out_of_service: list[str] = []

    def start(self) -> None:
        self.procs = {name: spawn(cmd, self.env) for name, cmd in self.commands.items()}

    def poll(self) -> None:
        """Handle the commands that exited since the last call."""
        for name, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if code == EXIT_OUT_OF_SERVICE:
                del self.procs[name]
                self.out_of_service.append(name)
                if self.report:
                    print(
                        f"{name} cannot run jobs (see its last log line); not restarted",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            self.restarts[name] += 1
            delay = min(60, 2 ** self.restarts[name])
            print(f"{name} exited ({code}); restarting in {delay} s", file=sys.stderr, flush=True)
            time.sleep(delay)
            self.procs[name] = spawn(self.commands[name], self.env)

    @property
    def running(self) -> bool:
        return bool(self.procs)

    def run(self, stopping: Callable[[], bool], on_poll: Callable[[], None] | None = None) -> None:
        """Start, then watch the commands until ``stopping()`` or none is left running;
        ``on_poll`` after each look. Stops what still runs."""
        self.start()
        while not stopping() and self.running:
            time.sleep(0.2)
            if stopping():
                break
            self.poll()
            if on_poll is not None:
                on_poll()
        self.stop()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: running jobs finish
        for proc in self.procs.values():
            proc.wait()


def _stop_on_signals() -> Callable[[], bool]:
    """SIGTERM/SIGINT set a flag instead of raising; returns its reader."""
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return lambda: stopping


def supervise(commands: dict[str, list[str]], env: dict[str, str] | None = None) -> int:
    """Run the commands until SIGTERM/SIGINT; 0, or ``EXIT_OUT_OF_SERVICE`` when every one
    of them stopped because it cannot run jobs."""
    sup = Supervisor(commands, env)
    sup.run(_stop_on_signals())
    return 0 if sup.running or not sup.out_of_service else EXIT_OUT_OF_SERVICE


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_up(*, root: Path, port: int, passthrough: Sequence[str]) -> int:
    """Redis + one worker + file:// storage under ``root``, until interrupted.

    For a person at a terminal: readable logs (unless ``BEN2Q_LOG_FORMAT`` says otherwise),
    no Celery banner, "ben2q is up" only once the model is warm, and if the worker cannot
    run jobs, its one-line reason and a non-zero exit instead of a service that hangs."""
    from .health import check_workers

    redis = shutil.which("redis-server")
    if redis is None:
        print(
            "error: redis-server is not installed: `apt-get install redis-server` "
            "(or run `bash scripts/setup.sh` as root)",
            file=sys.stderr,
        )
        return 2
    root = root.resolve()
    state = root / ".ben2q"
    data = state / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = spawn(
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
    health_dir = Path(os.environ.get("BEN2Q_HEALTH_DIR") or state / "health")
    env = {
        **os.environ,
        "BEN2Q_BROKER_URL": url,
        "BEN2Q_LOCAL_ROOT": str(root),
        "BEN2Q_HEALTH_DIR": str(health_dir),
    }
    env.setdefault("BEN2Q_LOG_FORMAT", "text")
    node = f"ben2q@{socket.gethostname()}"  # the worker clears its previous run's files
    print(
        f"starting Redis on {url} and a worker (loading the model)...", file=sys.stderr, flush=True
    )
    stopping = _stop_on_signals()
    sup = Supervisor(
        {
            "worker": [
                sys.executable,
                "-m",
                "ben2q.cli",
                "worker",
                "--quiet",
                "--hostname",
                node,
                *passthrough,
            ]
        },
        env,
        report=False,  # the closing line below says it
    )
    announced = False

    def announce_once_ready() -> None:
        nonlocal announced
        if not announced and check_workers(health_dir, name=node, ready=True).ok:
            announced = True
            print(
                f"ben2q is up: broker {url}, local root {root}\n"
                f"  export BEN2Q_BROKER_URL={url} BEN2Q_LOCAL_ROOT={root} "
                f"BEN2Q_HEALTH_DIR={health_dir}\n"
                f"  ben2q submit file://{root}/photo.jpg --output file://{root}/out/ --wait\n"
                "Ctrl-C stops the worker and Redis.",
                flush=True,
            )

    try:
        sup.run(stopping, announce_once_ready)
    finally:
        redis_proc.terminate()
        redis_proc.wait(20)
    if sup.out_of_service:
        print(
            "ben2q up stopped: the worker cannot run jobs (the reason is the line above)",
            file=sys.stderr,
        )
        return EXIT_OUT_OF_SERVICE
    return 0


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
