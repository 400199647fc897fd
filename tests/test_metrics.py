"""Fleet metrics: workers record into a real Redis, the exporter serves them over HTTP."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ben2q.jobs import ErrorInfo, JobStatus, make_request
from ben2q.metrics import (
    PREFIX,
    MetricsCollector,
    MetricsRecorder,
    make_exporter,
    queue_lists,
)

DB = 9  # the session server is shared: this module keeps to its own database
COMMANDS = ("multi", "exec", "hincrby", "hincrbyfloat", "hgetall", "get")


def job(
    kind: str,
    state: str,
    items: list[tuple[str, str | None, float | None, int | None]],
    *,
    queue_wait_ms: float | None,
    worker: str = "celery@a",
) -> JobStatus:
    """A finished record: items are (state, error code, duration_ms, batch_size)."""
    inputs = [f"s3://in-bucket/{i}.jpg" for i in range(len(items))]
    status = JobStatus.queued(make_request(kind, inputs, "s3://out-bucket/x/"))
    status.state = state
    status.worker = worker
    status.queue_wait_ms = queue_wait_ms
    for record, (item_state, code, duration, batch) in zip(status.items, items, strict=True):
        record.state = item_state
        record.error = ErrorInfo(code=code, message="boom") if code else None
        record.duration_ms = duration
        record.batch_size = batch
    return status


JOBS = [
    job("single", "succeeded", [("succeeded", None, 120.0, 3)], queue_wait_ms=3.0),
    job(
        "batch",
        "partial",
        [
            ("succeeded", None, 40.0, 4),
            ("failed", "invalid_image", 7.0, None),
            ("failed", "fetch_failed", 2500.0, None),  # exactly on the 2.5 s bound
        ],
        queue_wait_ms=800.0,
    ),
    job(
        "single",
        "failed",
        [("failed", "timeout", None, None)],
        queue_wait_ms=700_000.0,  # past the last bucket (600 s)
        worker="celery@b",
    ),
    job(
        "batch",
        "cancelled",
        [("succeeded", None, 300.0, 1), ("cancelled", None, None, None)],
        queue_wait_ms=None,
        worker="celery@b",
    ),
]


def scrape(port: int) -> dict:
    """``{family name: family}`` from the exporter's /metrics over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "") -> dict:
    """``{frozenset(labels): value}`` of the samples named ``family.name + suffix``."""
    return {
        frozenset(s.labels.items()): s.value
        for s in family.samples
        if s.name == family.name + suffix
    }


def L(**labels: str) -> frozenset:  # noqa: N802 (reads like a label set)
    return frozenset(labels.items())


