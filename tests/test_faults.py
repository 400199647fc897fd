"""Reliability under faults, end to end: nothing lost, nothing done twice.

Real processes only: a private append-only ``redis-server`` (restarted by one test),
SeaweedFS's S3 server (behind a ``TcpProxy`` where S3 must go away), real ``ben2q worker``
processes (tiny network, CPU; "killed" means parent and prefork child together, as a lost
machine) and loopback HTTP servers (slow image sources, a webhook receiver). Every test
uses its own queues and bucket, waits for every job it submits, and kills its workers at
the end.

Each test asserts exact final states, error codes, attempt counts and the objects under
the job's output prefix (exactly one per item, no stray keys).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from celery import Celery
from conftest import synthetic_image
from servers import RedisServer, TcpProxy, free_port
from stack import ROOT, Worker, aws_env, png_bytes, service_env, settings_of
from standardwebhooks.webhooks import Webhook

from ben2q.client import Client
from ben2q.jobs import JobStatus

SECRET = "whsec_" + base64.b64encode(b"ben2q-fault-tests-webhook-secret").decode()
_names = itertools.count()


# --- the stack -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory):
    """This module's own append-only Redis (one test restarts it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True).start()
    yield server
    server.stop()


class Faults:
    """One test's service: environment, workers (always killed at the end), bucket, helpers."""

    def __init__(self, redis: RedisServer, s3_server, tmp: Path) -> None:
        self.redis = redis
        self.s3_server = s3_server
        self.s3 = s3_server.client()
        self.tmp = tmp
        n = next(_names)
        self.queue = f"faults{n}"
        self.bucket = f"faults{n}"
        s3_server.create_bucket(self.bucket)
        self.workers: list[Worker] = []
        self.cleanups: list[Callable[[], None]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return service_env(
            self.redis,
            self.s3_server,
            BEN2Q_QUEUE=self.queue,
            BEN2Q_WEBHOOK_QUEUE=self.queue + "-hooks",
            BEN2Q_RETRY_BACKOFF_MAX="1",
            BEN2Q_IO_THREADS="4",
            **extra,
        )

    def worker(self, env: dict[str, str], name: str, *, wait: bool = True) -> Worker:
        w = Worker(env, self.tmp / f"{name}.log", name=name, wait=wait)
        self.workers.append(w)
        return w

    def start_workers(self, *specs: tuple[dict[str, str], str]) -> list[Worker]:
        """Start several workers at once and wait until all are ready."""
        workers = [self.worker(env, name, wait=False) for env, name in specs]
        for w in workers:
            w.wait_ready()
        return workers

    def client(self, env: dict[str, str], **overrides) -> Client:
        settings = settings_of(env)
        if overrides:
            settings = settings.model_copy(update=overrides)
        c = Client(settings=settings)
        self.cleanups.append(c.close)
        return c

    def put(self, name: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=f"in/{name}", Body=data)
        return f"s3://{self.bucket}/in/{name}"

    def images(self, prefix: str, n: int, size: tuple[int, int] = (96, 72)) -> list[str]:
        return [
            self.put(f"{prefix}/{i}.png", png_bytes(synthetic_image(*size, seed=i)))
            for i in range(n)
        ]

    @property
    def output(self) -> str:
        return f"s3://{self.bucket}/out/"

    def keys(self, job_id: str) -> list[str]:
        """Every object under the job's output prefix."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"out/{job_id}/"
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def assert_outputs(self, status: JobStatus) -> None:
        """Exactly the job's succeeded items' outputs exist under its prefix, once each."""
        expected = sorted(
            i.output.removeprefix(f"s3://{self.bucket}/")
            for i in status.items
            if i.state == "succeeded"
        )
        assert self.keys(status.id) == expected
        assert len(expected) == len(set(expected))

    def close(self) -> None:
        for w in self.workers:  # the test is over: no need to wait for a warm shutdown
            w.kill()
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()


@pytest.fixture()
def faults(redis_aof, s3_server, tmp_path):
    f = Faults(redis_aof, s3_server, tmp_path)
    try:
        with aws_env():
            yield f
    finally:
        f.close()


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def state_is(client: Client, job_id: str, *states: str) -> Callable[[], JobStatus | None]:
    def check() -> JobStatus | None:
        status = client.get(job_id)
        return status if status.state in states else None

    return check


class TaskEvents:
    """Celery task events of every worker on the broker (``task-started`` etc.)."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("ben2q-fault-events", broker=broker_url, set_as_current=False)
        self.events: list[dict] = []
        self.receiver = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        time.sleep(0.3)  # the subscription is live

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(
                conn, handlers={"*": self.events.append}, app=self.app
            )
            self.ready.set()
            with contextlib.suppress(Exception):
                self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, job_id: str, kind: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("uuid") == job_id and e["type"] == kind]

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)
        self.app.close()


