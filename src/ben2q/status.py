"""Job records and their events in Redis, for producers, workers and watchers.

Layout (``Keys``)::

    ben2q:job:{id}       the JobStatus JSON, SET ... EX status_ttl (refreshed on every save)
    ben2q:events:{id}    pub/sub channel: the same JSON is PUBLISHed on every save
    ben2q:cancel:{id}    "1" once a cancel was requested, EX status_ttl

``StatusStore`` (sync, ``redis``) and ``AsyncStatusStore`` (``redis.asyncio``) have the
same methods and do only I/O; key naming, (de)serialization, the cancel transition and
the event-stream logic (what to yield, when to re-read, when to give up) live in the
I/O-free ``Keys``, ``encode``/``decode``, ``cancelled`` and ``EventStream``.

Both clients retry commands on connection errors with a backoff (about 10 s in all), so a
worker or producer survives a Redis restart without being re-created.

Many waiters, few connections: the ``events()`` of one store share one pub/sub connection,
its ``EventHub`` (a thread) or ``AsyncEventHub`` (a task), started on first use. It
SUBSCRIBEs each job's channel once, however many wait on it (reference counted; a channel
left without waiters is UNSUBSCRIBEd within a second), and hands each message to the
``Waiter`` of every ``events()`` on that job: a bounded mailbox, so a slow consumer only
loses messages it would have skipped anyway, and re-reads the record instead. No update is
lost: a waiter reads the record once its subscription is confirmed, again whenever the hub
had to reconnect (Redis re-confirms each channel), and every few seconds anyway (jittered,
``REREAD_INTERVAL``). The asyncio hub also batches these reads into MGETs, one at a time,
so a process with thousands of waiters holds two connections for them. Pub/sub messages
are RESP2 (the hub's connection always speaks RESP2).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import WatchError
from redis.retry import Retry

from .errors import NotFound
from .jobs import TERMINAL_STATES, JobStatus

__all__ = [
    "Keys",
    "KEYS",
    "encode",
    "decode",
    "cancelled",
    "EventStream",
    "event_id",
    "parse_event_id",
    "Waiter",
    "HubState",
    "EventHub",
    "AsyncEventHub",
    "StatusStore",
    "AsyncStatusStore",
]

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
"""``EventStream``'s default seconds between re-reads (stores pass ``REREAD_INTERVAL``)."""
REREAD_INTERVAL = 3.0
"""Mean seconds between a waiter's fallback re-reads of its record (jittered by 25 %): the
hub re-reads on reconnects itself, so this only covers what no message announced."""
SUBSCRIBE_TIMEOUT = 10.0
"""Seconds to wait for Redis to confirm a subscription."""
QUEUE_SIZE = 16
"""Messages a waiter's mailbox holds; beyond that it re-reads the record instead."""
HUB_TICK = 1.0
"""Seconds the hub's reader blocks at most (then it UNSUBSCRIBEs idle channels, PINGs)."""
HUB_PING_INTERVAL = 15.0
"""Seconds of silence on the subscription before the hub PINGs it (a dead peer shows)."""
HUB_PING_TIMEOUT = 10.0
"""Seconds an unanswered PING may take before the hub reconnects."""
CHUNK = 500
"""Channels per SUBSCRIBE/UNSUBSCRIBE command, keys per MGET."""


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

    @property
    def workers(self) -> str:
        """Sorted set: image workers by the time of their last heartbeat."""
        return f"{self.prefix}:workers"


KEYS = Keys()


def encode(status: JobStatus) -> str:
    """The JSON stored in the record and published on the channel."""
    return status.model_dump_json()


def decode(raw: bytes | str) -> JobStatus:
    return JobStatus.model_validate_json(raw)


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
    return new


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


def reread_interval(mean: float = REREAD_INTERVAL) -> float:
    """A waiter's fallback re-read interval: jittered, so many waiters spread their reads."""
    return mean * random.uniform(0.75, 1.25)


class _Stale:
    def __repr__(self) -> str:
        return "STALE"


STALE = _Stale()
"""What ``Waiter.take`` returns when the waiter must re-read its record."""


