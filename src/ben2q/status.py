"""Job records and their events in Redis, for producers, workers and watchers.

Layout (``Keys``)::

    ben2q:job:{id}       the JobStatus JSON, SET ... EX status_ttl (refreshed on every save);
                         of a job that keeps its items apart (``items_apart``, more than
                         ``INLINE_ITEMS``): its summary, ``items`` empty, ``counts`` kept
    ben2q:items:{id}     hash of such a job's items: field = item index, value = the
                         ItemStatus JSON; each save writes only the items that changed
    ben2q:events:{id}    pub/sub channel: the record is PUBLISHed on every save (a job with
                         items apart: its summary with the items that changed)
    ben2q:cancel:{id}    "1" once a cancel was requested, EX status_ttl
    ben2q:chunks:{id}    hash of a fanned-out batch job: ``sent:{start}`` once its chunk
                         starting at item ``start`` is on the queue, ``attempts:{start}``
                         deliveries of that chunk so far, ``owner:{start}`` the nonce of
                         the copy of that chunk that runs; EX status_ttl

``StatusStore`` (sync, ``redis``) and ``AsyncStatusStore`` (``redis.asyncio``) have the
same methods and do only I/O; key naming, (de)serialization, the cancel transition and
the event-stream logic (what to yield, when to re-read, when to give up) live in the
I/O-free ``Keys``, ``encode``/``decode``, ``cancelled`` and ``EventStream``.

Both clients retry commands on connection errors with a backoff (about 10 s in all), so a
worker or producer survives a Redis restart without being re-created.

Many waiters, few connections: the ``events()`` of one store share one pub/sub connection
(``ben2q.eventhub``), so thousands of waiters in a process cost it two Redis connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.exceptions import WatchError
from redis.retry import Retry

from .errors import NotFound
from .eventhub import (
    REREAD_INTERVAL,
    STALE,
    SUBSCRIBE_TIMEOUT,
    AsyncEventHub,
    EventHub,
    backoff,
    decode,
    reread_interval,
)
from .jobs import ITEMS_SHOWN, TERMINAL_STATES, ItemCounts, ItemStatus, JobStatus

__all__ = [
    "Keys",
    "KEYS",
    "encode",
    "encode_event",
    "decode",
    "cancelled",
    "EventStream",
    "event_id",
    "parse_event_id",
    "StatusStore",
    "AsyncStatusStore",
]

log = logging.getLogger(__name__)

LISTING_PIECE = 10_000
"""Items per HSET when a prefix job's listing is recorded (one MULTI in all)."""

POLL_INTERVAL = 1.0
"""``EventStream``'s default seconds between re-reads (stores pass ``REREAD_INTERVAL``)."""


# --- the I/O-free part -----------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """Redis key names of one deployment (all under ``prefix``)."""

    prefix: str = "ben2q"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def items(self, job_id: str) -> str:
        return f"{self.prefix}:items:{job_id}"

    def chunks(self, job_id: str) -> str:
        return f"{self.prefix}:chunks:{job_id}"

    @property
    def workers(self) -> str:
        """Sorted set: image workers by the time of their last heartbeat."""
        return f"{self.prefix}:workers"


KEYS = Keys()


def encode(status: JobStatus) -> str:
    """The JSON stored in the record (a summary where items are apart)."""
    if status.items_apart:
        return status.summary().model_dump_json()
    return status.model_dump_json()


def encode_event(status: JobStatus, items: list[ItemStatus] | None = None) -> str:
    """The JSON published on the channel: the record, or where items are apart its summary
    with ``items`` (those a save just wrote), without null fields (bytes per item count:
    every watcher receives every event)."""
    if status.items_apart:
        event = status.model_copy(update={"items": list(items or [])})
        return event.model_dump_json(exclude_none=True)
    return status.model_dump_json()


def item_fields(items: list[ItemStatus]) -> dict[str, str]:
    """``HSET`` mapping of items kept apart: index -> JSON (without null fields)."""
    return {str(item.index): item.model_dump_json(exclude_none=True) for item in items}


