"""Records of big jobs against a real redis-server: a summary apart from the items, saves
that write only what changed, reads that page.

A job of more than ``INLINE_ITEMS`` inputs keeps its items in a hash beside a small
summary; chunk merges write the items they carry and the summary's counts, and publish
just that. Checked: the stored shapes, whole and paged reads, the merge rules on counts
(end once, never move an ended item back, cancel), and that the bytes a batch moves per
item do not grow with the batch (the quadratic cost this replaces).
"""

from __future__ import annotations

import json
import threading

import pytest
import redis

from ben2q.jobs import INLINE_ITEMS, ItemStatus, JobStatus, make_request
from ben2q.status import KEYS, AsyncStatusStore, StatusStore, merged

TTL = 600
DB = 6  # the session server is shared: this module keeps to its own database


@pytest.fixture()
def store(url):
    with StatusStore(url, ttl=TTL) as store:
        yield store


def new_job(n: int, *, running: bool = True) -> JobStatus:
    inputs = [f"s3://catalogue/photos/{i:06d}.jpg" for i in range(n)]
    status = JobStatus.queued(make_request("batch", inputs, "s3://catalogue/cutouts/"))
    if running:
        status.state, status.started_at, status.attempts = "running", 100.0, 1
    return status


def done(items: list[ItemStatus], state: str = "succeeded") -> list[ItemStatus]:
    return [
        item.model_copy(
            update={
                "state": state,
                "output": f"s3://catalogue/cutouts/x/{item.index:04d}.png",
                "width": 800,
                "height": 600,
                "duration_ms": 812.5,
                "worker": "celery@gpu-7",
            }
        )
        for item in items
    ]


def test_a_big_job_is_stored_as_a_summary_and_an_item_hash(store, raw):
    status = new_job(40, running=False)
    assert status.items_apart and not new_job(INLINE_ITEMS).items_apart
    store.create(status)
    stored = json.loads(raw.get(KEYS.job(status.id)))
    assert stored["items"] == [] and stored["counts"] == {
        "total": 40,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert raw.hlen(KEYS.items(status.id)) == 40
    assert 0 < raw.ttl(KEYS.items(status.id)) <= TTL

    whole = store.get(status.id)
    assert [i.index for i in whole.items] == list(range(40)) and whole.whole
    assert whole.items[7].input == "s3://catalogue/photos/000007.jpg"
    assert store.get(status.id, items=False).items == []
    assert store.get(status.id, items=39).items == []  # more than asked for: the summary
    assert len(store.get(status.id, items=40).items) == 40
    page = store.get_items(status.id, 35, 50)
    assert [i.index for i in page] == [35, 36, 37, 38, 39]
    assert store.get_items(status.id, 40, 50) == []
    assert store.get_items("no-such-job", 0, 10) is None


def test_merges_write_only_their_items_and_end_the_job_once(store, raw):
    status = new_job(40)
    store.create(status)
    pubsub = raw.pubsub()
    pubsub.subscribe(KEYS.events(status.id))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    ends = []
    for start in (20, 0, 36, 4, 8, 24, 12, 28, 16, 32):  # out of order, as chunks end
        batch = store.get_items(status.id, start, start + 4)
        state = "failed" if start == 36 else "succeeded"
        record, ended = store.merge_items(status.id, done(batch, state))
        ends.append(ended)
        event = JobStatus.model_validate_json(pubsub.get_message(timeout=2)["data"])
        assert [i.index for i in event.items] == list(range(start, start + 4))
    assert ends == [False] * 9 + [True]
    assert record.state == "partial" and record.counts.succeeded == 36
    assert record.counts.failed == 4 and record.progress == 1.0 and record.items == []
    whole = store.get(status.id)
    assert [i.state for i in whole.items[36:]] == ["failed"] * 4
    assert all(i.worker == "celery@gpu-7" for i in whole.items)
    # a stale redelivery changes nothing once the job ended
    again, ended = store.merge_items(status.id, store.get_items(status.id, 0, 4))
    assert not ended and again.finished_at == record.finished_at
    pubsub.close()


def test_an_ended_item_never_moves_back_and_counts_follow(store):
    status = new_job(20)
    store.create(status)
    first = store.get_items(status.id, 0, 4)
    store.merge_items(status.id, done(first))
    running = [i.model_copy(update={"state": "running"}) for i in first]  # a redelivery
    record, ended = store.merge_items(status.id, running)
    assert not ended and record.counts.succeeded == 4 and record.progress == 0.2
    assert [i.state for i in store.get_items(status.id, 0, 4)] == ["succeeded"] * 4
    record, _ = store.merge_items(status.id, done(first, "failed"))  # ended -> ended: moves
    assert (record.counts.succeeded, record.counts.failed) == (0, 4)


def test_the_pure_rule_on_counts_matches_the_inline_one():
    """The same merges on a record holding its items and on a summary give one outcome."""
    inline, apart = new_job(20), new_job(20)
    current = {i.index: i for i in apart.items}
    apart = apart.summary()
    plan = [(0, 8, "succeeded"), (8, 12, "running"), (8, 16, "failed"), (16, 20, "cancelled")]
    for start, stop, state in plan:
        batch = done(inline.items[start:stop], state)
        inline, _, ended_inline = merged(inline, batch, cancel=False, now=110.0)
        apart, written, ended_apart = merged(apart, batch, current=current, cancel=False, now=110.0)
        current.update({i.index: i for i in written})
        assert ended_inline == ended_apart and inline.progress == apart.progress
    assert inline.state == apart.state == "partial" and apart.run_ms == 10000.0
    assert apart.counts == inline.counts
    assert apart.counts.model_dump() == {"total": 20, "succeeded": 8, "failed": 8, "cancelled": 4}


def test_cancel_of_a_queued_big_job_cancels_every_item(store):
    status = new_job(30, running=False)
    store.create(status)
    new = store.request_cancel(status.id)
    assert new.state == "cancelled" and new.counts.cancelled == 30
    assert {i.state for i in store.get(status.id).items} == {"cancelled"}
    assert store.get(status.id, items=False).counts.cancelled == 30


def test_a_whole_save_recounts_and_writes_the_given_items(store, raw):
    status = new_job(30)
    store.create(status)
    status.items[:10] = done(status.items[:10])
    store.save(status, items=status.items[:10])
    summary = store.get(status.id, items=False)
    assert summary.counts.succeeded == 10
    assert [i.state for i in store.get_items(status.id, 8, 12)] == ["succeeded"] * 2 + [
        "pending"
    ] * 2


def test_async_store_reads_big_jobs_as_the_sync_one(url, store):
    import asyncio

    status = new_job(25)
    store.create(status)

    async def read():
        async with AsyncStatusStore(url, ttl=TTL) as astore:
            whole = await astore.get(status.id)
            summary = await astore.get(status.id, items=False)
            page = await astore.get_items(status.id, 20, 30)
            return whole, summary, page

    whole, summary, page = asyncio.run(read())
    assert len(whole.items) == 25 and summary.items == [] and summary.counts.total == 25
    assert [i.index for i in page] == [20, 21, 22, 23, 24]


def _bytes_per_item(store: StatusStore, raw: redis.Redis, n: int, chunk: int = 16) -> float:
    """Bytes written to and published by Redis per item for a batch of ``n`` run as the
    workers do: created once, then per chunk of 16 one merge per pass of 4."""
    received = [0]
    status = new_job(n, running=False)
    stop = threading.Event()
    pubsub = raw.pubsub()
    pubsub.subscribe(KEYS.events(status.id))
    pubsub.get_message(timeout=1)

    def listen():
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.05)
            if msg and msg["type"] == "message":
                received[0] += len(msg["data"])

    listener = threading.Thread(target=listen)
    listener.start()
    before = int(raw.info("stats")["total_net_input_bytes"])
    store.create(status)
    for start in range(0, n, chunk):
        items = store.get_items(status.id, start, start + chunk)
        for p in range(0, len(items), 4):
            items[p : p + 4] = done(items[p : p + 4])
            store.merge_items(status.id, items[p : p + 4])
    written = int(raw.info("stats")["total_net_input_bytes"]) - before
    stop.set()
    listener.join()
    pubsub.close()
    final = store.get(status.id, items=False)
    assert final.state == "succeeded" and final.counts.succeeded == n
    return (written + received[0]) / n