class Waiter:
    """One ``events()`` call's mailbox in a hub: the messages of its job's channel.

    It holds at most ``size`` messages. A consumer slow enough to overflow it drops them and
    is marked ``stale`` instead: it re-reads the record, which supersedes every message
    before it, so the hub never waits for anyone. ``ready`` turns true once the channel's
    subscription is confirmed (the first read must come after it); a waiter that was ready
    and sees the channel confirmed again (after a reconnect) is marked stale too.
    """

    __slots__ = ("job_id", "channel", "size", "queue", "stale", "ready", "overflows", "event")

    def __init__(self, job_id: str, channel: str, event: Any, size: int = QUEUE_SIZE) -> None:
        self.job_id = job_id
        self.channel = channel
        self.size = size
        self.queue: collections.deque[bytes] = collections.deque()
        self.stale = False
        self.ready = False
        self.overflows = 0
        self.event = event
        """``threading.Event`` or ``asyncio.Event``: set on every change."""

    def push(self, data: bytes) -> None:
        if not self.stale:
            if len(self.queue) < self.size:
                self.queue.append(data)
            else:
                self.queue.clear()
                self.stale = True
                self.overflows += 1
        self.event.set()

    def resync(self) -> None:
        self.queue.clear()
        self.stale = True
        self.event.set()

    def take(self) -> bytes | _Stale | None:
        """``STALE`` (re-read the record), the next message, or None."""
        if self.stale:
            self.stale = False
            return STALE
        return self.queue.popleft() if self.queue else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class HubState:
    """A hub's bookkeeping without I/O: which channels to (un)subscribe, who gets a message.

    ``channels`` maps each channel to its waiters. A channel whose last waiter left lingers,
    still subscribed, until ``idle()`` hands it over to be UNSUBSCRIBEd, so a job's next
    waiter finds it ready. ``pending`` counts the SUBSCRIBEs sent and not yet confirmed per
    channel: the channel is ready only once all are, since the reply to a SUBSCRIBE sent
    before an UNSUBSCRIBE must not count for one sent after it.
    """

    def __init__(self) -> None:
        self.channels: dict[str, set[Waiter]] = {}
        self.ready: set[str] = set()
        self.pending: collections.Counter[str] = collections.Counter()
        self.empty: set[str] = set()
        self.messages = 0
        self.confirmations = 0

    def join(self, waiter: Waiter) -> bool:
        """Add a waiter; True if its channel is new (it must be SUBSCRIBEd)."""
        waiters = self.channels.get(waiter.channel)
        if waiters is None:
            self.channels[waiter.channel] = {waiter}
            return True
        waiters.add(waiter)
        self.empty.discard(waiter.channel)
        if waiter.channel in self.ready:
            waiter.ready = True
        return False

    def leave(self, waiter: Waiter) -> None:
        waiters = self.channels.get(waiter.channel)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                self.empty.add(waiter.channel)

    def idle(self) -> list[str]:
        """Channels without waiters, forgotten now: UNSUBSCRIBE them."""
        gone = [c for c in self.empty if not self.channels.get(c, True)]
        for channel in gone:
            del self.channels[channel]
            self.ready.discard(channel)
        self.empty.clear()
        return gone

    def subscribing(self, channels: Iterable[str]) -> None:
        """A SUBSCRIBE of ``channels`` is being sent."""
        self.pending.update(channels)

    def lost(self) -> list[str]:
        """The connection dropped: nothing is subscribed; the channels to subscribe again."""
        self.pending.clear()
        self.ready.clear()
        self.idle()
        return list(self.channels)

    def handle(self, reply: Any) -> None:
        """Dispatch one reply read from the subscription."""
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = _text(reply[0])
        channel = _text(reply[1])
        if kind == "message" and len(reply) == 3:
            self.messages += 1
            for waiter in self.channels.get(channel, ()):
                waiter.push(reply[2])
        elif kind == "subscribe":
            left = self.pending[channel] - 1
            if left > 0:
                self.pending[channel] = left
                return
            self.pending.pop(channel, None)
            waiters = self.channels.get(channel)
            if waiters is None:
                return
            self.confirmations += 1
            self.ready.add(channel)
            for waiter in waiters:
                if waiter.ready:  # it was live before: the connection was lost meanwhile
                    waiter.resync()
                else:
                    waiter.ready = True
                    waiter.event.set()


def _chunks(items: list[str], size: int = CHUNK) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _hub_connection(pool: Any, retry: Any) -> Any:
    """A connection of ``pool``'s kind and settings but outside it: the hub's own
    subscription, which fails fast (the hub has its own backoff) and speaks RESP2."""
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(retry=retry, health_check_interval=0, protocol=2)
    return pool.connection_class(**kwargs)