def with_items(status: JobStatus, raws: list[Any] | dict[Any, Any]) -> JobStatus:
    """``status`` (a summary) with the stored items ``raws`` (HVALS/HGETALL/HMGET replies,
    missing ones skipped), in index order."""
    values = raws.values() if isinstance(raws, dict) else raws
    items = [ItemStatus.model_validate_json(v) for v in values if v is not None]
    items.sort(key=lambda item: item.index)
    return status.model_copy(update={"items": items})


def wants_items(status: JobStatus | None, items: bool | int) -> bool:
    """Whether a read asking for ``items`` (all, none, or all up to that many) must read
    the items kept apart of ``status``."""
    if status is None or not status.items_apart or items is False:
        return False
    total = status.counts.total if status.counts else 0
    return items is True or total <= items


def item_range(status: JobStatus, start: int, stop: int) -> range:
    """The valid indices ``start … stop - 1`` of a job's items."""
    total = status.counts.total if status.counts else len(status.items)
    return range(max(0, start), min(stop, total))


def cancelled(status: JobStatus, now: float | None = None) -> JobStatus | None:
    """The record after a cancel request, or None if only the flag changes.

    Only a ``queued`` job is cancelled at once (nobody is working on it); a running job
    sees the flag and stops itself; a finished job stays as it is.
    """
    if status.state != "queued":
        return None
    new = status.model_copy(deep=True)
    new.state = "cancelled"
    new.finished_at = time.time() if now is None else now
    for item in new.items:
        if item.state in ("pending", "running"):
            item.state = "cancelled"
    return new.recount()


ITEM_ENDED = frozenset({"succeeded", "failed", "cancelled"})


def merged(
    status: JobStatus,
    items: list[ItemStatus],
    *,
    current: dict[int, ItemStatus] | None = None,
    cancel: bool,
    now: float,
) -> tuple[JobStatus, list[ItemStatus], bool]:
    """``status`` with ``items`` (a chunk's, placed by their ``index``) written in; once every
    item has ended, the job ends too: ``cancelled`` if a cancel was asked for, else as
    ``settle`` decides. Returns the record, the items to write, and whether this merge
    ended the job.

    ``current``: the stored items at those indices, for a record that keeps items apart
    (its ``counts`` move by the difference); otherwise the record's own items are used.
    An item that has ended in the record is never moved back to pending or running (a
    stale or redelivered chunk must not undo another's work)."""
    if status.done:
        return status, [], False
    if status.items_apart and not status.whole and current is None:
        raise ValueError(f"job {status.id} keeps its items apart: merging needs them")
    apart = current is not None
    counts = (
        status.counts.model_copy()
        if status.counts is not None and apart
        else ItemCounts.of(status.items)
    )
    written: list[ItemStatus] = []
    for item in items:
        if not 0 <= item.index < counts.total:
            raise ValueError(f"item {item.index} is not in job {status.id}")
        before = current.get(item.index) if current is not None else status.items[item.index]
        before_state = before.state if before is not None else "pending"
        if before_state in ITEM_ENDED and item.state not in ITEM_ENDED:
            continue
        counts.add(before_state, -1)
        counts.add(item.state)
        if not apart:
            status.items[item.index] = item
        written.append(item)
    status.counts = counts
    status.progress = round(counts.ended / counts.total, 4) if counts.total else 1.0
    if counts.ended < counts.total:
        return status, written, False
    if cancel:
        status.state, status.progress = "cancelled", 1.0
    else:
        status.settle()
        if status.state == "failed" and status.error is None:
            status.error = next((i.error for i in written if i.error is not None), None)
    status.finished_at = now
    if status.started_at:
        status.run_ms = round((now - status.started_at) * 1000, 3)
    return status, written, True


def _order(status: JobStatus) -> tuple[int, int, int, float]:
    """Sort key of updates: a stale message never moves a stream backwards."""
    rank = {"queued": 0, "running": 1}.get(status.state, 2)
    return (rank == 2, status.attempts, rank, status.progress)