def test_bytes_per_item_do_not_grow_with_the_batch(store, raw):
    small = _bytes_per_item(store, raw, 64)
    large = _bytes_per_item(store, raw, 1024)
    assert large <= 2048, f"{large:.0f} bytes per item"
    assert large <= small * 1.25, f"{small:.0f} -> {large:.0f} bytes per item"


def test_a_prefix_listing_is_recorded_once(store, raw):
    request = make_request("batch", [], "s3://catalogue/cutouts/", prefix="s3://catalogue/p/")
    store.create(JobStatus.queued(request))
    first = [f"s3://catalogue/p/{i:03d}.jpg" for i in range(30)]
    listed = store.record_listing(request.id, first)
    assert listed.counts.total == 30 and listed.items_apart
    again = store.record_listing(request.id, first + ["s3://catalogue/p/new.jpg"])
    assert again.counts.total == 30  # a redelivered job reads its listing back
    assert [i.input for i in store.get(request.id).items] == first
    assert store.record_listing("no-such-job", first) is None


def test_one_copy_of_a_chunk_runs(store):
    """A planner re-sending a chunk after a crash makes a second copy (another nonce): the
    first copy to start claims the chunk; the same copy again (a redelivery) may run."""
    assert store.chunk_owner("job-c", 16) is None
    assert store.claim_chunk("job-c", 16, "copy-a")
    assert not store.claim_chunk("job-c", 16, "copy-b")
    assert store.claim_chunk("job-c", 16, "copy-a")  # redelivered after its worker died
    assert store.claim_chunk("job-c", 32, "copy-b")  # another chunk: its own claim
    assert store.chunk_owner("job-c", 16) == "copy-a"
