"""Batch jobs fanned out over the fleet: chunks on the queue, taken by every worker.

Two real workers (tiny network) share a real redis-server and SeaweedFS; a batch job of
more than ``BEN2Q_BATCH_CHUNK`` inputs becomes chunk messages. Checked: both workers run
items, every output exists exactly once, the job ends once with one final webhook (also
when a worker is SIGKILLed mid-run and its chunks come back after the visibility
timeout), cancel stops the chunks, a bad item only fails itself. ``merged`` (the
bookkeeping rule) is tested on its own first.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from stack import Worker, aws_env, png_bytes, service_env, settings_of
from standardwebhooks import Webhook

from ben2q.client import Client
from ben2q.jobs import ItemStatus, JobStatus, make_request
from ben2q.status import StatusStore, merged

DB = 14  # the session server is shared: this module keeps to its own database
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CHUNK = 16
VT = 30  # visibility timeout: prefetch (2 x 2) x hard limit 6 s + 5 s < 30 s


# --- the bookkeeping rule, without Redis ---------------------------------------------------


def record(n: int) -> JobStatus:
    request = make_request("batch", [f"s3://inp/{i}.png" for i in range(n)], "s3://out/")
    status = JobStatus.queued(request)
    status.state, status.started_at = "running", 100.0
    return status


def items(status: JobStatus, start: int, stop: int, state: str) -> list[ItemStatus]:
    return [it.model_copy(update={"state": state}) for it in status.items[start:stop]]


def test_merges_end_the_job_exactly_once_whatever_their_order():
    status = record(6)
    chunks = [(0, 2), (4, 6), (2, 4)]
    ends = []
    for start, stop in chunks:
        status, _, ended = merged(
            status, items(status, start, stop, "succeeded"), cancel=False, now=110.0
        )
        ends.append(ended)
    assert ends == [False, False, True]
    assert status.state == "succeeded" and status.progress == 1.0 and status.run_ms == 10000.0
    again, _, ended = merged(status, items(status, 0, 2, "succeeded"), cancel=False, now=120.0)
    assert not ended and again.finished_at == 110.0  # a redelivered chunk changes nothing


def test_an_ended_item_is_never_moved_back_and_progress_counts_ended_items():
    status = record(4)
    status, _, _ = merged(status, items(status, 0, 2, "succeeded"), cancel=False, now=1.0)
    stale = items(status, 0, 4, "running")  # a redelivered chunk's first save
    status, _, ended = merged(status, stale, cancel=False, now=2.0)
    assert [i.state for i in status.items] == ["succeeded", "succeeded", "running", "running"]
    assert status.progress == 0.5 and not ended
    failed = items(status, 2, 4, "failed")
    status, _, ended = merged(status, failed, cancel=False, now=3.0)
    assert ended and status.state == "partial"


def test_a_cancelled_job_ends_cancelled_keeping_what_was_done():
    status = record(4)
    status, _, _ = merged(status, items(status, 0, 2, "succeeded"), cancel=True, now=1.0)
    status, _, ended = merged(status, items(status, 2, 4, "cancelled"), cancel=True, now=2.0)
    assert ended and status.state == "cancelled"
    assert [i.state for i in status.items] == ["succeeded"] * 2 + ["cancelled"] * 2
    with pytest.raises(ValueError):
        merged(record(2), items(record(4), 3, 4, "succeeded"), cancel=False, now=1.0)


# --- two real workers ----------------------------------------------------------------------


class Hooks(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            self.received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fleet(redis_server, s3_server, tmp_path_factory):
    db_url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    env = service_env(
        redis_server,
        s3_server,
        BEN2Q_BROKER_URL=db_url,
        BEN2Q_BATCH_CHUNK=str(CHUNK),
        BEN2Q_MAX_BATCH="2",
        BEN2Q_VISIBILITY_TIMEOUT=str(VT),
        BEN2Q_JOB_SOFT_TIME_LIMIT="5",
        BEN2Q_JOB_TIME_LIMIT="6",
        BEN2Q_WEBHOOK_TIMEOUT="1",
        BEN2Q_WEBHOOK_SECRET=SECRET,
        OMP_NUM_THREADS="1",  # two workers on two cores: one thread each
    )
    for bucket in ("fan-in", "fan-out"):
        s3_server.create_bucket(bucket)
    settings = settings_of(env)
    store = StatusStore(settings.status_url, ttl=3600)
    store.redis.flushdb()
    logs = tmp_path_factory.mktemp("logs")
    workers = {name: Worker(env, logs / f"{name}.log", name=name) for name in ("wa", "wb")}
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    s3 = s3_server.client()
    s3.put_object(Bucket="fan-in", Key="p.png", Body=png_bytes(_image(0)))
    s3.put_object(Bucket="fan-in", Key="q.png", Body=png_bytes(_image(1)))
    s3.put_object(Bucket="fan-in", Key="broken.png", Body=b"\x89PNG\r\n\x1a\n not an image")
    with aws_env(), Client(settings=settings) as client:
        yield {
            "env": env,
            "client": client,
            "store": store,
            "s3": s3,
            "workers": workers,
            "logs": logs,
            "hook": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
        }
    receiver.shutdown()
    receiver.server_close()
    for worker in workers.values():
        worker.stop()
    store.close()


def _image(seed: int):
    from conftest import synthetic_image

    return synthetic_image(48, 40, seed)


def output_keys(fleet, job_id: str) -> list[str]:
    keys, token = [], None
    while True:
        kw = {"Bucket": "fan-out", "Prefix": f"{job_id}/"}
        if token:
            kw["ContinuationToken"] = token
        page = fleet["s3"].list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def finals(job_id: str) -> list[dict]:
    with Hooks.lock:
        got = [(h, b) for h, b in Hooks.received if json.loads(b)["data"]["id"] == job_id]
    return [Webhook(SECRET).verify(b, h) for h, b in got]


def submit(fleet, n: int, **kw):
    inputs = [f"s3://fan-in/{'pq'[i % 2]}.png" for i in range(n)]
    return fleet["client"].submit_batch(
        inputs, output="s3://fan-out/", webhook_url=fleet["hook"], **kw
    )


def wait_progress(client: Client, job, fraction: float, timeout: float = 60) -> None:
    """Wait until at least ``fraction`` of the job's items have ended."""
    deadline = time.monotonic() + timeout
    while client.get(job, items=False).progress < fraction:
        assert time.monotonic() < deadline, f"progress below {fraction} after {timeout} s"
        time.sleep(0.02)


