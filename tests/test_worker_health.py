"""A worker is either able to run jobs or not running; its probes tell the truth.

Real processes only: the session's ``redis-server`` (one test has its own, to stop it),
real ``ben2q worker`` processes (tiny network, CPU, ``file://`` storage) and the real
``ben2q health`` command. Faults of the model's device are injected below ben2q's code by
``tests/inject/sitecustomize.py`` (torch's own exceptions from the network's forward, a
process killed with SIGKILL); missing and corrupt weights and a missing device are real.

Each failing case checks: the worker exits with ``EXIT_OUT_OF_SERVICE`` and one log line
naming the error (no traceback); the job it could not run is not lost: untouched in the
queue when the failure came at start-up, back in the queue (record ``queued``) when it came
during the job; and a healthy worker started afterwards does it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import synthetic_image
from servers import RedisServer
from stack import ROOT, Worker

from ben2q.client import Client
from ben2q.config import Settings
from ben2q.engine import choose_precision, cpu_runs_natively
from ben2q.health import EXIT_OUT_OF_SERVICE, WorkerFiles, check_workers

DB = 12  # the session server is shared: this module keeps to its own database
INJECT = ROOT / "tests" / "inject"
_names = itertools.count()


class Service:
    """One test's queue, file root, health directory and workers (killed at the end)."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.queue = f"health{next(_names)}"
        self.root = tmp / "root"
        (self.root / "in").mkdir(parents=True)
        self.health = tmp / "health"
        self.workers: list[Worker] = []
        self.clients: list[Client] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BEN2Q_", "HF_"))}
        env.update(
            {
                "BEN2Q_BROKER_URL": self.url,
                "BEN2Q_QUEUE": self.queue,
                "BEN2Q_WEBHOOK_QUEUE": self.queue + "-hooks",
                "BEN2Q_MODEL_SPEC": "tiny",
                "BEN2Q_DEVICE": "cpu",
                "BEN2Q_PRECISION": "float32",
                "BEN2Q_LOCAL_ROOT": str(self.root),
                "BEN2Q_HEALTH_DIR": str(self.health),
                "BEN2Q_HEARTBEAT_INTERVAL": "0.5",
                "BEN2Q_LOG_FORMAT": "text",
                "HF_HUB_OFFLINE": "1",
                "HF_HOME": str(self.tmp / "empty-hf"),
                "PYTHONPATH": os.pathsep.join([str(INJECT), str(ROOT / "src")]),
                **extra,
            }
        )
        return env

    def worker(self, name: str, *, wait: bool = True, **extra: str) -> Worker:
        w = Worker(self.env(**extra), self.tmp / f"{name}.log", name=name, wait=wait)
        self.workers.append(w)
        return w

    def client(self) -> Client:
        settings = Settings(
            broker_url=self.url,
            queue=self.queue,
            webhook_queue=self.queue + "-hooks",
            local_root=self.root,
        )
        c = Client(settings=settings)
        self.clients.append(c)
        return c

    def job(self, client: Client, name: str = "photo") -> str:
        path = self.root / "in" / f"{name}.png"
        synthetic_image(80, 60, seed=len(name)).save(path)
        return client.submit(f"file://{path}", output=f"file://{self.root}/out/").id

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        for c in self.clients:
            c.close()


@pytest.fixture()
def service(url, tmp_path):
    s = Service(url, tmp_path)
    yield s
    s.close()


def exit_status(w: Worker, timeout: float = 120) -> int:
    return w.proc.wait(timeout)


def problem_lines(log: Path) -> list[str]:
    """Log lines at WARNING or above, and anything that looks like a traceback."""
    return [
        line
        for line in log.read_text(errors="replace").splitlines()
        if " CRITICAL " in line or " ERROR " in line or "Traceback" in line
    ]


def queued_messages(raw, queue: str) -> int:
    return raw.llen(queue)


