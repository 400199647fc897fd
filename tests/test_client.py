"""``ben2q.client`` and the job commands of the CLI against a real redis-server.

There is no worker here: a stand-in thread writes job records through ``StatusStore`` the
way a worker would, and the broker's queue is read raw from Redis.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from ben2q.client import AsyncClient, Client, Job
from ben2q.config import Settings
from ben2q.errors import InvalidRequest, NotFound
from ben2q.jobs import JobRequest, JobStatus
from ben2q.status import KEYS, StatusStore

ROOT = Path(__file__).resolve().parents[1]
DB = 4  # the session server is shared: this module keeps to its own database
QUEUE = "ben2q"
GOOD = "https://images.example/cat.jpg"
OUT = "s3://bucket/out/"


@pytest.fixture()
def settings(url) -> Settings:
    return Settings(
        broker_url=url, result_backend=None, queue=QUEUE, max_batch_items=5, local_root=None
    )


@pytest.fixture()
def client(settings):
    with Client(settings=settings) as client:
        yield client


@pytest.fixture()
def store(settings):
    with StatusStore(settings.status_url, ttl=settings.status_ttl) as store:
        yield store


def queued_messages(raw: redis.Redis) -> list[dict]:
    return [json.loads(m) for m in raw.lrange(QUEUE, 0, -1)]


def body(message: dict) -> list:
    assert message["properties"]["body_encoding"] == "base64"
    return json.loads(base64.b64decode(message["body"]))


def simulate_worker(store: StatusStore, raw: redis.Redis, job_id: str) -> threading.Thread:
    """Once someone follows the job: running, half done, then succeeded."""

    def run() -> None:
        deadline = time.monotonic() + 5
        while raw.pubsub_numsub(KEYS.events(job_id))[0][1] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # the follower reads the current record right after subscribing: let it see "queued"
        time.sleep(0.3)
        status = store.get(job_id)
        assert status is not None
        status.state, status.attempts, status.started_at = "running", 1, time.time()
        store.save(status)
        time.sleep(0.05)
        status.progress = 0.5
        status.items[0].state = "succeeded"
        status.items[0].output = "s3://bucket/out/x.png"
        store.save(status)
        time.sleep(0.05)
        for item in status.items:
            item.state = "succeeded"
        status.settle()
        status.finished_at = time.time()
        store.save(status)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- validation before anything is enqueued --------------------------------------------

BAD = [
    ("submit", (GOOD, OUT), {"refine": "yes"}, "refine"),
    ("submit", (GOOD, OUT), {"mask": 1}, "mask"),
    ("submit", (GOOD, OUT), {"format": "jpg"}, "format"),
    ("submit", ("ftp://host/a.jpg", OUT), {}, "input"),
    ("submit", ("file:///data/a.jpg", OUT), {}, "input"),  # no local root configured
    ("submit", (GOOD, "http://x/"), {}, "output"),
    ("submit_batch", ([], OUT), {}, "inputs"),
    ("submit_batch", ([GOOD] * 6, OUT), {}, "inputs"),  # max_batch_items=5
    ("submit_batch", ([GOOD, GOOD, GOOD, "s3://b/"], OUT), {}, "inputs[3]"),
]


@pytest.mark.parametrize(("method", "args", "kwargs", "field"), BAD)
def test_invalid_requests_are_refused_before_touching_redis(
    client, raw, method, args, kwargs, field
):
    with pytest.raises(InvalidRequest) as info:
        getattr(client, method)(*args, **kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and info.value.code == "invalid_request"
    assert raw.dbsize() == 0  # no record, no queue, no kombu bindings
    assert raw.llen(QUEUE) == 0


def test_invalid_requests_are_refused_by_the_async_client_too(settings, raw):
    async def main() -> str:
        async with AsyncClient(settings=settings) as client:
            with pytest.raises(InvalidRequest) as info:
                await client.submit_batch([GOOD, "ftp://x/y.png"], OUT)
            return info.value.field

    assert asyncio.run(main()) == "inputs[1]"
    assert raw.dbsize() == 0


# --- submit ----------------------------------------------------------------------------


def test_submit_creates_a_queued_record_and_one_json_message(client, raw):
    job = client.submit(GOOD, OUT, refine=True, format="webp", mask=True)
    assert isinstance(job, Job) and job.kind == "single" and str(job) == job.id
    status = client.get(job)
    assert status.state == "queued" and status.id == job.id
    assert [item.input for item in status.items] == [GOOD]
    assert status.options.refine and status.options.mask and status.options.format == "webp"

    (message,) = queued_messages(raw)
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "ben2q.remove"
    assert message["headers"]["id"] == job.id
    args, kwargs, _embed = body(message)
    assert args == []
    request = JobRequest.model_validate(kwargs["request"])
    assert request == job.request and request.id == job.id
    assert request.inputs == [GOOD] and request.output == OUT


def test_submit_batch_sends_a_batch_task(client, raw):
    inputs = [GOOD, "s3://bucket/in/dog.png", "http://images.example/x.webp"]
    job = client.submit_batch(inputs, "s3://bucket/out")
    assert job.kind == "batch"
    status = client.get(job.id)
    assert status.kind == "batch" and len(status.items) == 3 and status.output == OUT
    (message,) = queued_messages(raw)
    assert message["headers"]["task"] == "ben2q.batch"
    assert message["headers"]["id"] == job.id
    assert body(message)[1]["request"]["inputs"] == inputs


def test_a_failed_send_marks_the_record_failed(url, settings, raw):
    from servers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    broken = settings.model_copy(update={"broker_url": dead, "result_backend": url})
    with Client(settings=broken) as client:
        assert client.settings.status_url == url
        with pytest.raises(OperationalError):
            client.submit(GOOD, OUT)
        (key,) = raw.keys(KEYS.job("*"))
        status = client.get(key.decode().rsplit(":", 1)[1])
    assert status.state == "failed" and status.finished_at is not None
    assert status.error is not None and status.error.code == "internal"
    assert status.items[0].error is not None and status.items[0].error.code == "internal"


def test_broker_url_overrides_the_settings(url):
    base = Settings(broker_url="redis://nowhere:6379/0", result_backend=None)
    client = Client(url, settings=base)
    assert client.settings.broker_url == url and client.settings.status_url == url
    client.close()
    separate = Settings(broker_url="redis://nowhere:6379/0", result_backend=url)
    client = Client("redis://broker:6379/0", settings=separate)
    assert client.settings.status_url == url
    client.close()


# --- get, wait, events, cancel ---------------------------------------------------------


def test_unknown_jobs_raise_not_found(client):
    with pytest.raises(NotFound):
        client.get("no-such-job")
    with pytest.raises(NotFound):
        client.wait("no-such-job", timeout=1)
    with pytest.raises(NotFound):
        client.cancel("no-such-job")


def test_cancel_of_a_queued_job_and_wait_returns_at_once(client):
    job = client.submit(GOOD, OUT)
    status = client.cancel(job)
    assert status.state == "cancelled"
    started = time.monotonic()
    assert client.wait(job, timeout=5).state == "cancelled"
    assert time.monotonic() - started < 0.5
    assert client.store.cancel_requested(job.id)


def test_wait_times_out(client):
    job = client.submit(GOOD, OUT)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.wait(job, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 1.5


def test_events_and_wait_follow_a_worker(client, store, raw):
    job = client.submit_batch([GOOD, GOOD], OUT)
    worker = simulate_worker(store, raw, job.id)
    seen = [(s.state, s.progress) for s in client.events(job, timeout=10)]
    worker.join(5)
    assert seen == [("queued", 0.0), ("running", 0.0), ("running", 0.5), ("succeeded", 1.0)]
    final = client.wait(job, timeout=1)
    assert final.state == "succeeded" and final.items[0].output == "s3://bucket/out/x.png"


def test_async_client(settings, store, raw):
    async def main() -> list[tuple[str, float]]:
        async with AsyncClient(settings=settings) as client:
            job = await client.submit(GOOD, OUT)
            assert (await client.get(job)).state == "queued"
            worker = simulate_worker(store, raw, job.id)
            seen = [(s.state, s.progress) async for s in client.events(job, timeout=10)]
            await asyncio.to_thread(worker.join, 5)
            assert (await client.wait(job.id, timeout=1)).state == "succeeded"

            batch = await client.submit_batch([GOOD, GOOD], OUT)
            assert (await client.cancel(batch)).state == "cancelled"
            assert (await client.wait(batch, timeout=1)).state == "cancelled"
            queued = await client.submit(GOOD, OUT)
            with pytest.raises(TimeoutError):
                await client.wait(queued, timeout=0.2)
            with pytest.raises(NotFound):
                await client.get("no-such-job")
            with pytest.raises(NotFound):
                await client.cancel("no-such-job")
            return seen

    seen = asyncio.run(main())
    assert seen == [("queued", 0.0), ("running", 0.0), ("running", 0.5), ("succeeded", 1.0)]
    tasks = [m["headers"]["task"] for m in queued_messages(raw)]
    assert sorted(tasks) == ["ben2q.batch", "ben2q.remove", "ben2q.remove"]


# --- CLI -------------------------------------------------------------------------------


def cli(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
    env["BEN2Q_BROKER_URL"] = "redis://127.0.0.1:1/0"  # --broker must win over this
    return subprocess.run(
        [sys.executable, "-m", "ben2q.cli", *args, "--broker", url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_submit_status_cancel_wait(url, raw):
    done = cli("submit", GOOD, "--output", OUT, "--json", url=url)
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["id"]
    assert JobStatus.model_validate_json(done.stdout).state == "queued"
    assert [m["headers"]["id"] for m in queued_messages(raw)] == [job_id]

    plain = cli("submit", GOOD, GOOD, "--output", OUT, "--format", "webp", url=url)
    assert plain.returncode == 0, plain.stderr
    batch_id = plain.stdout.strip()
    assert raw.exists(KEYS.job(batch_id))

    status = cli("status", job_id, url=url)
    assert status.returncode == 0 and job_id in status.stdout and "queued" in status.stdout
    status = cli("status", batch_id, "--json", url=url)
    assert len(JobStatus.model_validate_json(status.stdout).items) == 2

    timed_out = cli("wait", job_id, "--timeout", "0.3", url=url)
    assert timed_out.returncode == 3, timed_out.stderr
    assert "still queued" in timed_out.stderr

    cancel = cli("cancel", job_id, url=url)
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    waited = cli("wait", job_id, "--json", url=url)
    assert waited.returncode == 1
    assert JobStatus.model_validate_json(waited.stdout).state == "cancelled"


def test_cli_errors(url, raw):
    bad = cli("submit", GOOD, "--output", "http://x/", url=url)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: invalid_request: output: ")
    bad = cli("submit", GOOD, GOOD, "--output", OUT, "--format", "jpg", url=url)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: invalid_request: format: ")
    assert raw.dbsize() == 0
    unknown = cli("status", "no-such-job", url=url)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("error: not_found: ")
    assert cli("cancel", "no-such-job", url=url).returncode == 2
