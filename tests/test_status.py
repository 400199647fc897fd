"""``ben2q.status`` against a real redis-server: records, TTLs, events, cancellation, restarts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from ben2q.errors import NotFound
from ben2q.jobs import JobStatus, make_request
from ben2q.status import (
    KEYS,
    AsyncStatusStore,
    EventStream,
    StatusStore,
    cancelled,
    encode,
)

TTL = 600
DB = 3  # the session server is shared: this module keeps to its own database


@pytest.fixture()
def store(url):
    with StatusStore(url, ttl=TTL) as store:
        yield store


def new_status(n: int = 1) -> JobStatus:
    inputs = [f"https://images.example/{i}.jpg" for i in range(n)]
    request = make_request("batch" if n > 1 else "single", inputs, "s3://bucket/out/")
    return JobStatus.queued(request)


def advanced(status: JobStatus, state: str, progress: float = 0.0) -> JobStatus:
    new = status.model_copy(deep=True)
    new.state = state  # type: ignore[assignment]
    new.progress = progress
    if state == "running":
        new.attempts = max(new.attempts, 1)
        new.started_at = new.started_at or time.time()
    if state in ("succeeded", "failed", "partial", "cancelled"):
        new.finished_at = time.time()
    return new


def wait_subscribed(raw: redis.Redis, job_id: str, timeout: float = 5.0) -> None:
    """Block until some client listens on the job's channel."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if raw.pubsub_numsub(KEYS.events(job_id))[0][1] >= 1:
            return
        time.sleep(0.01)
    raise AssertionError("nobody subscribed to the job's events")


def save_later(store: StatusStore, raw: redis.Redis, updates: list[JobStatus], gap=0.05):
    """A stand-in worker: once someone listens, save ``updates`` one after the other."""

    def run() -> None:
        wait_subscribed(raw, updates[0].id)
        for update in updates:
            time.sleep(gap)
            store.save(update)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def signature(status: JobStatus) -> tuple[str, float]:
    return (status.state, status.progress)


# --- records ---------------------------------------------------------------------------


def test_create_get_save_round_trip(store):
    status = new_status(2)
    assert store.get(status.id) is None
    store.create(status)
    assert store.get(status.id) == status
    running = advanced(status, "running", 0.5)
    running.items[0].state = "succeeded"
    running.items[0].output = "s3://bucket/out/x.png"
    store.save(running)
    assert store.get(status.id) == running
    assert store.get("no-such-job") is None


def test_create_refuses_an_existing_id(store):
    status = new_status()
    store.create(status)
    other = advanced(status, "running")
    with pytest.raises(ValueError, match="exists"):
        store.create(other)
    assert store.get(status.id) == status  # untouched
    store.create(status)  # the very same record again: a retried create, not a duplicate


def test_records_and_cancel_flags_expire(store, raw):
    status = new_status()
    store.create(status)
    key = KEYS.job(status.id)
    assert 0 < raw.ttl(key) <= TTL
    raw.expire(key, 50)
    store.save(advanced(status, "running"))
    assert 50 < raw.ttl(key) <= TTL  # every save refreshes the TTL
    store.request_cancel(status.id)
    assert 0 < raw.ttl(KEYS.cancel(status.id)) <= TTL


def test_save_publishes_the_record(store, raw):
    status = new_status()
    store.create(status)
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.events(status.id))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    running = advanced(status, "running", 0.25)
    store.save(running)
    msg = pubsub.get_message(timeout=2)
    pubsub.close()
    assert msg is not None and JobStatus.model_validate_json(msg["data"]) == running


# --- events ----------------------------------------------------------------------------


def test_events_follow_updates_in_order_and_stop_at_the_end(store, raw):
    status = new_status(2)
    store.create(status)
    running = advanced(status, "running", 0.5)
    done = advanced(running, "succeeded", 1.0)
    updates = [advanced(status, "running"), running, running, done]  # running twice
    thread = save_later(store, raw, updates)
    started = time.monotonic()
    seen = [signature(s) for s in store.events(status.id, timeout=10)]
    elapsed = time.monotonic() - started
    thread.join(5)
    assert seen == [("queued", 0.0), ("running", 0.0), ("running", 0.5), ("succeeded", 1.0)]
    assert elapsed < 0.9  # delivered by pub/sub, not by the once-a-second re-read


def test_events_of_a_finished_job_yield_it_once(store):
    status = new_status()
    store.create(status)
    final = advanced(status, "failed", 1.0)
    store.save(final)
    started = time.monotonic()
    assert list(store.events(status.id, timeout=5)) == [final]
    assert time.monotonic() - started < 0.5