def health(service: Service, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ben2q.cli", "health", "--worker", *args],
        env=service.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- failing at start-up: the worker exits before it consumes anything -----------------


def _corrupt_weights(tmp: Path) -> dict[str, str]:
    path = tmp / "BEN2_Base.pth"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 100)
    return {"BEN2Q_MODEL_SPEC": "base", "BEN2Q_WEIGHTS": str(path)}


STARTUP_FAILURES = {
    "no_weights": (
        lambda tmp: {"BEN2Q_MODEL_SPEC": "base"},  # offline, empty hub cache
        "weights_unavailable: no BEN2 weights: BEN2_Base.pth is not in the Hugging Face cache",
        "BEN2Q_WEIGHTS=",
    ),
    "corrupt_weights": (
        _corrupt_weights,
        "weights_unavailable: cannot read checkpoint",
        "BEN2_Base.pth",
    ),
    "no_device": (
        lambda tmp: {"BEN2Q_DEVICE": "cuda"},  # this PyTorch has no CUDA
        "device_unavailable: BEN2Q_DEVICE=cuda: this PyTorch has no CUDA support",
        "BEN2Q_DEVICE=cpu",
    ),
    "out_of_memory_at_warmup": (
        lambda tmp: {"BEN2Q_TEST_FAULT": "warmup_oom"},
        "device_unavailable: out of memory in the warm-up forward on cpu",
        "CUDA out of memory",
    ),
}


@pytest.mark.parametrize("case", sorted(STARTUP_FAILURES))
def test_a_worker_that_cannot_load_the_model_exits_before_taking_a_job(service, raw, case):
    make_env, message, hint = STARTUP_FAILURES[case]
    client = service.client()
    job = service.job(client)
    assert queued_messages(raw, service.queue) == 1

    bad = service.worker("bad", wait=False, **make_env(service.tmp))
    assert exit_status(bad) == EXIT_OUT_OF_SERVICE
    problems = problem_lines(bad.log)
    assert len(problems) == 1, bad.log.read_text()[-3000:]
    assert f"CRITICAL ben2q.worker: cannot run jobs: {message}" in problems[0]
    assert hint in problems[0]
    assert "Traceback" not in bad.log.read_text()

    # the job was not consumed: still the only message in the queue, nothing unacked
    assert queued_messages(raw, service.queue) == 1
    assert raw.zcard("unacked_index") == 0
    assert client.get(job).state == "queued" and client.get(job).attempts == 0
    verdict = health(service)
    assert verdict.returncode == 1
    assert verdict.stdout.startswith("bad@") and f"out of service: {message}" in verdict.stdout

    service.worker("good")  # a healthy worker does it
    final = client.wait(job, timeout=120)
    assert final.state == "succeeded" and final.attempts == 1
    assert final.worker.startswith("good@")


# --- failing later: the worker leaves service, its jobs go back to the queue -----------


def test_a_device_failure_during_a_job_takes_the_worker_out_and_requeues_the_job(service, raw):
    client = service.client()
    bad = service.worker("bad", BEN2Q_TEST_FAULT="device_error")
    assert health(service, "--ready").returncode == 0
    job = service.job(client)
    assert exit_status(bad) == EXIT_OUT_OF_SERVICE
    problems = problem_lines(bad.log)
    assert len(problems) == 1, bad.log.read_text()[-3000:]
    assert (
        "CRITICAL ben2q.worker: leaving service: device_unavailable: cpu failed: "
        "CUDA error: an illegal memory access was encountered" in problems[0]
    )
    status = client.get(job)
    assert status.state == "queued" and status.attempts == 1
    assert status.error is not None and status.error.code == "device_unavailable"
    assert "goes back to the queue" in status.error.message
    assert queued_messages(raw, service.queue) == 1  # the message is back, not lost
    assert raw.zcard("unacked_index") == 0

    service.worker("good")
    final = client.wait(job, timeout=120)
    assert final.state == "succeeded" and final.attempts == 2 and final.error is None
    assert final.worker.startswith("good@")
    assert len(list((service.root / "out" / job).iterdir())) == 1