class SlowImages(BaseHTTPRequestHandler):
    """``GET /<delay>/<name>.png``: a PNG after ``delay`` seconds (released early by
    ``gate``)."""

    body = b""
    gate = threading.Event()
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        delay = float(self.path.split("/")[1])
        self.gate.wait(delay)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def slow_images() -> Iterator[str]:
    SlowImages.body = png_bytes(synthetic_image(64, 48, seed=5))
    SlowImages.gate = threading.Event()
    SlowImages.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        SlowImages.gate.set()
        server.shutdown()
        server.server_close()


# Delivery settings of the tests that kill workers: an 18 s visibility timeout, and time
# limits and a prefetch small enough for the rule (prefetch 2 x 6 s + 5 s < 18 s).
VT = 18
SHORT_VT = {
    "BEN2Q_VISIBILITY_TIMEOUT": str(VT),
    "BEN2Q_MAX_BATCH": "1",
    "BEN2Q_JOB_SOFT_TIME_LIMIT": "5",
    "BEN2Q_JOB_TIME_LIMIT": "6",
    "BEN2Q_WEBHOOK_TIMEOUT": "0.5",
}


# --- 1. a worker killed mid-job ----------------------------------------------------------


def test_child_killed_during_a_forward_is_requeued_at_once(faults):
    """SIGKILL of the prefork child while a batch job runs: the parent requeues the job
    (reject_on_worker_lost), a new child runs it again; one output per item."""
    env = faults.env(BEN2Q_MAX_BATCH="2")
    worker = faults.worker(env, "child-kill")
    [child] = worker.children()
    client = faults.client(env)
    job = client.submit_batch(faults.images("ck", 6), output=faults.output)
    wait_for(lambda: client.get(job).progress > 0, timeout=60, step=0.01)
    os.kill(child, signal.SIGKILL)  # the second chunk is in the model
    # requeued at once: the visibility timeout (3600 s) plays no part
    status = client.wait(job, timeout=120)
    assert status.state == "succeeded" and status.attempts == 2
    assert [i.state for i in status.items] == ["succeeded"] * 6
    faults.assert_outputs(status)
    assert len(faults.keys(job.id)) == 6
    assert worker.proc.poll() is None and worker.children() != [child]
    assert "WorkerLostError" in worker.log.read_text()


def test_single_jobs_of_a_killed_child_are_requeued(faults):
    """The cross-job batched task: its flushed jobs go back to the queue when the child
    dies while uploading (uploads held at the S3 proxy)."""
    proxy = TcpProxy(faults.s3_server.port).open()
    faults.cleanups.append(proxy.close)
    env = faults.env(BEN2Q_S3_ENDPOINT_URL=proxy.url, BEN2Q_MAX_BATCH="4")
    worker = faults.worker(env, "child-kill-upload")
    [child] = worker.children()
    client = faults.client(env)
    uris = faults.images("cku", 4)
    proxy.hold()
    jobs = [client.submit(u, output=faults.output) for u in uris]
    assert proxy.put_seen.wait(60)  # an upload is under way
    running = {j.id for j in jobs if client.get(j).state == "running"}
    os.kill(child, signal.SIGKILL)
    time.sleep(0.5)
    proxy.release()
    statuses = [client.wait(j, timeout=60) for j in jobs]
    assert running and [s.state for s in statuses] == ["succeeded"] * 4
    assert [s.attempts for s in statuses] == [2 if s.id in running else 1 for s in statuses]
    for s in statuses:
        faults.assert_outputs(s)
        assert len(faults.keys(s.id)) == 1
    assert worker.proc.poll() is None


