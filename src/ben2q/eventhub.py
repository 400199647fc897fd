"""One pub/sub connection per status store, fanning job events out to every waiter.

Why: a waiter per Redis connection does not scale (300 concurrent ``AsyncClient.wait``
calls once gave 250 ``MaxConnectionsError`` with 103 connections open). Here the
``events()`` of one store share its ``EventHub`` (a thread) or ``AsyncEventHub`` (a task),
started on first use. A hub SUBSCRIBEs each job's channel once, however many wait on it
(reference counted in ``HubState``; a channel left without waiters is UNSUBSCRIBEd within
a second), and hands each message to the ``Waiter`` of every ``events()`` on that job: a
bounded mailbox, so a slow consumer only loses messages it would have skipped anyway and
re-reads the record instead (``STALE``). No update is lost: a waiter reads the record once
its subscription is confirmed, again whenever the hub had to reconnect (Redis re-confirms
each channel), and every few seconds anyway (jittered, ``REREAD_INTERVAL``). The asyncio
hub also batches these reads into MGETs, one at a time, so a process with thousands of
waiters holds two connections for them. Pub/sub messages are RESP2 (the hub's connection
always speaks RESP2). ``status`` owns the stores and the event-stream logic; this module
only moves messages.
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
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.retry import Retry

from .jobs import JobStatus

if TYPE_CHECKING:
    from .status import AsyncStatusStore, StatusStore

__all__ = [
    "REREAD_INTERVAL",
    "SUBSCRIBE_TIMEOUT",
    "STALE",
    "Waiter",
    "HubState",
    "EventHub",
    "AsyncEventHub",
    "reread_interval",
]

log = logging.getLogger("ben2q.status")

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


def backoff() -> EqualJitterBackoff:
    """Between retries of a store's command on ConnectionError/TimeoutError, and between
    the hub's reconnects: 0.1 s doubling to 2 s, jittered; the stores' default 10 retries
    wait about 10 s in all, enough for a Redis restart."""
    return EqualJitterBackoff(cap=2.0, base=0.1)


def decode(raw: bytes | str) -> JobStatus:
    """A record from its stored (and published) JSON; ``status.encode`` is the inverse."""
    return JobStatus.model_validate_json(raw)


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
                self._stop.wait(backoff().compute(failures))
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
                await asyncio.sleep(backoff().compute(failures))

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