def test_a_pool_process_dying_again_and_again_takes_the_worker_out(service, raw):
    client = service.client()
    bad = service.worker(
        "bad",
        BEN2Q_TEST_FAULT="crash_on_job",
        BEN2Q_WORKER_MAX_CHILD_FAILURES="2",
        BEN2Q_JOB_MAX_ATTEMPTS="5",
    )
    job = service.job(client)
    assert exit_status(bad) == EXIT_OUT_OF_SERVICE
    text = bad.log.read_text()
    assert text.count("died (signal SIGKILL)") == 2, text[-3000:]
    [line] = [ln for ln in text.splitlines() if " CRITICAL " in ln]
    assert "leaving service: its pool process died 2 times in a row without finishing a job" in (
        line
    )
    status = client.get(job)
    assert status.state in ("queued", "running") and status.attempts == 2
    assert queued_messages(raw, service.queue) == 1

    service.worker("good")
    final = client.wait(job, timeout=120)
    assert final.state == "succeeded" and final.attempts == 3
    assert final.worker.startswith("good@")


def _acknowledged(raw, timeout: float = 30) -> None:
    """Wait until the worker's main process has taken the result of its last job (it
    acknowledges the message then); the record says succeeded a moment before."""
    deadline = time.monotonic() + timeout
    while raw.zcard("unacked_index"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_deaths_with_finished_jobs_in_between_do_not_take_the_worker_out(service, raw):
    """A job that kills its process now and then (a poison input) is not a broken worker:
    the count is of deaths in a row."""
    client = service.client()
    w = service.worker("w", BEN2Q_WORKER_MAX_CHILD_FAILURES="2", BEN2Q_JOB_MAX_ATTEMPTS="1")
    for round_ in range(3):
        children = w.children()
        assert children
        os.kill(children[0], signal.SIGKILL)  # a death...
        job = service.job(client, f"photo{round_}")
        assert client.wait(job, timeout=120).state == "succeeded"  # ...then a finished job
        _acknowledged(raw)
    assert w.proc.poll() is None
    assert health(service, "--ready").returncode == 0


# --- probes ------------------------------------------------------------------------------


def test_liveness_follows_the_main_loop_and_readiness_the_warm_model(service):
    # precision auto, as in production: the worker says which it chose and why
    w = service.worker("w", wait=False, BEN2Q_TEST_FAULT="slow_warmup:4", BEN2Q_PRECISION="auto")
    deadline = time.monotonic() + 60
    while not (service.health / f"w@{os.uname().nodename}" / "alive").exists():
        assert time.monotonic() < deadline and w.proc.poll() is None
        time.sleep(0.05)
    # loading: alive (it beats while it waits for the model), not ready
    time.sleep(1.5)
    live, ready = health(service), health(service, "--ready")
    assert live.returncode == 0 and "alive" in live.stdout, live.stdout
    assert ready.returncode == 1 and "not ready" in ready.stdout, ready.stdout
    w.wait_ready()
    ready = health(service, "--ready")
    chosen = choose_precision("auto", torch.device("cpu"))
    assert chosen.name == ("bfloat16" if cpu_runs_natively(torch.bfloat16) else "float32")
    expected = f"ready (1 warm: tiny {chosen.name} on cpu)"
    assert ready.returncode == 0 and expected in ready.stdout, ready.stdout
    assert f"in {chosen.name} ({chosen.reason})" in w.log.read_text()

    files = WorkerFiles(service.health, f"w@{os.uname().nodename}")
    first = files.alive.stat().st_mtime
    time.sleep(1.2)
    assert files.alive.stat().st_mtime > first  # touched from the consumer loop

    os.kill(w.proc.pid, signal.SIGSTOP)  # the main loop stops turning
    try:
        time.sleep(2.5)
        stale = health(service, "--max-age", "2")
        assert stale.returncode == 1 and "no heartbeat for" in stale.stdout, stale.stdout
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
    time.sleep(1.0)
    assert health(service, "--max-age", "2").returncode == 0

    w.stop()  # a clean stop leaves no probe file behind
    gone = health(service)
    assert gone.returncode == 1 and "no worker keeps its health files" in gone.stdout


def test_while_the_broker_is_away_the_worker_is_alive_but_not_ready(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    service = Service(redis.url, tmp_path)
    try:
        service.worker("w")
        assert health(service, "--ready").returncode == 0
        redis.stop()
        time.sleep(7)  # longer than --max-age 5: the heartbeat must come from the retries
        live = health(service, "--max-age", "5")
        ready = health(service, "--ready", "--max-age", "5")
        assert live.returncode == 0, live.stdout
        assert ready.returncode == 1 and "not consuming" in ready.stdout, ready.stdout
        redis.start()
        deadline = time.monotonic() + 60
        while health(service, "--ready").returncode != 0:
            assert time.monotonic() < deadline, "not ready again after the broker came back"
            time.sleep(0.5)
    finally:
        service.close()
        redis.stop()


def test_a_webhook_only_worker_is_ready_without_a_model(service):
    log = service.tmp / "hooks.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ben2q.cli",
            "worker",
            "--queues",
            service.queue + "-hooks",
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "--hostname",
            "hooks@%h",
        ],
        env=service.env(BEN2Q_MODEL_SPEC="base"),  # no weights here: none are loaded
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while (ready := health(service, "--ready")).returncode != 0:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, ready.stdout
            time.sleep(0.3)
        assert "ready (no model: webhook deliveries only)" in ready.stdout
        assert "weights" not in log.read_text()
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


# --- the probe's own logic ---------------------------------------------------------------


def test_check_workers_reads_the_files(tmp_path):
    files = WorkerFiles(tmp_path, "gpu0@host")
    assert not check_workers(tmp_path).ok
    files.start()
    now = time.time()
    assert check_workers(tmp_path, now=now).ok
    assert not check_workers(tmp_path, ready=True, now=now).ok  # no warm model
    files.mark_ready({"model": "base", "device": "cuda:0", "precision": "float16"})
    assert not check_workers(tmp_path, ready=True, now=now).ok  # not consuming yet
    files.consumer_started()
    verdict = check_workers(tmp_path, ready=True, now=now)
    assert verdict.ok and verdict.lines == ("gpu0@host: ready (1 warm: base float16 on cuda:0)",)
    assert not check_workers(tmp_path, max_age=10, now=now + 11).ok  # stale heartbeat
    assert check_workers(tmp_path, name="gpu0@host", now=now).ok
    assert not check_workers(tmp_path, name="gpu1@host", now=now).ok
    files.draining()
    assert check_workers(tmp_path, now=now).ok
    assert not check_workers(tmp_path, ready=True, now=now).ok
    files.mark_failed("device_unavailable: cuda:0 failed: CUDA error\nsecond line")
    verdict = check_workers(tmp_path, now=now)
    assert not verdict.ok
    assert verdict.lines == (
        "gpu0@host: out of service: device_unavailable: cuda:0 failed: CUDA error",
    )
    files.stopped()
    assert (tmp_path / "gpu0@host" / "failed").exists()  # the reason outlives the worker
    files.start()
    assert check_workers(tmp_path, now=time.time()).ok  # a new start forgets it


def test_a_dead_workers_files_do_not_pass(tmp_path):
    files = WorkerFiles(tmp_path, "w@h")
    files.start()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files.alive.write_text(f'{{"pid": {dead.pid}, "node": "w@h"}}')
    verdict = check_workers(tmp_path)
    assert not verdict.ok and f"pid {dead.pid} is gone" in verdict.lines[0]