def test_whole_worker_killed_during_upload_is_redelivered_after_visibility_timeout(faults):
    """SIGKILL of parent and child while an upload is held: nobody requeues the job; Redis
    hands it to a second worker once the visibility timeout has passed."""
    proxy = TcpProxy(faults.s3_server.port).open()
    faults.cleanups.append(proxy.close)
    env = faults.env(BEN2Q_S3_ENDPOINT_URL=proxy.url, **SHORT_VT)
    first = faults.worker(env, "killed")
    client = faults.client(env)
    inputs = faults.images("wk", 3)
    proxy.hold()
    submitted = time.monotonic()
    job = client.submit_batch(inputs, output=faults.output)
    assert proxy.put_seen.wait(60)
    first.kill()
    assert first.children() == []
    proxy.release()
    faults.worker(env, "rescuer")
    status = client.wait(job, timeout=90)
    waited = time.monotonic() - submitted
    assert status.state == "succeeded" and status.attempts == 2
    assert status.worker.startswith("rescuer@")
    assert VT < waited < VT + 30, waited  # after the visibility timeout, not much later
    faults.assert_outputs(status)
    assert len(faults.keys(job.id)) == 3


@pytest.mark.slow
def test_whole_worker_killed_during_a_forward_with_prefetched_jobs(faults):
    """Kill parent and child mid-run with more jobs prefetched: every one of them comes back
    to the survivor and ends succeeded, each output once."""
    env = faults.env(**SHORT_VT)
    first = faults.worker(env, "killed2")
    client = faults.client(env)
    batch = client.submit_batch(faults.images("wkf", 8, (320, 240)), output=faults.output)
    singles = [client.submit(u, output=faults.output) for u in faults.images("wkfs", 4)]
    wait_for(lambda: client.get(batch).progress > 0, timeout=60, step=0.01)
    first.kill()
    faults.worker(env, "survivor")
    statuses = [client.wait(j, timeout=90) for j in [batch, *singles]]
    assert [s.state for s in statuses] == ["succeeded"] * 5
    assert statuses[0].attempts == 2
    assert all(s.worker.startswith("survivor@") for s in statuses)
    for s in statuses:
        faults.assert_outputs(s)
    assert len(faults.keys(batch.id)) == 8


# --- 2. the visibility timeout and the time limits -----------------------------------------


@pytest.mark.parametrize("command", ["ben2q", "celery"])
def test_a_worker_refuses_a_visibility_timeout_a_job_can_outlive(faults, command):
    """Prefetch 8 (max batch 4) × 6 s + 5 s = 53 s > 18 s: the worker does not start."""
    env = faults.env(**{**SHORT_VT, "BEN2Q_MAX_BATCH": "4"})
    argv = (
        [sys.executable, "-m", "ben2q.cli", "worker"]
        if command == "ben2q"
        else [str(Path(sys.executable).parent / "celery"), "-A", "ben2q.worker", "worker"]
    )
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert out.returncode == 2 or command == "celery"
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("error: BEN2Q_VISIBILITY_TIMEOUT=18 s is too short")
    assert "prefetch 8" in message and "6 s" in message and "= 53 s" in message
    assert "ready." not in out.stdout + out.stderr


@pytest.mark.slow
def test_a_job_longer_than_the_visibility_timeout_runs_once(faults, slow_images):
    """A correctly configured pair of workers (2 × 6 s + 5 s < 18 s) and a batch job that
    runs for longer than the whole visibility timeout (slow inputs): both workers keep
    sweeping for expired messages, yet the job is delivered and started exactly once."""
    env = faults.env(**SHORT_VT)
    events = TaskEvents(faults.redis.url)
    faults.cleanups.append(events.close)
    faults.start_workers((env, "long-a"), (env, "long-b"))
    client = faults.client(env)
    inputs = [f"{slow_images}/3/{i}.png" for i in range(9)]
    job = client.submit_batch(inputs, output=faults.output)  # its hard limit: 9 × 6 s
    status = client.wait(job, timeout=120)
    assert status.state == "succeeded", status.error
    assert status.finished_at - status.started_at > VT + 3  # longer than VT + a sweep
    assert status.attempts == 1
    faults.assert_outputs(status)
    assert len(faults.keys(job.id)) == 9
    wait_for(lambda: events.of(job.id, "task-succeeded"), timeout=10)
    assert len(events.of(job.id, "task-received")) == 1
    assert len(events.of(job.id, "task-started")) == 1
    assert sorted(SlowImages.hits) == sorted(f"/3/{i}.png" for i in range(9))