def assert_outputs_once(fleet, status: JobStatus) -> None:
    done = [i for i in status.items if i.state == "succeeded"]
    expected = sorted(f"{status.id}/{i.index:04d}-{'pq'[i.index % 2]}.png" for i in done)
    assert sorted(output_keys(fleet, status.id)) == expected
    assert [i.output for i in done] == [f"s3://fan-out/{k}" for k in expected]


def test_a_batch_spreads_over_both_workers_and_ends_once(fleet):
    client = fleet["client"]
    job = submit(fleet, 200)
    status = client.wait(job, timeout=180)
    assert status.state == "succeeded" and status.progress == 1.0
    assert [i.state for i in status.items] == ["succeeded"] * 200
    workers = {i.worker.split("@")[0] for i in status.items}
    assert workers == {"wa", "wb"}, workers
    assert_outputs_once(fleet, status)
    assert status.run_ms is not None and status.finished_at is not None
    time.sleep(2)  # a second final event would have arrived by now
    [event] = finals(job.id)
    assert event["type"] == "job.succeeded" and event["data"]["progress"] == 1.0
    sent = fleet["store"].chunks_sent(job.id)
    assert sent == set(range(0, 200, CHUNK))


def test_single_jobs_overtake_queued_chunks(fleet):
    """Chunks wait on their own queue, read after the single-job queue: a single job sent
    while a long batch runs waits for the chunks its worker already holds (its prefetch),
    not for the rest of the batch."""
    client = fleet["client"]
    job = submit(fleet, 240)
    wait_progress(client, job, 0.05)
    latencies = []
    for _ in range(2):
        t0 = time.monotonic()
        single = client.submit("s3://fan-in/p.png", output="s3://fan-out/single/")
        done = client.wait(single, timeout=120)
        assert done.state == "succeeded"
        latencies.append(time.monotonic() - t0)
        assert client.get(job).progress < 1.0, "the batch ended first: nothing was measured"
    batch_seconds = client.wait(job, timeout=300).run_ms / 1000
    print(f"single-job latency beside the batch {latencies}, batch {batch_seconds:.1f} s")
    # a single job waits for about the chunk running when it arrives (measured: 5-10 s
    # beside 5-7 s chunks); without the requeue it waited for most of the batch (the
    # batch ended first), so half the batch's time tells the two apart with margin
    assert max(latencies) < batch_seconds / 2, (latencies, batch_seconds)