_REDIS_OPTIONS: dict[str, Any] = {
    "health_check_interval": 15,  # PING an idle connection before using it
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
    "socket_keepalive": True,
}


def _backoff() -> EqualJitterBackoff:
    """Between retries of a command on ConnectionError/TimeoutError: 0.1 s doubling to 2 s;
    the default 10 retries wait about 10 s in all, enough for a Redis restart."""
    return EqualJitterBackoff(cap=2.0, base=0.1)


_CREATE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('PUBLISH', KEYS[2], ARGV[1])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""
"""SET NX + PUBLISH only if created. Finding the very same JSON counts as created: that is
a retry (after a lost reply) of a create that had in fact succeeded, not a duplicate id."""


# --- sync ------------------------------------------------------------------------------


class EventHub:
    """One pub/sub connection fanning a ``StatusStore``'s job events out to its waiters.

    A daemon thread reads the subscription and fills the waiters' mailboxes; waiter threads
    only send their SUBSCRIBE (under ``_send``, the connection's write lock). Any error on
    the connection makes the reader drop it, back off, connect again and SUBSCRIBE every
    channel anew; each channel's new confirmation sends its waiters back to the record.
    """

    def __init__(self, store: StatusStore) -> None:
        self.store = store
        self.pid = os.getpid()
        self.state = HubState()
        self.conn = _hub_connection(store.redis.connection_pool, Retry(NoBackoff(), 0))
        self.reconnects = 0
        self._lock = threading.Lock()  # the state and the waiters' mailboxes
        self._send = threading.Lock()  # writes, connects and disconnects of ``conn``
        self._live = False
        self._broken = False
        self._connected_once = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ben2q-event-hub", daemon=True)
        self._thread.start()

    # waiters' side

    def join(self, job_id: str) -> Waiter:
        """A waiter on ``job_id``'s channel once its subscription is confirmed."""
        waiter = Waiter(job_id, self.store.keys.events(job_id), threading.Event())
        with self._lock:
            new = self.state.join(waiter)
        try:
            if new:
                self._subscribe(waiter.channel)
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
            while True:
                with self._lock:
                    if waiter.ready:
                        return waiter
                    waiter.event.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"Redis did not confirm the subscription to {waiter.channel}"
                    )
                waiter.event.wait(left)
        except BaseException:
            self.leave(waiter)
            raise

    def next(self, waiter: Waiter, timeout: float) -> bytes | _Stale | None:
        """The waiter's next message or ``STALE``, waiting up to ``timeout``; else None."""
        with self._lock:
            item = waiter.take()
            if item is None:
                waiter.event.clear()
        if item is None and timeout > 0:
            waiter.event.wait(timeout)
            with self._lock:
                item = waiter.take()
        return item

    def leave(self, waiter: Waiter) -> None:
        with self._lock:
            self.state.leave(waiter)

    def _subscribe(self, channel: str) -> None:
        with self._send:
            if not self._live:
                return  # the reader subscribes every channel when it connects
            with self._lock:
                if channel not in self.state.channels:
                    return
                self.state.subscribing([channel])
            try:
                self.conn.send_command("SUBSCRIBE", channel, check_health=False)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._broken = True

    # the reader

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._connect()
                failures = 0
                self._read()
            except Exception as exc:
                if self._stop.is_set():
                    break
                self._drop()
                failures += 1
                log.warning("event hub: subscription lost (%s); reconnecting", exc)
                self._stop.wait(_backoff().compute(failures))
        self._drop()

    def _connect(self) -> None:
        with self._send:
            self.conn.connect()
            self._live = True
            self._broken = False
            with self._lock:
                channels = list(self.state.channels)
                self.state.subscribing(channels)
            for chunk in _chunks(channels):
                self.conn.send_command("SUBSCRIBE", *chunk, check_health=False)
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True

    def _read(self) -> None:
        last = time.monotonic()
        ping: float | None = None
        while not self._stop.is_set():
            if self._broken:
                raise redis.ConnectionError("a SUBSCRIBE on the hub's connection failed")
            if self.state.empty:
                with self._send, self._lock:
                    gone = self.state.idle()
                    for chunk in _chunks(gone):
                        self.conn.send_command("UNSUBSCRIBE", *chunk, check_health=False)
            if not self.conn.can_read(timeout=HUB_TICK):
                now = time.monotonic()
                if ping is not None and now - ping > HUB_PING_TIMEOUT:
                    raise redis.TimeoutError("no answer to PING on the subscription")
                if ping is None and now - last >= HUB_PING_INTERVAL:
                    with self._send:
                        self.conn.send_command("PING", check_health=False)
                    ping = now
                continue
            reply = self.conn.read_response(disconnect_on_error=False)
            last, ping = time.monotonic(), None
            with self._lock:
                self.state.handle(reply)

    def _drop(self) -> None:
        self._live = False
        with self._send:
            with self._lock:
                self.state.lost()
            try:
                self.conn.disconnect()
            except Exception:  # already gone
                pass

    def close(self) -> None:
        """Stop the reader; cutting its connection wakes it at once (no tick to wait)."""
        self._stop.set()
        self._live = False
        with self._send:
            try:
                self.conn.disconnect()
            except Exception:  # already gone
                pass
        if self._thread is not threading.current_thread():
            self._thread.join(HUB_TICK + 2)


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
        retry = Retry(_backoff(), retries)
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
        keys = [self.keys.job(status.id), self.keys.events(status.id)]
        if not self._create(keys=keys, args=[encode(status), self.ttl]):
            raise ValueError(f"job {status.id!r} exists already")

    def get(self, job_id: str) -> JobStatus | None:
        raw = self.redis.get(self.keys.job(job_id))
        return None if raw is None else decode(raw)

    def save(self, status: JobStatus) -> None:
        """Write the record (refreshing its TTL) and publish it, in one transaction."""
        data = encode(status)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.job(status.id), data, ex=self.ttl)
            pipe.publish(self.keys.events(status.id), data)
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
                    new = cancelled(status)
                    pipe.multi()
                    pipe.set(self.keys.cancel(job_id), "1", ex=self.ttl)
                    if new is not None:
                        data = encode(new)
                        pipe.set(key, data, ex=self.ttl)
                        pipe.publish(self.keys.events(job_id), data)
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

    def get_and_cancel_requested(self, job_id: str) -> tuple[JobStatus | None, bool]:
        """``get`` and ``cancel_requested`` in one round trip (a worker taking a job)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.job(job_id))
            pipe.exists(self.keys.cancel(job_id))
            raw, flagged = pipe.execute()
        return (None if raw is None else decode(raw)), bool(flagged)

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


class AsyncEventHub:
    """``EventHub`` on asyncio: a reader task in the loop that created it.

    It also serves the waiters' reads of their records: ``fetch`` queues the job, and one
    MGET at a time (of up to ``CHUNK`` keys) answers every queued read, so a burst of
    waiters costs a few round trips on one pooled connection, not a connection each.
    """

    def __init__(self, store: AsyncStatusStore) -> None:
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.state = HubState()
        self.conn = _hub_connection(store.redis.connection_pool, AsyncRetry(NoBackoff(), 0))
        self.reconnects = 0
        self.fetches = 0
        self._send = asyncio.Lock()
        self._live = False
        self._broken = False
        self._closed = False
        self._connected_once = False
        self._task = self.loop.create_task(self._run(), name="ben2q-event-hub")
        self._wanted: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._fetcher: asyncio.Task[None] | None = None

    # waiters' side

    async def join(self, job_id: str) -> Waiter:
        """A waiter on ``job_id``'s channel once its subscription is confirmed."""
        waiter = Waiter(job_id, self.store.keys.events(job_id), asyncio.Event())
        new = self.state.join(waiter)
        try:
            if new and self._live:
                # shielded: a waiter cancelled mid-write must not cut the shared connection
                await asyncio.shield(self._subscribe(waiter.channel))
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                    while not waiter.ready:
                        waiter.event.clear()
                        await waiter.event.wait()
            except TimeoutError:
                raise TimeoutError(
                    f"Redis did not confirm the subscription to {waiter.channel}"
                ) from None
        except BaseException:
            self.state.leave(waiter)
            raise
        return waiter

    async def next(self, waiter: Waiter, timeout: float) -> bytes | _Stale | None:
        """The waiter's next message or ``STALE``, waiting up to ``timeout``; else None."""
        item = waiter.take()
        if item is None and timeout > 0:
            waiter.event.clear()
            try:
                async with asyncio.timeout(timeout):
                    await waiter.event.wait()
            except TimeoutError:
                return None
            item = waiter.take()
        return item

    def leave(self, waiter: Waiter) -> None:
        """Synchronous, so it is safe in any ``finally`` (the reader UNSUBSCRIBEs later)."""
        self.state.leave(waiter)

    async def fetch(self, job_id: str) -> JobStatus | None:
        """The job's record, read in a batch with every other waiter's."""
        future: asyncio.Future[bytes | None] = self.loop.create_future()
        self._wanted.setdefault(job_id, []).append(future)
        if self._fetcher is None or self._fetcher.done():
            self._fetcher = self.loop.create_task(self._fetch_all())
        raw = await future
        return None if raw is None else decode(raw)

    async def _fetch_all(self) -> None:
        while self._wanted:
            batch = dict(itertools.islice(self._wanted.items(), CHUNK))
            for job_id in batch:
                del self._wanted[job_id]
            self.fetches += 1
            try:
                raws = await self.store.redis.mget([self.store.keys.job(j) for j in batch])
            except Exception as exc:
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for futures, raw in zip(batch.values(), raws, strict=True):
                for future in futures:
                    if not future.done():
                        future.set_result(raw)

    async def _subscribe(self, channel: str) -> None:
        async with self._send:
            if not self._live or channel not in self.state.channels:
                return  # the reader subscribes every channel when it connects
            self.state.subscribing([channel])
            try:
                await self.conn.send_command("SUBSCRIBE", channel, check_health=False)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._broken = True

    # the reader

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
            try:
                await self._connect()
                failures = 0
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    break
                await self._drop()
                failures += 1
                log.warning("event hub: subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(_backoff().compute(failures))

    async def _connect(self) -> None:
        async with self._send:
            await self.conn.connect()
            self._live = True
            self._broken = False
            channels = list(self.state.channels)
            self.state.subscribing(channels)
            for chunk in _chunks(channels):
                await self.conn.send_command("SUBSCRIBE", *chunk, check_health=False)
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True

    async def _read(self) -> None:
        last = self.loop.time()
        ping: float | None = None
        while not self._closed:
            if self._broken:
                raise redis.ConnectionError("a SUBSCRIBE on the hub's connection failed")
            if self.state.empty:
                async with self._send:
                    for chunk in _chunks(self.state.idle()):
                        await self.conn.send_command("UNSUBSCRIBE", *chunk, check_health=False)
            reply = await self.conn.read_response(timeout=HUB_TICK, disconnect_on_error=False)
            now = self.loop.time()
            if reply is None:
                if ping is not None and now - ping > HUB_PING_TIMEOUT:
                    raise redis.TimeoutError("no answer to PING on the subscription")
                if ping is None and now - last >= HUB_PING_INTERVAL:
                    async with self._send:
                        await self.conn.send_command("PING", check_health=False)
                    ping = now
                continue
            last, ping = now, None
            self.state.handle(reply)

    async def _drop(self) -> None:
        self._live = False
        async with self._send:
            self.state.lost()
            try:
                await self.conn.disconnect(nowait=True)
            except Exception:  # already gone
                pass

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._task, self._fetcher):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        await self._drop()


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
        retry = AsyncRetry(_backoff(), retries)
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
        keys = [self.keys.job(status.id), self.keys.events(status.id)]
        if not await self._create(keys=keys, args=[encode(status), self.ttl]):
            raise ValueError(f"job {status.id!r} exists already")

    async def get(self, job_id: str) -> JobStatus | None:
        raw = await self.redis.get(self.keys.job(job_id))
        return None if raw is None else decode(raw)

    async def save(self, status: JobStatus) -> None:
        data = encode(status)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.job(status.id), data, ex=self.ttl)
            pipe.publish(self.keys.events(status.id), data)
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
                    new = cancelled(status)
                    pipe.multi()
                    pipe.set(self.keys.cancel(job_id), "1", ex=self.ttl)
                    if new is not None:
                        data = encode(new)
                        pipe.set(key, data, ex=self.ttl)
                        pipe.publish(self.keys.events(job_id), data)
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

    async def get_and_cancel_requested(self, job_id: str) -> tuple[JobStatus | None, bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.job(job_id))
            pipe.exists(self.keys.cancel(job_id))
            raw, flagged = await pipe.execute()
        return (None if raw is None else decode(raw)), bool(flagged)

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