# --- 3. Redis restarted mid-run --------------------------------------------------------------


def test_redis_restart_mid_run(faults, slow_images):
    """Redis (append-only) goes away for 3 s while a batch job runs and single jobs wait in
    the worker's batch buffer: the worker and a producer streaming events reconnect by
    themselves, and every job ends succeeded, once."""
    env = faults.env()
    events = TaskEvents(faults.redis.url)
    faults.cleanups.append(events.close)
    faults.worker(env, "redis-restart")
    client = faults.client(env)
    running = client.submit_batch(
        [f"{slow_images}/1/{i}.png" for i in range(6)], output=faults.output
    )
    wait_for(state_is(client, running.id, "running"), timeout=60)
    waiting = [client.submit(u, output=faults.output) for u in faults.images("rr", 3)]
    # delivered and buffered behind the busy model (a message in flight at the moment Redis
    # stops can be lost by the transport: BRPOP has no acknowledgement)
    wait_for(lambda: all(events.of(j.id, "task-received") for j in waiting), timeout=30)
    seen: list[str] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            for update in client.events(running, timeout=120):
                seen.append(update.state)
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    wait_for(lambda: seen, timeout=10)
    faults.redis.stop()
    time.sleep(3)
    faults.redis.start()
    statuses = [client.wait(j, timeout=90) for j in [running, *waiting]]
    streamer.join(30)
    assert not errors, errors
    assert [s.state for s in statuses] == ["succeeded"] * 4
    assert [s.attempts for s in statuses] == [1, 1, 1, 1]
    assert seen[0] == "running" and seen[-1] == "succeeded"
    for s in statuses:
        faults.assert_outputs(s)
    assert len(faults.keys(running.id)) == 6
    # still connected: a job submitted now runs too
    after = client.wait(client.submit(faults.images("rr-after", 1)[0], faults.output), 60)
    assert after.state == "succeeded"


# --- 4. S3 unavailable for a while -----------------------------------------------------------


def test_s3_outages_are_retried_until_the_budget_is_spent(faults):
    """S3 behind a proxy: uploads dropped, then the whole endpoint refused, for a while: the
    jobs retry (2 deliveries × 2 S3 attempts) and succeed; dropped for good: the job fails
    ``upload_failed`` after exactly that many uploads, and its input is untouched."""
    proxy = TcpProxy(faults.s3_server.port).open()
    faults.cleanups.append(proxy.close)
    env = faults.env(
        BEN2Q_S3_ENDPOINT_URL=proxy.url,
        BEN2Q_S3_MAX_ATTEMPTS="2",
        BEN2Q_JOB_MAX_ATTEMPTS="2",
    )
    faults.worker(env, "s3-outage")
    client = faults.client(env)
    [a_in, b_in, c_in] = faults.images("s3o", 3)

    # uploads dropped until the first delivery has used its two attempts
    proxy.mode = "drop_puts"
    a = client.submit(a_in, output=faults.output)
    wait_for(lambda: len(proxy.puts()) >= 2, timeout=60, step=0.005)
    proxy.mode = "forward"
    a_status = client.wait(a, timeout=60)
    assert a_status.state == "succeeded" and a_status.attempts == 2
    assert len(proxy.puts()) == 3
    faults.assert_outputs(a_status)
    assert len(faults.keys(a.id)) == 1

    # the whole endpoint refused (reads too) until the job waits for its retry
    proxy.close()
    c = client.submit(c_in, output=faults.output)
    waiting = wait_for(state_is(client, c.id, "queued"), timeout=60, step=0.01)
    while waiting.attempts < 1:
        waiting = wait_for(state_is(client, c.id, "queued"), timeout=60, step=0.01)
    proxy.open()
    assert waiting.error.code == "storage_error" and "retrying" in waiting.error.message
    c_status = client.wait(c, timeout=60)
    assert c_status.state == "succeeded" and c_status.attempts == 2
    faults.assert_outputs(c_status)

    # dropped for good: past the budget the job fails; its input stays as it was
    before = faults.s3.head_object(Bucket=faults.bucket, Key="in/s3o/1.png")
    puts_before = len(proxy.puts())
    proxy.mode = "drop_puts"
    b = client.submit(b_in, output=faults.output)
    b_status = client.wait(b, timeout=90)
    assert b_status.state == "failed" and b_status.attempts == 2
    [item] = b_status.items
    assert item.state == "failed" and item.error.code == "upload_failed"
    assert item.output is None
    assert len(proxy.puts()) - puts_before == 4  # 2 deliveries × 2 S3 attempts
    assert faults.keys(b.id) == []
    after = faults.s3.head_object(Bucket=faults.bucket, Key="in/s3o/1.png")
    assert after["ETag"] == before["ETag"] and after["ContentLength"] == before["ContentLength"]
    body = faults.s3.get_object(Bucket=faults.bucket, Key="in/s3o/1.png")["Body"].read()
    assert body == png_bytes(synthetic_image(96, 72, seed=1))