def test_events_time_out_with_the_builtin_timeout_error(store):
    status = new_status()
    store.create(status)
    seen = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still queued"):
        for update in store.events(status.id, timeout=0.3):
            seen.append(update)
    assert 0.25 < time.monotonic() - started < 1.5
    assert seen == [status]


def test_events_of_an_unknown_job_raise_not_found(store):
    with pytest.raises(NotFound):
        next(store.events("no-such-job", timeout=1))


def test_events_reread_the_record_when_a_message_is_missed(store, raw):
    status = new_status()
    store.create(status)
    final = advanced(status, "succeeded", 1.0)

    def write_silently() -> None:  # a SET whose PUBLISH never arrived
        wait_subscribed(raw, status.id)
        time.sleep(0.1)
        raw.set(KEYS.job(status.id), encode(final), ex=TTL)

    thread = threading.Thread(target=write_silently, daemon=True)
    thread.start()
    seen = list(store.events(status.id, timeout=5))
    thread.join(5)
    assert [signature(s) for s in seen] == [("queued", 0.0), ("succeeded", 1.0)]


def test_event_stream_skips_repeats_and_stale_updates():
    status = new_status()
    running = advanced(status, "running", 0.5)
    stream = EventStream(status.id, timeout=None)
    assert stream.offer(running) is running
    assert stream.offer(running.model_copy()) is None  # same state, progress, finished_at
    assert stream.offer(status) is None  # a message published before the first read
    assert stream.offer(advanced(status, "running", 0.25)) is None
    retried = advanced(status, "running", 0.0)
    retried.attempts = 2  # a redelivery starts over: not stale
    assert stream.offer(retried) is retried
    final = advanced(retried, "partial", 1.0)
    assert stream.offer(final) is final and stream.done
    assert stream.offer(advanced(status, "succeeded", 1.0)) is None
    with pytest.raises(NotFound):
        stream.offer(None)


def test_event_stream_clock():
    now = [100.0]
    stream = EventStream("j", timeout=2.5, poll_interval=1.0, clock=lambda: now[0])
    assert stream.wait_time() == 1.0 and not stream.poll_due()
    now[0] = 101.0
    assert stream.poll_due() and stream.wait_time() == 0.0
    stream.read()
    now[0] = 101.75
    assert stream.wait_time() == 0.25  # until the next re-read
    now[0] = 102.0
    stream.read()
    assert stream.wait_time() == 0.5  # the deadline comes before the next re-read
    now[0] = 102.5
    with pytest.raises(TimeoutError):
        stream.wait_time()


# --- cancellation ----------------------------------------------------------------------


def test_cancel_of_a_queued_job_cancels_it_at_once(store, raw):
    status = new_status(3)
    store.create(status)
    assert not store.cancel_requested(status.id)
    result = store.request_cancel(status.id)
    assert result.state == "cancelled" and result.finished_at is not None
    assert {item.state for item in result.items} == {"cancelled"}
    assert store.get(status.id) == result
    assert store.cancel_requested(status.id)
    assert raw.get(KEYS.cancel(status.id)) == b"1"


def test_cancel_of_a_running_job_only_sets_the_flag(store):
    status = new_status()
    store.create(status)
    running = advanced(status, "running", 0.5)
    store.save(running)
    assert store.request_cancel(status.id) == running
    assert store.get(status.id) == running
    assert store.cancel_requested(status.id)


def test_cancel_of_a_finished_job_changes_nothing(store):
    status = new_status()
    store.create(status)
    final = advanced(status, "succeeded", 1.0)
    store.save(final)
    assert store.request_cancel(status.id) == final
    assert store.get(status.id) == final
    assert not store.cancel_requested(status.id)


def test_record_and_cancel_flag_in_one_round_trip(store, raw):
    assert store.get_and_cancel_requested("no-such-job") == (None, False)
    status = new_status(2)
    store.create(status)
    assert store.get_and_cancel_requested(status.id) == (status, False)
    running = advanced(status, "running", 0.5)
    store.save(running)
    store.request_cancel(status.id)
    assert store.get_and_cancel_requested(status.id) == (running, True)
    raw.delete(KEYS.job(status.id))  # the record expired, the flag did not (yet)
    assert store.get_and_cancel_requested(status.id) == (None, True)


def test_cancel_of_an_unknown_job_raises_not_found(store):
    with pytest.raises(NotFound):
        store.request_cancel("no-such-job")
    assert not store.cancel_requested("no-such-job")


