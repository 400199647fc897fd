"""Prometheus metrics for a fleet of workers, aggregated in Redis.

Workers are many processes on many machines (prefork children that come and go), so
per-process ``prometheus_client`` registries would not add up. Instead every worker
*records* into Redis (``MetricsRecorder.record_job``: one pipelined ``MULTI``/``EXEC`` of
``HINCRBY``/``HINCRBYFLOAT`` per finished job, the job's items aggregated locally first, so
no per-item round trip), and one small *exporter* process (``serve_exporter``, the
``ben2q exporter`` command, ``python -m ben2q.metrics``) reads Redis at each scrape and
serves the Prometheus text format through a custom collector (``MetricsCollector``).

Metrics (units in the names)::

    ben2q_jobs_total{kind,state}        counter  finished jobs: kind single|batch, state
                                                  succeeded|partial|failed|cancelled
    ben2q_items_total{state,code}       counter  items of finished jobs: state succeeded|
                                                  failed|cancelled|pending, code the error
                                                  code of a failed item ("" otherwise)
    ben2q_item_seconds                  histogram an item's time from download start to
                                                  upload end (failed items: until the failure);
                                                  buckets 0.05 .. 120 s
    ben2q_batch_size                    histogram images in the forward pass that ran an
                                                  item; buckets 1, 2, 4, 8, 16, 32
    ben2q_queue_wait_seconds            histogram a job's time queued before its first
                                                  start; buckets 0.005 .. 600 s
    ben2q_worker_jobs_total{worker}     counter  finished jobs per worker (hostname)
    ben2q_queue_length{queue}           gauge    messages waiting in the broker's queue
                                                  (all priority lists of the Celery Redis
                                                  transport), read at scrape time
    ben2q_broker_unacked_messages       gauge    messages delivered to workers and not yet
                                                  acknowledged (prefetched or running; the
                                                  transport's ``unacked`` hashes: job
                                                  workers' and webhook workers')
    ben2q_up                            gauge    1 if the scrape could read Redis, else 0
                                                  (then no other ben2q_* series are served)

Redis layout (prefix ``ben2q:metrics`` by default, in the status store's database)::

    {prefix}:jobs_total                 hash  field '["single","succeeded"]' -> count
    {prefix}:items_total                hash  field '["failed","invalid_image"]' -> count
    {prefix}:worker_jobs_total          hash  field '["celery@gpu-1"]' -> count
    {prefix}:hist:item_seconds          hash  field 'le=0.25' -> observations in the bucket
    {prefix}:hist:batch_size                  (non-cumulative: the smallest bound >= value,
    {prefix}:hist:queue_wait_seconds          'le=+Inf' above the last), 'sum', 'count'

Label fields are JSON arrays of the label values, so any worker name or error code is safe.
Histogram buckets are stored per bucket and made cumulative by the exporter (a bucket counts
every stored field whose bound is <= its own), so changing the bucket bounds later keeps
old observations meaningful.

The keys never expire: they are counters, and Prometheus computes rates from their
increase (a reset, e.g. ``FLUSHDB``, is handled as a counter reset). They stay small (one
field per label combination or bucket). Delete them to start over.

Recording never raises into a job: Redis errors (and any bug here) are logged and the
job's figures dropped. Socket timeouts are short (1 s), a command is retried once, and
after a failure the recorder drops figures without trying Redis for ``retry_after``
seconds, so a metrics outage costs a job at most about 2 s once per ``retry_after``.
A redelivered job that finishes again would be counted again; ``JobRunner.begin`` skips
jobs already ended, so in practice each job is recorded once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from .broker import UNACKED, webhook_unacked_key
from .jobs import JobStatus

__all__ = [
    "DEFAULT_PORT",
    "PREFIX",
    "HISTOGRAMS",
    "Histogram",
    "MetricsRecorder",
    "MetricsCollector",
    "Exporter",
    "make_exporter",
    "serve_exporter",
    "queue_lists",
    "main",
]

log = logging.getLogger(__name__)

PREFIX = "ben2q:metrics"
DEFAULT_PORT = 9808
WEBHOOK_QUEUE = "ben2q-webhooks"

KOMBU_PRIORITY_SEP = "\x06\x16"
"""kombu's Redis transport keeps priority ``p > 0`` messages in ``queue + sep + str(p)``."""
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)