# --- 5. a webhook receiver down ---------------------------------------------------------------


class Hooks(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_receiver_down_then_up(faults):
    """The receiver's port is closed for the first attempts, then opened: the event arrives
    once, signed, with the webhook-id every attempt carried."""
    env = faults.env(
        BEN2Q_WEBHOOK_SECRET=SECRET,
        BEN2Q_WEBHOOK_RETRY_SCHEDULE="[0, 0.5, 1, 1, 1, 1, 1, 1]",
        BEN2Q_WEBHOOK_TIMEOUT="2",
    )
    faults.worker(env, "hooks")
    client = faults.client(env)
    port = free_port()  # nothing listens here yet
    job = client.submit(
        faults.images("wh", 1)[0], faults.output, webhook_url=f"http://127.0.0.1:{port}/hook"
    )
    assert client.wait(job, timeout=60).state == "succeeded"
    wait_for(lambda: len(client.get(job).webhook.attempts) >= 2, timeout=30)
    Hooks.received = []
    receiver = ThreadingHTTPServer(("127.0.0.1", port), Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    faults.cleanups.append(receiver.server_close)
    faults.cleanups.append(receiver.shutdown)
    record = wait_for(lambda: (s := client.get(job)).webhook.delivered and s, timeout=30, step=0.1)
    [(headers, body)] = Hooks.received
    payload = Webhook(SECRET).verify(body, headers)  # raises on a bad signature
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job.id
    attempts = record.webhook.attempts
    outcomes = [a.outcome for a in attempts]
    assert outcomes[-1] == "delivered" and set(outcomes[:-1]) == {"retry"}
    assert len(outcomes) >= 3
    assert [a.attempt for a in attempts] == list(range(1, len(attempts) + 1))
    assert {a.msg_id for a in attempts} == {headers["webhook-id"]}
    assert all(a.status_code is None and a.error for a in attempts[:-1])  # refused
    assert attempts[-1].status_code == 204
    time.sleep(1.5)  # nothing more comes
    assert len(Hooks.received) == 1


# --- 6. one huge or endless job ----------------------------------------------------------------


def test_pixel_limit_and_soft_time_limit_fail_the_job_not_the_worker(faults, slow_images):
    """An image over BEN2Q_MAX_IMAGE_PIXELS fails ``image_too_large``; a job over its soft
    time limit, waiting for its input or for its upload, fails ``timeout`` in the same
    child; the next job is served."""
    proxy = TcpProxy(faults.s3_server.port).open()
    faults.cleanups.append(proxy.close)
    env = faults.env(
        BEN2Q_S3_ENDPOINT_URL=proxy.url,
        BEN2Q_S3_MAX_ATTEMPTS="1",  # a dropped upload is not sent again after the timeout
        BEN2Q_JOB_SOFT_TIME_LIMIT="6",
        BEN2Q_JOB_TIME_LIMIT="30",
    )
    worker = faults.worker(env, "limits-soft")
    [child] = worker.children()
    client = faults.client(env)
    huge = faults.put("huge.png", png_bytes(synthetic_image(2100, 2000, seed=3)))  # 4.2 MP
    status = client.wait(client.submit(huge, faults.output), timeout=60)
    assert status.state == "failed" and status.attempts == 1
    assert status.items[0].error.code == "image_too_large"
    assert faults.keys(status.id) == []

    slow = client.submit(f"{slow_images}/60/endless.png", faults.output)
    status = client.wait(slow, timeout=60)
    assert status.state == "failed" and status.attempts == 1
    assert status.items[0].error.code == "timeout" and status.error.code == "timeout"
    assert faults.keys(slow.id) == []
    assert status.run_ms < 15_000
    assert worker.children() == [child]  # soft: the same child carries on

    proxy.hold()
    stuck = client.submit(faults.images("soft-up", 1)[0], faults.output)
    assert proxy.put_seen.wait(60)
    status = client.wait(stuck, timeout=60)
    proxy.release()
    assert status.state == "failed" and status.attempts == 1
    assert status.items[0].error.code == "timeout" and status.error.code == "timeout"
    assert worker.children() == [child]

    after = client.wait(client.submit(faults.images("soft", 1)[0], faults.output), 60)
    assert after.state == "succeeded"
    assert worker.children() == [child]
    time.sleep(0.5)
    assert faults.keys(stuck.id) == []


def test_hard_time_limit_replaces_a_hung_child_and_fails_the_job(faults, slow_images):
    """A child that hangs (SIGSTOP: it cannot even take the soft limit's signal) is killed at
    the hard limit and replaced; the job, a cross-job batched single one or a batch job,
    fails ``timeout`` and is not run again; the next job is served."""
    env = faults.env(BEN2Q_JOB_SOFT_TIME_LIMIT="6", BEN2Q_JOB_TIME_LIMIT="8")
    worker = faults.worker(env, "limits-hard")
    client = faults.client(env)
    for kind in ("single", "batch"):
        [child] = worker.children()
        url = f"{slow_images}/60/{kind}.png"
        job = (
            client.submit(url, faults.output)
            if kind == "single"
            else client.submit_batch([url], faults.output)
        )
        wait_for(lambda u=url: u.removeprefix(slow_images) in SlowImages.hits, timeout=60)
        os.kill(child, signal.SIGSTOP)
        status = client.wait(job, timeout=60)
        assert status.state == "failed" and status.attempts == 1, kind
        assert status.items[0].error.code == "timeout" and status.error.code == "timeout"
        assert "hard time limit" in status.error.message
        assert faults.keys(job.id) == []
        wait_for(lambda c=child: worker.children() not in ([], [c]), timeout=60)
        after = client.wait(client.submit(faults.images(kind, 1)[0], faults.output), 60)
        assert after.state == "succeeded" and after.attempts == 1
        assert client.get(job).attempts == 1  # not delivered again after the kill
    assert SlowImages.hits.count("/60/single.png") == 1
    assert SlowImages.hits.count("/60/batch.png") == 1


# --- 7. graceful shutdown -------------------------------------------------------------------


def test_sigterm_finishes_running_jobs_and_requeues_the_rest(faults, slow_images):
    """SIGTERM to the worker parent while a job runs and others are prefetched: the running
    job finishes (warm shutdown), the prefetched ones go back to the queue, and a new worker
    completes them; nothing is lost or done twice."""
    env = faults.env()
    first = faults.worker(env, "graceful")
    client = faults.client(env)
    running = client.submit_batch(
        [f"{slow_images}/1/{i}.png" for i in range(4)], output=faults.output
    )
    wait_for(state_is(client, running.id, "running"), timeout=60)
    waiting = [client.submit(u, output=faults.output) for u in faults.images("gs", 4)]
    time.sleep(0.5)  # prefetched by the worker
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(60) == 0
    assert client.get(running).state == "succeeded"  # finished before the worker exited
    assert all(client.get(j).state == "queued" for j in waiting)
    faults.worker(env, "graceful-2")
    statuses = [client.wait(j, timeout=60) for j in [running, *waiting]]
    assert [s.state for s in statuses] == ["succeeded"] * 5
    assert [s.attempts for s in statuses] == [1] * 5
    assert statuses[0].worker.startswith("graceful@")
    assert all(s.worker.startswith("graceful-2@") for s in statuses[1:])
    for s in statuses:
        faults.assert_outputs(s)