@pytest.fixture()
def exporter(url):
    """The exporter's HTTP server on a free port, serving from a thread."""
    server = make_exporter(
        url, port=0, addr="127.0.0.1", queues=["ben2q-test", "webhooks-test", "empty-q"]
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(5)


def test_recorded_jobs_are_exported(url, exporter):
    with MetricsRecorder(url) as rec:
        for status in JOBS[:2]:
            rec.record_job(status, worker="celery@a")
    with MetricsRecorder(url) as other:  # another process of the fleet
        other.record_jobs(JOBS[2:], worker="celery@b")
    raw = redis.Redis.from_url(url)
    raw.lpush("ben2q-test", "m1", "m2", "m3")
    raw.lpush(queue_lists("ben2q-test")[1], "p1", "p2")  # priority 3 list of the same queue
    raw.lpush("webhooks-test", "w1")
    raw.lpush("unrelated", "x")
    raw.hset("unacked", mapping={"tag1": "{}", "tag2": "{}"})
    raw.hset("unacked:ben2q-webhooks", "tag3", "{}")  # what webhook workers hold
    raw.hset("unacked:elsewhere", "tag4", "{}")  # not a hash of ours
    raw.close()

    fams = scrape(exporter.port)

    assert samples(fams["ben2q_up"]) == {L(): 1.0}
    assert samples(fams["ben2q_jobs"], "_total") == {
        L(kind="single", state="succeeded"): 1,
        L(kind="batch", state="partial"): 1,
        L(kind="single", state="failed"): 1,
        L(kind="batch", state="cancelled"): 1,
    }
    assert fams["ben2q_jobs"].type == "counter"
    assert samples(fams["ben2q_items"], "_total") == {
        L(state="succeeded", code=""): 3,
        L(state="failed", code="invalid_image"): 1,
        L(state="failed", code="fetch_failed"): 1,
        L(state="failed", code="timeout"): 1,
        L(state="cancelled", code=""): 1,
    }
    assert samples(fams["ben2q_worker_jobs"], "_total") == {
        L(worker="celery@a"): 2,
        L(worker="celery@b"): 2,
    }

    item = fams["ben2q_item_seconds"]
    assert item.type == "histogram"
    buckets = {dict(k)["le"]: v for k, v in samples(item, "_bucket").items()}
    # observations: 0.007, 0.04, 0.12, 0.3, 2.5 s
    assert buckets == {
        "0.05": 2,
        "0.1": 2,
        "0.25": 3,
        "0.5": 4,
        "1.0": 4,
        "2.5": 5,
        "5.0": 5,
        "10.0": 5,
        "30.0": 5,
        "60.0": 5,
        "120.0": 5,
        "+Inf": 5,
    }
    assert samples(item, "_count") == {L(): 5}
    assert samples(item, "_sum")[L()] == pytest.approx(2.967)

    batch = fams["ben2q_batch_size"]
    buckets = {dict(k)["le"]: v for k, v in samples(batch, "_bucket").items()}
    assert buckets == {"1.0": 1, "2.0": 1, "4.0": 3, "8.0": 3, "16.0": 3, "32.0": 3, "+Inf": 3}
    assert samples(batch, "_count") == {L(): 3}
    assert samples(batch, "_sum") == {L(): 8}

    wait = fams["ben2q_queue_wait_seconds"]
    buckets = {dict(k)["le"]: v for k, v in samples(wait, "_bucket").items()}
    assert buckets["0.005"] == 1
    assert buckets["0.5"] == 1
    assert buckets["1.0"] == 2
    assert buckets["600.0"] == 2
    assert buckets["+Inf"] == 3
    assert len(buckets) == 17
    assert samples(wait, "_count") == {L(): 3}
    assert samples(wait, "_sum")[L()] == pytest.approx(700.803)

    assert fams["ben2q_queue_length"].type == "gauge"
    assert samples(fams["ben2q_queue_length"]) == {
        L(queue="ben2q-test"): 5,
        L(queue="webhooks-test"): 1,
        L(queue="empty-q"): 0,
    }
    assert samples(fams["ben2q_broker_unacked_messages"]) == {L(): 3}

    # counters add up across recordings and scrapes read the current values
    with MetricsRecorder(url) as rec:
        rec.record_job(JOBS[0], worker="celery@c")
    fams = scrape(exporter.port)
    assert samples(fams["ben2q_jobs"], "_total")[L(kind="single", state="succeeded")] == 2
    assert samples(fams["ben2q_worker_jobs"], "_total")[L(worker="celery@c")] == 1
    assert samples(fams["ben2q_item_seconds"], "_count") == {L(): 6}


def test_one_pipeline_per_job_and_keys_without_ttl(url):
    raw = redis.Redis.from_url(url)
    with MetricsRecorder(url) as rec:
        rec.record_job(JOBS[1], worker="w")
    keys = sorted(k.decode() for k in raw.keys("*"))
    assert keys == [
        f"{PREFIX}:hist:batch_size",
        f"{PREFIX}:hist:item_seconds",
        f"{PREFIX}:hist:queue_wait_seconds",
        f"{PREFIX}:items_total",
        f"{PREFIX}:jobs_total",
        f"{PREFIX}:worker_jobs_total",
    ]
    assert all(raw.ttl(k) == -1 for k in keys)  # counters never expire
    hist = {k.decode(): v.decode() for k, v in raw.hgetall(f"{PREFIX}:hist:item_seconds").items()}
    assert hist["le=0.05"] == "2"  # stored per bucket, made cumulative by the exporter
    assert hist["le=2.5"] == "1"
    assert hist["count"] == "3"
    # one MULTI/EXEC round trip per job, the items aggregated before it

    def calls() -> dict[str, int]:
        stats = raw.info("commandstats")
        return {c: stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in COMMANDS}

    before = calls()
    with MetricsRecorder(url) as rec:
        rec.record_job(JOBS[1], worker="w")
    after = calls()
    # HINCRBY: 1 job + 1 worker + 3 item labels + 2 item buckets (0.007 and 0.04 s share
    # one) + 1 batch bucket + 1 wait bucket + 3 counts; HINCRBYFLOAT: 3 sums
    assert {c: after[c] - before[c] for c in COMMANDS} == {
        "multi": 1,
        "exec": 1,
        "hincrby": 12,
        "hincrbyfloat": 3,
        "hgetall": 0,
        "get": 0,
    }
    raw.close()


def test_redis_outage_never_fails_the_job(tmp_path, caplog):
    from servers import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        rec = MetricsRecorder(server.url, retry_after=0.5)
        rec.record_job(JOBS[0], worker="w")
        server.stop("kill")

        caplog.set_level(logging.WARNING, logger="ben2q.metrics")
        start = time.monotonic()
        rec.record_job(JOBS[1], worker="w")  # must not raise
        assert time.monotonic() - start < 3.0
        assert any("Redis unavailable" in r.getMessage() for r in caplog.records)

        start = time.monotonic()
        rec.record_jobs(JOBS, worker="w")  # dropped without trying Redis
        assert time.monotonic() - start < 0.05

        # the exporter says Redis is down instead of failing the scrape
        fams = list(MetricsCollector(server.url, timeout=0.5).collect())
        assert [(f.name, f.samples[0].value) for f in fams] == [("ben2q_up", 0)]

        server.start()  # same port, empty (no persistence)
        time.sleep(0.6)
        rec.record_job(JOBS[0], worker="w")
        raw = redis.Redis.from_url(server.url)
        assert raw.hgetall(f"{PREFIX}:jobs_total") == {b'["single","succeeded"]': b"1"}
        assert any("dropped 5 job(s)" in r.getMessage() for r in caplog.records)
        raw.close()
        rec.close()
    finally:
        server.stop()


def test_record_job_swallows_bad_records(url, caplog):
    with MetricsRecorder(url) as rec:
        rec.record_job(None, worker="w")  # type: ignore[arg-type]  # a bug, not an outage
    assert "could not record" in caplog.text


def test_exporter_command(url, tmp_path):
    """``python -m ben2q.metrics`` (what ``ben2q exporter`` runs) serves until interrupted."""
    from servers import _wait, free_port

    with MetricsRecorder(url) as rec:
        rec.record_job(JOBS[0], worker="celery@a")
    raw = redis.Redis.from_url(url)
    raw.lpush("jobs-q", "a", "b")
    raw.close()
    port = free_port()
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "BEN2Q_BROKER_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ben2q.metrics", "--port", str(port), "--addr", "127.0.0.1"]
        + ["--broker", url, "--queues", "jobs-q,hooks-q"],
        env=env,
        stderr=open(tmp_path / "exporter.log", "wb"),
    )
    try:
        _wait(lambda: scrape(port), "the exporter", timeout=10)
        fams = scrape(port)
        assert samples(fams["ben2q_jobs"], "_total") == {L(kind="single", state="succeeded"): 1}
        assert samples(fams["ben2q_queue_length"]) == {
            L(queue="jobs-q"): 2,
            L(queue="hooks-q"): 0,
        }
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "exporter.log").read_text()
    assert '"message": "ben2q exporter serving http://127.0.0.1:' in log