class EventStream:
    """The logic of ``events()``: which records to yield, when to re-read, when to stop.

    Feed it every record seen (the first read, each published message, each re-read);
    ``offer`` says whether to yield it. It never yields the same (state, progress,
    finished_at) twice in a row, nor an update older than the last one yielded (a message
    published before the first read), and it is ``done`` after a terminal state.
    """

    def __init__(
        self,
        job_id: str,
        timeout: float | None,
        *,
        poll_interval: float = POLL_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.clock = clock
        self.poll_interval = poll_interval
        self.deadline = None if timeout is None else clock() + timeout
        self.timeout = timeout
        self.done = False
        self._last: JobStatus | None = None
        self._last_read = clock()

    def offer(self, status: JobStatus | None) -> JobStatus | None:
        """The record to yield, or None; ``NotFound`` if the record is gone."""
        if status is None:
            raise NotFound(f"no job {self.job_id!r} (unknown or expired)")
        if self.done:
            return None
        last = self._last
        if last is not None:
            same = (status.state, status.progress, status.finished_at) == (
                last.state,
                last.progress,
                last.finished_at,
            )
            if same or _order(status) < _order(last):
                return None
        self._last = status
        self.done = status.state in TERMINAL_STATES
        return status

    def read(self) -> None:
        """Note that the record was just (re-)read."""
        self._last_read = self.clock()

    def poll_due(self) -> bool:
        return self.clock() - self._last_read >= self.poll_interval

    def wait_time(self) -> float:
        """How long to block for a message now; ``TimeoutError`` once the deadline passed."""
        now = self.clock()
        wait = max(0.0, self._last_read + self.poll_interval - now)
        if self.deadline is not None:
            left = self.deadline - now
            if left <= 0:
                state = self._last.state if self._last else "unknown"
                raise TimeoutError(f"job {self.job_id} still {state} after {self.timeout:g} s")
            wait = min(wait, left)
        return wait

    @staticmethod
    def message(msg: dict[str, Any] | None) -> JobStatus | None:
        """The record carried by a pub/sub message, if it is one."""
        if msg is None or msg.get("type") != "message":
            return None
        return decode(msg["data"])


def event_id(status: JobStatus) -> str:
    """An ordered id of the record (SSE ``id:``): ``terminal.attempts.rank.progress``, the
    record's ``_order`` with progress in millionths, so ids compare as ``parse_event_id``."""
    terminal, attempts, rank, progress = _order(status)
    return f"{int(terminal)}.{attempts}.{rank}.{round(progress * 1_000_000)}"


def parse_event_id(text: str | None) -> tuple[int, int, int, int] | None:
    """The order of an ``event_id``; None for anything else (a resume from scratch)."""
    if not text:
        return None
    parts = text.strip().split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 12 for p in parts):
        return None
    a, b, c, d = (int(p) for p in parts)
    return (a, b, c, d)


def event_order(status: JobStatus) -> tuple[int, int, int, int]:
    """``parse_event_id(event_id(status))``, without the round trip."""
    terminal, attempts, rank, progress = _order(status)
    return (int(terminal), attempts, rank, round(progress * 1_000_000))


_REDIS_OPTIONS: dict[str, Any] = {
    "health_check_interval": 15,  # PING an idle connection before using it
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
    "socket_keepalive": True,
}


_CREATE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  for i = 3, #ARGV, 2 do
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
  if #ARGV > 2 then redis.call('EXPIRE', KEYS[3], ARGV[2]) end
  redis.call('PUBLISH', KEYS[2], ARGV[1])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""
"""SET NX (+ the items kept apart) + PUBLISH only if created. Finding the very same JSON
counts as created: that is a retry (after a lost reply) of a create that had in fact
succeeded, not a duplicate id."""


def _create_args(keys: Keys, status: JobStatus, ttl: int) -> tuple[list[str], list[Any]]:
    names = [keys.job(status.id), keys.events(status.id), keys.items(status.id)]
    args: list[Any] = [encode(status), ttl]
    if status.items_apart:
        for field, value in item_fields(status.items).items():
            args += [field, value]
    return names, args


def _queue_save(
    pipe: Any, keys: Keys, status: JobStatus, items: list[ItemStatus] | None, ttl: int
) -> None:
    """The commands of ``save`` (into a MULTI pipeline): record, items apart, event."""
    if status.items_apart:
        status.recount()  # a whole record: its counts follow its items
        items = status.items if items is None else items
        pipe.set(keys.job(status.id), encode(status), ex=ttl)
        if items:
            pipe.hset(keys.items(status.id), mapping=item_fields(items))
        pipe.expire(keys.items(status.id), ttl)
        pipe.publish(keys.events(status.id), encode_event(status, items))
    else:
        data = encode(status)
        pipe.set(keys.job(status.id), data, ex=ttl)
        pipe.publish(keys.events(status.id), data)