def test_cancel_wakes_up_an_event_stream(store, raw):
    status = new_status()
    store.create(status)

    first_read = threading.Event()

    def cancel_later() -> None:
        # after the stream's first read (subscribed before it): a cancel in between would
        # already show in that read
        first_read.wait(5)
        store.request_cancel(status.id)

    thread = threading.Thread(target=cancel_later, daemon=True)
    thread.start()
    started = time.monotonic()
    states = []
    for update in store.events(status.id, timeout=5):
        states.append(update.state)
        first_read.set()
    thread.join(5)  # before the fixture closes the store under its feet
    assert states == ["queued", "cancelled"]
    assert time.monotonic() - started < 0.9


def test_cancelled_transition_is_pure():
    status = new_status()
    assert cancelled(advanced(status, "running")) is None
    new = cancelled(status, now=123.0)
    assert new is not None and new.state == "cancelled" and new.finished_at == 123.0
    assert status.state == "queued" and status.items[0].state == "pending"  # not mutated


# --- async -----------------------------------------------------------------------------


def test_async_store_mirrors_the_sync_one(url, store, raw):
    status = new_status(2)
    final = advanced(status, "partial", 1.0)

    async def main() -> list[tuple[str, float]]:
        async with AsyncStatusStore(url, ttl=TTL) as astore:
            assert await astore.get(status.id) is None
            await astore.create(status)
            assert await astore.get(status.id) == status
            with pytest.raises(ValueError):
                await astore.create(advanced(status, "running"))
            assert 0 < await astore.redis.ttl(KEYS.job(status.id)) <= TTL
            thread = save_later(store, raw, [advanced(status, "running", 0.5), final])
            seen = [signature(s) async for s in astore.events(status.id, timeout=10)]
            thread.join(5)
            assert [s async for s in astore.events(status.id, timeout=1)] == [final]
            with pytest.raises(TimeoutError):
                other = new_status()
                await astore.create(other)
                async for _ in astore.events(other.id, timeout=0.2):
                    pass
            with pytest.raises(NotFound):
                await astore.request_cancel("no-such-job")
            cancelled_now = await astore.request_cancel(other.id)
            assert cancelled_now.state == "cancelled"
            assert await astore.cancel_requested(other.id)
            running = new_status()
            await astore.create(running)
            started = advanced(running, "running", 0.1)
            await astore.save(started)
            assert (await astore.request_cancel(running.id)).state == "running"
            assert await astore.cancel_requested(running.id)
            assert await astore.get_and_cancel_requested(running.id) == (started, True)
            assert await astore.get_and_cancel_requested("no-such-job") == (None, False)
            assert (await astore.request_cancel(status.id)) == final  # finished: unchanged
            return seen

    seen = asyncio.run(main())
    assert seen == [("queued", 0.0), ("running", 0.5), ("partial", 1.0)]


# --- Redis restarts --------------------------------------------------------------------


def test_store_survives_a_redis_restart(tmp_path):
    from servers import RedisServer

    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        store = StatusStore(server.url, ttl=TTL)
        status = new_status()
        store.create(status)
        running = advanced(status, "running", 0.5)
        final = advanced(running, "succeeded", 1.0)
        seen: list[JobStatus] = []
        errors: list[BaseException] = []

        first_read = threading.Event()

        def follow() -> None:
            try:
                for update in store.events(status.id, timeout=30):
                    seen.append(update)
                    first_read.set()
            except BaseException as exc:  # reported below
                errors.append(exc)
                first_read.set()

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        # the first update only after the follower read the record (it subscribes before),
        # or that read could already show it
        assert first_read.wait(10)
        store.save(running)
        time.sleep(0.2)

        server.stop()
        server.start()  # same port, same directory (the append-only file keeps the record)

        store.save(final)  # the same store object: it reconnects by itself
        assert store.get(status.id) == final
        follower.join(15)
        assert not follower.is_alive() and not errors
        assert [signature(s) for s in seen] == [
            ("queued", 0.0),
            ("running", 0.5),
            ("succeeded", 1.0),
        ]

        async def after_restart() -> JobStatus | None:
            async with AsyncStatusStore(server.url, ttl=TTL) as astore:
                assert await astore.get(status.id) == final
                server.stop()
                server.start()
                return await astore.get(status.id)  # its pooled connection was cut

        assert asyncio.run(after_restart()) == final
        store.close()
    finally:
        server.stop()