def test_a_bad_item_fails_alone_and_the_job_is_partial(fleet):
    client = fleet["client"]
    inputs = [f"s3://fan-in/{'pq'[i % 2]}.png" for i in range(24)]
    inputs[21] = "s3://fan-in/broken.png"
    inputs[17] = "s3://fan-in/missing.png"
    job = client.submit_batch(inputs, output="s3://fan-out/", webhook_url=fleet["hook"])
    status = client.wait(job, timeout=120)
    assert status.state == "partial"
    bad = {i.index: i.error.code for i in status.items if i.state == "failed"}
    assert bad == {17: "not_found", 21: "invalid_image"}
    assert sum(i.state == "succeeded" for i in status.items) == 22
    time.sleep(1)
    [event] = finals(job.id)
    assert event["type"] == "job.partial"


def test_cancel_stops_the_chunks_not_yet_done(fleet):
    client = fleet["client"]
    job = submit(fleet, 160)
    wait_progress(client, job, 0.1)
    client.cancel(job)
    status = client.wait(job, timeout=60)
    assert status.state == "cancelled"
    states = [i.state for i in status.items]
    assert set(states) <= {"succeeded", "cancelled"}
    assert 0 < states.count("succeeded") < 128, states.count("succeeded")
    time.sleep(2)  # chunks still queued end without writing anything
    assert_outputs_once(fleet, client.get(job))
    [event] = finals(job.id)
    assert event["type"] == "job.cancelled"


@pytest.mark.slow
def test_a_worker_killed_mid_batch_leaves_every_item_done_once(fleet):
    """SIGKILL of a whole worker (parent and child) mid-run: its chunks come back after the
    visibility timeout; items it recorded done are not redone, the job ends once."""
    client = fleet["client"]
    job = submit(fleet, 96)
    wait_progress(client, job, 0.2)
    victim = fleet["workers"]["wb"]
    victim.kill()
    status = client.wait(job, timeout=VT + 150)
    assert status.state == "succeeded"
    assert [i.state for i in status.items] == ["succeeded"] * 96
    assert_outputs_once(fleet, status)
    time.sleep(2)
    [event] = finals(job.id)
    assert event["type"] == "job.succeeded"
    # the killed worker's chunks were redelivered (attempts 2) and ran on the survivor
    store: StatusStore = fleet["store"]
    attempts = store.redis.hgetall(store.keys.chunks(job.id))
    again = {k for k, v in attempts.items() if k.startswith(b"attempts:") and int(v) > 1}
    assert again, attempts
    fleet["workers"]["wb"] = Worker(fleet["env"], fleet["logs"] / "wb2.log", name="wb")