# --- sync ------------------------------------------------------------------------------


class StatusStore:
    """Job records and events on a Redis server (sync; workers, the CLI, ``Client``)."""

    def __init__(
        self,
        redis_url: str,
        *,
        ttl: int,
        keys: Keys = KEYS,
        retries: int = 10,
        reread: float = REREAD_INTERVAL,
    ) -> None:
        """``reread``: mean seconds between an event stream's fallback re-reads."""
        self.ttl = ttl
        self.keys = keys
        self.reread = reread
        retry = Retry(backoff(), retries)
        self.redis: redis.Redis = redis.Redis.from_url(redis_url, retry=retry, **_REDIS_OPTIONS)
        self._create = self.redis.register_script(_CREATE)
        self._hub: EventHub | None = None
        self._hub_lock = threading.Lock()

    @property
    def hub(self) -> EventHub:
        """This store's event hub (started on first use; again in a forked child)."""
        with self._hub_lock:
            if self._hub is None or self._hub.pid != os.getpid():
                self._hub = EventHub(self)
            return self._hub

    def create(self, status: JobStatus) -> None:
        """Store and publish a new record (SET NX); ``ValueError`` if the job id exists."""
        keys, args = _create_args(self.keys, status, self.ttl)
        if not self._create(keys=keys, args=args):
            raise ValueError(f"job {status.id!r} exists already")

    def get(self, job_id: str, *, items: bool | int = True) -> JobStatus | None:
        """The record; where items are kept apart, with them if ``items`` is True or at
        least their number (else the summary: ``items`` empty, ``counts`` set)."""
        raw = self.redis.get(self.keys.job(job_id))
        status = None if raw is None else decode(raw)
        return self._with_items(status, items)

    def _with_items(self, status: JobStatus | None, items: bool | int) -> JobStatus | None:
        if status is None or not wants_items(status, items):
            return status
        return with_items(status, self.redis.hvals(self.keys.items(status.id)))

    def get_items(
        self, job_id: str, start: int, stop: int, *, summary: JobStatus | None = None
    ) -> list[ItemStatus] | None:
        """Items ``start … stop - 1`` of a job (fewer at its end); None if it is gone.
        ``summary``: the job's record as the caller just read it (not read again)."""
        status = summary if summary is not None else self.get(job_id, items=False)
        if status is None:
            return None
        wanted = item_range(status, start, stop)
        if not status.items_apart:
            return status.items[wanted.start : wanted.stop]
        if not wanted:
            return []
        raws = self.redis.hmget(self.keys.items(job_id), [str(i) for i in wanted])
        return with_items(status, raws).items

    def shown(self, status: JobStatus, *, final: bool) -> JobStatus:
        """The record a webhook event carries. Of a job whose items are kept apart, a
        progress event carries the summary, a final one the whole record up to
        ``ITEMS_SHOWN`` items (read here if ``status`` is a summary)."""
        if not status.items_apart:
            return status
        if final and not status.whole:
            status = self.get(status.id, items=ITEMS_SHOWN) or status
        if final and status.whole and len(status.items) <= ITEMS_SHOWN:
            return status
        return status.summary()

    def save(self, status: JobStatus, items: list[ItemStatus] | None = None) -> None:
        """Write the record (refreshing its TTL) and publish it, in one transaction. Where
        items are kept apart: the summary, and ``items`` (default: those ``status`` holds)."""
        with self.redis.pipeline(transaction=True) as pipe:
            _queue_save(pipe, self.keys, status, items, self.ttl)
            pipe.execute()

    def request_cancel(self, job_id: str) -> JobStatus:
        """Flag the job for cancellation; a queued job is cancelled at once (atomically)."""
        key = self.keys.job(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFound(f"no job {job_id!r} (unknown or expired)")
                    status = decode(raw)
                    if status.done:
                        pipe.unwatch()
                        return status
                    if status.state == "queued" and status.items_apart:
                        status = with_items(status, pipe.hvals(self.keys.items(job_id)))
                    new = cancelled(status)
                    pipe.multi()
                    pipe.set(self.keys.cancel(job_id), "1", ex=self.ttl)
                    if new is not None:
                        _queue_save(pipe, self.keys, new, None, self.ttl)
                    pipe.execute()
                    return new or status
                except WatchError:  # the record changed meanwhile: look again
                    continue

    def update(self, job_id: str, mutate: Callable[[JobStatus], None]) -> JobStatus | None:
        """Apply ``mutate`` to the stored record atomically (optimistic WATCH/MULTI retry).

        For writers other than the job's own worker (webhook deliveries) that must not lose
        each other's changes. Returns the new record, or None if it no longer exists.
        """
        key = self.keys.job(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    status = decode(raw)
                    mutate(status)
                    pipe.multi()
                    pipe.set(key, encode(status), keepttl=True)
                    pipe.execute()
                    return status
                except WatchError:
                    continue

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))

    def merge_items(
        self, job_id: str, items: list[ItemStatus], *, now: float | None = None
    ) -> tuple[JobStatus | None, bool]:
        """Write a chunk's ``items`` into the job's record atomically (see ``merged``; WATCH
        retry, so chunks ending together on many workers never lose each other's items)
        and publish it. Returns ``(record, ended_here)``: exactly one merge, the one that
        writes the last item, ends the job; ``(None, False)`` if the record is gone."""
        key = self.keys.job(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key, self.keys.cancel(job_id))
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None, False
                    cancel = bool(pipe.exists(self.keys.cancel(job_id)))
                    status = decode(raw)
                    if status.done:
                        pipe.unwatch()
                        return status, False
                    current = None
                    if status.items_apart:
                        fields = [str(item.index) for item in items]
                        raws = pipe.hmget(self.keys.items(job_id), fields) if fields else []
                        current = {i.index: i for i in with_items(status, raws).items}
                    status, written, ended = merged(
                        status,
                        items,
                        current=current,
                        cancel=cancel,
                        now=time.time() if now is None else now,
                    )
                    pipe.multi()
                    _queue_save(pipe, self.keys, status, written, self.ttl)
                    pipe.execute()
                    return status, ended
                except WatchError:
                    continue

    def record_listing(self, job_id: str, inputs: list[str]) -> JobStatus | None:
        """Record the images listed under a prefix job's location as its items, once
        (WATCH/MULTI): a record that has its items already (a redelivered job) keeps them.
        Returns the record's summary as it now stands; None if the record is gone."""
        key = self.keys.job(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    status = decode(raw)
                    if status.done or (status.counts is not None and status.counts.total):
                        pipe.unwatch()
                        return status
                    items = [ItemStatus(index=i, input=uri) for i, uri in enumerate(inputs)]
                    status.counts, status.items_apart = ItemCounts(total=len(items)), True
                    pipe.multi()
                    for start in range(0, len(items), LISTING_PIECE):
                        piece = items[start : start + LISTING_PIECE]
                        pipe.hset(self.keys.items(job_id), mapping=item_fields(piece))
                    pipe.expire(self.keys.items(job_id), self.ttl)
                    pipe.set(key, encode(status), ex=self.ttl)
                    pipe.publish(self.keys.events(job_id), encode_event(status, []))
                    pipe.execute()
                    return status
                except WatchError:
                    continue

    def chunk_attempt(self, job_id: str, start: int) -> int:
        """Count one more delivery of the chunk starting at ``start``; the count so far."""
        name = self.keys.chunks(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(name, f"attempts:{start}", 1)
            pipe.expire(name, self.ttl)
            attempts, _ = pipe.execute()
        return int(attempts)

    def claim_chunk(self, job_id: str, start: int, nonce: str) -> bool:
        """Whether the copy ``nonce`` of the chunk at ``start`` may run: the first copy to
        ask claims it (HSETNX), later asks by the same copy are granted, others refused."""
        name, field = self.keys.chunks(job_id), f"owner:{start}"
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(name, field, nonce)
            pipe.hget(name, field)
            pipe.expire(name, self.ttl)
            _, owner, _ = pipe.execute()
        return owner is not None and owner.decode() == nonce

    def chunk_owner(self, job_id: str, start: int) -> str | None:
        """The nonce of the copy that claimed the chunk at ``start``, if any."""
        owner = self.redis.hget(self.keys.chunks(job_id), f"owner:{start}")
        return None if owner is None else owner.decode()

    def chunks_sent(self, job_id: str) -> set[int]:
        """Starts of the chunks of a fanned-out job already on the queue."""
        fields = self.redis.hkeys(self.keys.chunks(job_id))
        return {int(f.decode().removeprefix("sent:")) for f in fields if f.startswith(b"sent:")}

    def chunk_sent(self, job_id: str, start: int) -> None:
        name = self.keys.chunks(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(name, f"sent:{start}", "1")
            pipe.expire(name, self.ttl)
            pipe.execute()

    def worker_seen(
        self, name: str, *, now: float | None = None, forget_after: float = 3600
    ) -> None:
        """Note that image worker ``name`` is consuming (its heartbeat; ``/readyz`` reads it)."""
        now = time.time() if now is None else now
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers, {name: now})
            pipe.zremrangebyscore(self.keys.workers, "-inf", now - forget_after)
            pipe.execute()

    def worker_gone(self, name: str) -> None:
        self.redis.zrem(self.keys.workers, name)

    def get_and_cancel_requested(
        self, job_id: str, *, items: bool | int = True
    ) -> tuple[JobStatus | None, bool]:
        """``get`` and ``cancel_requested`` in one round trip (a worker taking a job; a
        second one for items kept apart)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.job(job_id))
            pipe.exists(self.keys.cancel(job_id))
            raw, flagged = pipe.execute()
        status = None if raw is None else decode(raw)
        return self._with_items(status, items), bool(flagged)

    def events(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobStatus]:
        """The current record, then each update, until a terminal state.

        ``NotFound`` for an unknown job; ``TimeoutError`` if it is not finished in time.
        All the store's streams share its hub's one subscription.
        """
        stream = EventStream(job_id, timeout, poll_interval=reread_interval(self.reread))
        hub = self.hub
        waiter = hub.join(job_id)  # the subscription is live before the first read
        try:
            stream.read()
            first = stream.offer(self.get(job_id))
            if first is not None:
                yield first
            while not stream.done:
                item = hub.next(waiter, stream.wait_time())
                status = None
                if item is STALE or (item is None and stream.poll_due()):
                    stream.read()
                    status = self.get(job_id)
                    if status is None:
                        stream.offer(None)  # raises NotFound: the record expired
                elif isinstance(item, (bytes, str)):
                    status = decode(item)
                if status is not None and (update := stream.offer(status)) is not None:
                    yield update
        finally:
            hub.leave(waiter)

    def close(self) -> None:
        with self._hub_lock:
            hub, self._hub = self._hub, None
        if hub is not None and hub.pid == os.getpid():
            hub.close()
        self.redis.close()

    def __enter__(self) -> StatusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- async -----------------------------------------------------------------------------


class AsyncStatusStore:
    """``StatusStore`` on ``redis.asyncio``: the same methods, awaited; ``aclose``."""

    def __init__(
        self,
        redis_url: str,
        *,
        ttl: int,
        keys: Keys = KEYS,
        retries: int = 10,
        max_connections: int | None = None,
        reread: float = REREAD_INTERVAL,
    ) -> None:
        """``max_connections`` bounds the pool: callers beyond it wait for a free
        connection (up to ``SUBSCRIBE_TIMEOUT`` s) instead of failing (the HTTP API). The
        event hub's subscription is one more connection, outside the pool."""
        self.ttl = ttl
        self.keys = keys
        self.reread = reread
        self._hub: AsyncEventHub | None = None
        retry = AsyncRetry(backoff(), retries)
        if max_connections is None:
            self.redis: aredis.Redis = aredis.Redis.from_url(
                redis_url, retry=retry, **_REDIS_OPTIONS
            )
        else:
            pool = aredis.BlockingConnectionPool.from_url(
                redis_url,
                max_connections=max_connections,
                timeout=SUBSCRIBE_TIMEOUT,
                retry=retry,
                **_REDIS_OPTIONS,
            )
            self.redis = aredis.Redis(connection_pool=pool)
        self._create = self.redis.register_script(_CREATE)

    async def create(self, status: JobStatus) -> None:
        keys, args = _create_args(self.keys, status, self.ttl)
        if not await self._create(keys=keys, args=args):
            raise ValueError(f"job {status.id!r} exists already")

    async def get(self, job_id: str, *, items: bool | int = True) -> JobStatus | None:
        raw = await self.redis.get(self.keys.job(job_id))
        status = None if raw is None else decode(raw)
        return await self._with_items(status, items)

    async def _with_items(self, status: JobStatus | None, items: bool | int) -> JobStatus | None:
        if status is None or not wants_items(status, items):
            return status
        return with_items(status, await self.redis.hvals(self.keys.items(status.id)))

    async def get_items(
        self, job_id: str, start: int, stop: int, *, summary: JobStatus | None = None
    ) -> list[ItemStatus] | None:
        status = summary if summary is not None else await self.get(job_id, items=False)
        if status is None:
            return None
        wanted = item_range(status, start, stop)
        if not status.items_apart:
            return status.items[wanted.start : wanted.stop]
        if not wanted:
            return []
        raws = await self.redis.hmget(self.keys.items(job_id), [str(i) for i in wanted])
        return with_items(status, raws).items

    async def save(self, status: JobStatus, items: list[ItemStatus] | None = None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            _queue_save(pipe, self.keys, status, items, self.ttl)
            await pipe.execute()

    async def request_cancel(self, job_id: str) -> JobStatus:
        key = self.keys.job(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise NotFound(f"no job {job_id!r} (unknown or expired)")
                    status = decode(raw)
                    if status.done:
                        await pipe.unwatch()
                        return status
                    if status.state == "queued" and status.items_apart:
                        raws = await pipe.hvals(self.keys.items(job_id))
                        status = with_items(status, raws)
                    new = cancelled(status)
                    pipe.multi()
                    pipe.set(self.keys.cancel(job_id), "1", ex=self.ttl)
                    if new is not None:
                        _queue_save(pipe, self.keys, new, None, self.ttl)
                    await pipe.execute()
                    return new or status
                except WatchError:
                    continue

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.cancel(job_id)))

    async def workers_seen(self, max_age: float, *, now: float | None = None) -> int:
        """Image workers whose last heartbeat is at most ``max_age`` seconds old."""
        now = time.time() if now is None else now
        return int(await self.redis.zcount(self.keys.workers, now - max_age, "+inf"))

    async def get_and_cancel_requested(
        self, job_id: str, *, items: bool | int = True
    ) -> tuple[JobStatus | None, bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.job(job_id))
            pipe.exists(self.keys.cancel(job_id))
            raw, flagged = await pipe.execute()
        status = None if raw is None else decode(raw)
        return await self._with_items(status, items), bool(flagged)

    @property
    def hub(self) -> AsyncEventHub:
        """This store's event hub in the running loop (started on first use)."""
        loop = asyncio.get_running_loop()
        if self._hub is None or self._hub.loop is not loop:
            self._hub = AsyncEventHub(self)  # a hub of a finished loop is abandoned
        return self._hub

    async def events(
        self, job_id: str, *, timeout: float | None = None
    ) -> AsyncGenerator[JobStatus, None]:
        """Async iterator of ``StatusStore.events``."""
        stream = EventStream(job_id, timeout, poll_interval=reread_interval(self.reread))
        hub = self.hub
        waiter = await hub.join(job_id)
        try:
            stream.read()
            first = stream.offer(await hub.fetch(job_id))
            if first is not None:
                yield first
            while not stream.done:
                item = await hub.next(waiter, stream.wait_time())
                status = None
                if item is STALE or (item is None and stream.poll_due()):
                    stream.read()
                    status = await hub.fetch(job_id)
                    if status is None:
                        stream.offer(None)
                elif isinstance(item, (bytes, str)):
                    status = decode(item)
                if status is not None and (update := stream.offer(status)) is not None:
                    yield update
        finally:
            hub.leave(waiter)

    async def aclose(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if hub.loop is running:
                await hub.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncStatusStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