class Histogram:
    """A histogram's name, help and bucket bounds (the ``+Inf`` bucket is implicit)."""

    def __init__(self, name: str, doc: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = tuple(sorted(float(b) for b in bounds))

    def field(self, value: float) -> str:
        """The Redis hash field of the bucket that ``value`` falls in (bounds inclusive)."""
        i = bisect_left(self.bounds, value)
        return "le=+Inf" if i == len(self.bounds) else "le=" + floatToGoString(self.bounds[i])


ITEM_SECONDS = Histogram(
    "ben2q_item_seconds",
    "Time of an item from download start to upload end (or failure), seconds.",
    (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BATCH_SIZE = Histogram(
    "ben2q_batch_size",
    "Images in the forward pass that ran an item.",
    (1, 2, 4, 8, 16, 32),
)
QUEUE_WAIT_SECONDS = Histogram(
    "ben2q_queue_wait_seconds",
    "Time a job waited in the queue before its first start, seconds.",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
HISTOGRAMS = (ITEM_SECONDS, BATCH_SIZE, QUEUE_WAIT_SECONDS)

# counter name -> (hash suffix, help, label names)
_COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ben2q_jobs_total": ("jobs_total", "Finished jobs by kind and final state.", ("kind", "state")),
    "ben2q_items_total": (
        "items_total",
        "Items of finished jobs by state and error code ('' unless failed).",
        ("state", "code"),
    ),
    "ben2q_worker_jobs_total": (
        "worker_jobs_total",
        "Finished jobs by worker.",
        ("worker",),
    ),
}


def _labels(*values: str) -> str:
    return json.dumps(list(values), separators=(",", ":"))


def _hist_key(prefix: str, hist: Histogram) -> str:
    return f"{prefix}:hist:{hist.name.removeprefix('ben2q_')}"


def _redis_client(url: str, *, timeout: float, retries: int) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(EqualJitterBackoff(cap=0.2, base=0.05), retries),
    )


class _Tally:
    """A job's (or several jobs') figures, added up before one pipeline writes them."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter[str]] = {
            suffix: Counter() for suffix, *_ in _COUNTERS.values()
        }
        self.buckets: dict[Histogram, Counter[str]] = {h: Counter() for h in HISTOGRAMS}
        self.sums: dict[Histogram, float] = {h: 0.0 for h in HISTOGRAMS}

    def observe(self, hist: Histogram, value: float) -> None:
        if not math.isfinite(value):
            return
        self.buckets[hist][hist.field(value)] += 1
        self.sums[hist] += value

    def add(self, status: JobStatus, worker: str, *, chunk: bool = False) -> None:
        """Count a finished job, or (``chunk``) the items of a fanned-out job's chunk. A job
        known by its summary (items kept apart) is counted without them: its chunks count
        those."""
        if chunk:
            self._items(status)
            return
        self.counters["jobs_total"][_labels(status.kind, status.state)] += 1
        self.counters["worker_jobs_total"][_labels(worker or status.worker or "unknown")] += 1
        if status.whole:  # a summary's items are counted by the chunks that ran them
            self._items(status)
        if status.queue_wait_ms is not None:
            self.observe(QUEUE_WAIT_SECONDS, max(0.0, status.queue_wait_ms) / 1000)

    def _items(self, status: JobStatus) -> None:
        for item in status.items:
            code = item.error.code if item.error is not None and item.state == "failed" else ""
            self.counters["items_total"][_labels(item.state, code)] += 1
            if item.duration_ms is not None:
                self.observe(ITEM_SECONDS, item.duration_ms / 1000)
            if item.batch_size is not None:
                self.observe(BATCH_SIZE, item.batch_size)

    def write(self, pipe: Any, prefix: str) -> None:
        for suffix, counts in self.counters.items():
            for field, n in counts.items():
                pipe.hincrby(f"{prefix}:{suffix}", field, n)
        for hist, counts in self.buckets.items():
            if not counts:
                continue
            key = _hist_key(prefix, hist)
            for field, n in counts.items():
                pipe.hincrby(key, field, n)
            pipe.hincrby(key, "count", sum(counts.values()))
            pipe.hincrbyfloat(key, "sum", self.sums[hist])


class MetricsRecorder:
    """Records finished jobs into Redis; one per worker process, safe across threads.

    ``record_job`` never raises (see the module docstring): a metrics outage must not fail
    jobs. After a failure, figures are dropped without contacting Redis for
    ``retry_after`` seconds.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = PREFIX,
        timeout: float = 1.0,
        retry_after: float = 30.0,
    ) -> None:
        self.prefix = prefix
        self.retry_after = retry_after
        self.redis = _redis_client(redis_url, timeout=timeout, retries=1)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._dropped = 0

    def record_job(self, status: JobStatus, *, worker: str) -> None:
        """Count one finished job and its items (one Redis round trip)."""
        self.record_jobs([status], worker=worker)

    def record_chunk(self, status: JobStatus, *, worker: str) -> None:
        """Count the items of a fanned-out job's chunk (``status.items``: the chunk's)."""
        self.record_jobs([status], worker=worker, chunk=True)

    def record_jobs(
        self, statuses: Iterable[JobStatus], *, worker: str, chunk: bool = False
    ) -> None:
        """Count several finished jobs (a cross-job batch) in one round trip."""
        try:
            statuses = list(statuses)
            if not statuses:
                return
            with self._lock:
                if time.monotonic() < self._down_until:
                    self._dropped += len(statuses)
                    return
            tally = _Tally()
            for status in statuses:
                tally.add(status, worker, chunk=chunk)
            with self.redis.pipeline(transaction=True) as pipe:
                tally.write(pipe, self.prefix)
                pipe.execute()
        except redis.RedisError as exc:
            self._failed(len(statuses), exc)
            return
        except Exception:  # a bug here must not fail the job either
            log.exception("metrics: could not record jobs")
            return
        with self._lock:
            if self._dropped:
                log.warning("metrics: recording again; dropped %d job(s) meanwhile", self._dropped)
                self._dropped = 0

    def _failed(self, n: int, exc: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after
            self._dropped += n
        log.warning(
            "metrics: Redis unavailable (%s: %s); dropping job metrics for %.0f s",
            type(exc).__name__,
            exc,
            self.retry_after,
        )

    def close(self) -> None:
        try:
            self.redis.close()
        except Exception:  # closing must not raise either
            log.debug("metrics: error closing the Redis client", exc_info=True)

    def __enter__(self) -> MetricsRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def queue_lists(queue: str) -> list[str]:
    """The Redis lists of a queue in kombu's Redis transport (one per priority step)."""
    return [queue if p == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS]


def _decode(raw: dict[bytes, bytes]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in raw.items():
        try:
            out[k.decode()] = float(v)
        except (UnicodeDecodeError, ValueError):
            continue
    return out


class MetricsCollector(Collector):
    """Reads the recorded figures (and queue lengths) from Redis at every scrape.

    ``queues``: broker queue names whose length to report; ``broker_url``: where they live
    (default: ``redis_url``); ``unacked_keys``: the hashes of held messages (job workers'
    and webhook workers', ``ben2q.broker.unacked_key``), summed.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = PREFIX,
        queues: Sequence[str] = (),
        broker_url: str | None = None,
        unacked_keys: Sequence[str] = (UNACKED, webhook_unacked_key(WEBHOOK_QUEUE)),
        timeout: float = 2.0,
    ) -> None:
        self.prefix = prefix
        self.queues = tuple(queues)
        self.unacked_keys = tuple(unacked_keys)
        self.redis = _redis_client(redis_url, timeout=timeout, retries=1)
        same = broker_url is None or broker_url == redis_url
        self.broker = self.redis if same else _redis_client(broker_url, timeout=timeout, retries=1)

    def _read(self) -> tuple[dict[str, dict[str, float]], dict[str, int], int | None]:
        hashes = [f"{self.prefix}:{suffix}" for suffix, *_ in _COUNTERS.values()]
        hashes += [_hist_key(self.prefix, h) for h in HISTOGRAMS]
        with self.redis.pipeline(transaction=False) as pipe:
            for key in hashes:
                pipe.hgetall(key)
            values = pipe.execute()
        data = {key: _decode(raw) for key, raw in zip(hashes, values, strict=True)}
        lengths: dict[str, int] = {}
        unacked = None
        if self.queues:
            with self.broker.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    for name in queue_lists(queue):
                        pipe.llen(name)
                for key in self.unacked_keys:
                    pipe.hlen(key)
                sizes = pipe.execute()
            steps = len(KOMBU_PRIORITY_STEPS)
            for i, queue in enumerate(self.queues):
                lengths[queue] = sum(int(s) for s in sizes[i * steps : (i + 1) * steps])
            unacked = sum(int(s) for s in sizes[len(sizes) - len(self.unacked_keys) :])
        return data, lengths, unacked

    def collect(self) -> Iterator[Metric]:
        try:
            data, lengths, unacked = self._read()
        except redis.RedisError as exc:
            log.warning("metrics: cannot read Redis: %s: %s", type(exc).__name__, exc)
            yield GaugeMetricFamily("ben2q_up", "1 if the exporter could read Redis.", value=0)
            return
        yield GaugeMetricFamily("ben2q_up", "1 if the exporter could read Redis.", value=1)
        for name, (suffix, doc, labels) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=list(labels))
            for field, value in sorted(data[f"{self.prefix}:{suffix}"].items()):
                try:
                    values = json.loads(field)
                except ValueError:
                    continue
                if isinstance(values, list) and len(values) == len(labels):
                    family.add_metric([str(v) for v in values], value)
            yield family
        for hist in HISTOGRAMS:
            yield self._histogram(hist, data[_hist_key(self.prefix, hist)])
        if self.queues:
            family = GaugeMetricFamily(
                "ben2q_queue_length", "Messages waiting in the broker queue.", labels=["queue"]
            )
            for queue, n in lengths.items():
                family.add_metric([queue], n)
            yield family
            yield GaugeMetricFamily(
                "ben2q_broker_unacked_messages",
                "Messages delivered to workers and not yet acknowledged.",
                value=unacked or 0,
            )

    @staticmethod
    def _histogram(hist: Histogram, fields: dict[str, float]) -> HistogramMetricFamily:
        count = fields.get("count", 0.0)
        stored: list[tuple[float, float]] = []
        for field, n in fields.items():
            if field.startswith("le="):
                try:
                    stored.append((float(field[3:]), n))
                except ValueError:
                    continue
        buckets = [(floatToGoString(b), sum(n for le, n in stored if le <= b)) for b in hist.bounds]
        total = max(count, sum(n for _, n in stored))
        buckets.append(("+Inf", total))
        return HistogramMetricFamily(
            hist.name, hist.doc, buckets=buckets, sum_value=fields.get("sum", 0.0)
        )


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("exporter: " + format, *args)


class Exporter:
    """The exporter's HTTP server (``/metrics``, any path works); ``serve_forever`` blocks."""

    def __init__(self, server: WSGIServer, collector: MetricsCollector) -> None:
        self.server = server
        self.collector = collector

    @property
    def port(self) -> int:
        return self.server.server_port

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.server.serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread) and close the socket."""
        self.server.shutdown()
        self.server.server_close()


def make_exporter(
    redis_url: str,
    *,
    port: int,
    addr: str = "0.0.0.0",
    queues: Sequence[str] = (),
    broker_url: str | None = None,
    prefix: str = PREFIX,
) -> Exporter:
    """Bind the exporter's HTTP server (``port=0``: any free port) without serving yet."""
    registry = CollectorRegistry(auto_describe=False)
    collector = MetricsCollector(redis_url, prefix=prefix, queues=queues, broker_url=broker_url)
    registry.register(collector)
    server = make_server(
        addr,
        port,
        make_wsgi_app(registry),
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    return Exporter(server, collector)


def serve_exporter(
    redis_url: str,
    *,
    port: int,
    addr: str = "0.0.0.0",
    queues: Sequence[str] | None = None,
    broker_url: str | None = None,
    prefix: str = PREFIX,
) -> None:
    """Serve the metrics until interrupted (blocking).

    ``queues`` default to the image and batch-chunk queues (``Settings().queue``,
    ``Settings().batch_queue``) and ``ben2q-webhooks``;
    their lengths are read from ``broker_url`` (default ``redis_url``).
    """
    if queues is None:
        from .config import Settings

        settings = Settings()
        queues = (settings.queue, settings.batch_queue, WEBHOOK_QUEUE)
    exporter = make_exporter(
        redis_url, port=port, addr=addr, queues=queues, broker_url=broker_url, prefix=prefix
    )
    log.info("ben2q exporter serving http://%s:%d/metrics", addr, exporter.port)
    try:
        exporter.serve_forever()
    finally:
        exporter.server.server_close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ben2q exporter",
        description="Serve ben2q's Prometheus metrics (recorded in Redis by the workers).",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s")
    parser.add_argument("--addr", default="0.0.0.0", help="default %(default)s")
    parser.add_argument(
        "--broker",
        default=None,
        help="Redis URL holding the metrics (default: BEN2Q_RESULT_BACKEND or BEN2Q_BROKER_URL)",
    )
    parser.add_argument(
        "--queue-broker",
        default=None,
        help="Redis URL of the Celery broker for queue lengths "
        "(default: --broker if given, else BEN2Q_BROKER_URL)",
    )
    parser.add_argument(
        "--queues",
        nargs="+",
        default=None,
        metavar="QUEUE",
        help=f"queues to report (default: BEN2Q_QUEUE, BEN2Q_BATCH_QUEUE and {WEBHOOK_QUEUE}); "
        "also comma-separated",
    )
    parser.add_argument("--prefix", default=PREFIX, help="Redis key prefix (default %(default)s)")
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ben2q exporter``: 0 after an interrupt, 2 if the address cannot be bound."""
    from .config import Settings
    from .logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(fmt=args.log_format, level=args.log_level)
    settings = Settings()
    redis_url = args.broker or settings.status_url
    broker_url = args.queue_broker or args.broker or settings.broker_url
    if args.queues is None:
        queues = [settings.queue, settings.batch_queue, WEBHOOK_QUEUE]
    else:
        queues = [q for arg in args.queues for q in arg.split(",") if q]
    try:
        serve_exporter(
            redis_url,
            port=args.port,
            addr=args.addr,
            queues=queues,
            broker_url=broker_url,
            prefix=args.prefix,
        )
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", args.addr, args.port, exc)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