def test_a_prefix_becomes_the_items_listed_once(fleet):
    """A catalogue under a prefix: its images (not other files, not earlier outputs under
    it) become the items, in listing order; a redelivered batch message does not list
    again (an image added after the listing is not taken)."""
    from celery import Celery

    from ben2q.broker import TASK_BATCH, celery_config

    s3, client = fleet["s3"], fleet["client"]
    for i in range(40):
        s3.put_object(Bucket="fan-in", Key=f"cat/{i:03d}.png", Body=png_bytes(_image(i % 3)))
    s3.put_object(Bucket="fan-in", Key="cat/readme.txt", Body=b"not an image")
    s3.put_object(Bucket="fan-in", Key="cat/out/old.png", Body=png_bytes(_image(5)))
    request = make_request(
        "batch",
        [],
        "s3://fan-in/cat/out/",
        prefix="s3://fan-in/cat",
        webhook_url=fleet["hook"],
    )
    job = client.enqueue(request)
    deadline = time.monotonic() + 60
    while not (client.get(job, items=False).counts.total):
        assert time.monotonic() < deadline, "the prefix was not listed"
        time.sleep(0.05)
    s3.put_object(Bucket="fan-in", Key="cat/999.png", Body=png_bytes(_image(1)))
    app = Celery("redeliver", set_as_current=False)
    app.conf.update(celery_config(client.settings))
    app.send_task(TASK_BATCH, kwargs={"request": request.model_dump(mode="json")}, task_id=job.id)
    status = client.wait(job, timeout=180)
    app.close()
    assert status.state == "succeeded" and status.counts.total == 40
    assert [i.input for i in status.items] == [f"s3://fan-in/cat/{i:03d}.png" for i in range(40)]
    assert status.prefix == "s3://fan-in/cat/"
    outputs = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="fan-in", Prefix=f"cat/out/{job.id}/")["Contents"]
    ]
    assert len(outputs) == 40
    deadline = time.monotonic() + 10
    while not finals(job.id) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    events = [e for e in finals(job.id) if e["type"] != "job.progress"]
    assert len(events) == 1 and len(events[0]["data"]["items"]) == 40


def test_a_prefix_with_no_images_fails_the_job_naming_it(fleet):
    job = fleet["client"].submit_prefix("s3://fan-in/nothing-here/", output="s3://fan-out/")
    status = fleet["client"].wait(job, timeout=60)
    assert status.state == "failed" and status.error.code == "not_found"
    assert "s3://fan-in/nothing-here/" in status.error.message


def test_a_chunk_sent_twice_runs_once(fleet):
    """A planner that died between sending a chunk and marking it sent sends it again with
    another nonce: one copy runs, the other is dropped before any work."""
    from celery import Celery

    from ben2q.broker import TASK_CHUNK, celery_config

    client = fleet["client"]
    request = make_request(
        "batch", [f"s3://fan-in/{'pq'[i % 2]}.png" for i in range(32)], "s3://fan-out/"
    )
    fleet["store"].create(JobStatus.queued(request))
    app = Celery("planner", set_as_current=False)
    app.conf.update(celery_config(client.settings))
    for start, nonce in ((0, "copy-a"), (0, "copy-b"), (16, "copy-c")):
        piece = request.model_copy(update={"inputs": request.inputs[start : start + 16]})
        app.send_task(
            TASK_CHUNK,
            kwargs={"request": piece.model_dump(mode="json"), "start": start, "nonce": nonce},
            queue=client.settings.batch_queue,
        )
    status = client.wait(request.id, timeout=120)
    app.close()
    assert status.state == "succeeded" and status.counts.succeeded == 32
    assert_outputs_once(fleet, status)
    deadline = time.monotonic() + 10
    dropped = 0
    while time.monotonic() < deadline:
        logs = "".join(p.read_text(errors="replace") for p in fleet["logs"].glob("*.log"))
        dropped = logs.count(f"job {request.id} chunk 0: another copy holds it")
        if dropped:
            break
        time.sleep(0.1)
    assert dropped == 1
