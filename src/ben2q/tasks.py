"""The Celery tasks: what a delivered job message makes a worker do.

``ben2q.remove`` (one image) is a celery-batches task: pending single-image jobs on a worker
are handed over together and share forward passes. A job that reaches an idle worker runs
at once (or waits up to ``BEN2Q_BATCH_WINDOW_MS`` for companions, if set); while the model
is busy, arriving jobs collect and run together as soon as it is free (up to
``2 × BEN2Q_MAX_BATCH`` prefetched). ``BatchedJobTask`` extends celery-batches
with what plain Celery tasks have and it lacks: soft and hard time limits for the flushed
batch, and requeue of the batch's messages when the worker child dies.

``ben2q.batch`` (a batch job) is a plain task with the same policy. A batch job of more
than ``BEN2Q_BATCH_CHUNK`` inputs fans out: the task records it running and puts one
``ben2q.chunk`` message per chunk on the queue (each marked sent in Redis, so a redelivered
batch message sends only what is missing), and every worker takes chunks. Chunks merge
their items into the job's record atomically; the one that writes the last item ends the
job and sends its final webhook. A redelivered or retried chunk skips the items already
recorded done (their outputs sit at deterministic keys).

Every delivered request is checked again before any work (``ben2q.admission``): a message
that skipped the client (the broker is a trust boundary) and breaks its rules or limits
fails its job with ``invalid_request`` (or ``forbidden`` outside a key's scope) and costs
nothing else.

Retries: only transient storage errors are retried, with Celery's exponential backoff with
jitter, by re-sending the job under the same id; items already done are not redone. Bad
images, missing inputs and refused URLs fail their item at once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Collection
from queue import Queue
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery.exceptions import Reject
from celery.utils.time import get_exponential_backoff_interval
from celery.worker import state as worker_state
from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from pydantic import ValidationError

from .admission import batch_limit, check_request, refuse
from .broker import TASK_BATCH, TASK_CHUNK, TASK_REMOVE, TASK_WEBHOOK
from .config import Settings
from .errors import BEN2QError, DeviceUnavailable, JobTimeout, StorageError
from .jobs import ErrorInfo, JobKind, JobRequest, JobStatus, WebhookAttempt
from .keys import KeyStore
from .listing import list_images
from .runner import JobRun, run_chunk, run_jobs
from .worker import app, guard, leave_service, notify, state, webhook_time_limits

log = logging.getLogger(__name__)
settings: Settings = app.conf.ben2q_settings
TIMEOUTS = (JobTimeout, SoftTimeLimitExceeded)
FLUSH_TICK_MS = 10.0


def _parse(kwargs: dict[str, Any]) -> JobRequest | None:
    try:
        return JobRequest.model_validate(kwargs.get("request"))
    except ValidationError as exc:  # not ours or corrupted: nothing to record it on
        log.error("dropping a malformed job message: %s", exc)
        return None


def _admit(request: JobRequest | None, kind: JobKind) -> JobRequest | None:
    """``request`` if it passes the worker's re-check; else its job fails (recorded where
    that touches no record it does not own) and ``None``."""
    if request is None:
        return None
    store = state.store()
    try:
        key = None
        if request.tenant is not None:
            key = KeyStore.on(store.redis).get(request.tenant)
        return check_request(request, settings, expected_kind=kind, key=key)
    except BEN2QError as exc:
        refuse(store, request, exc, max_items=settings.max_batch_items, worker=state.hostname)
        return None


def _max_items(request: JobRequest) -> int:
    """The batch limit of ``request``: the worker's, or its key's if lower."""
    key = KeyStore.on(state.store().redis).get(request.tenant) if request.tenant else None
    return batch_limit(settings, key)


def _listed(request: JobRequest) -> JobRequest | None:
    """A prefix job with its inputs: the images under its prefix, listed once and recorded
    in its record (a redelivered job reads them back instead of listing again). ``None``
    when it must not run now: ended, cancelled, its listing failed (permanently: the job
    fails with the error's code; transiently: it is re-sent with backoff)."""
    store = state.store()
    status = store.get(request.id, items=False)
    if status is None:  # a message whose record is gone or was never made: make it
        try:
            store.create(JobStatus.queued(request))
        except ValueError:
            pass  # made meanwhile
        status = store.get(request.id, items=False)
    if status is None or status.done:
        return None
    if not (status.counts and status.counts.total):
        assert request.prefix is not None
        local_root = None if settings.local_root is None else str(settings.local_root)
        try:
            inputs = list_images(
                state.runner().storage,
                request.prefix,
                output=request.output,
                limit=_max_items(request),
                local_root=local_root,
            )
        except BEN2QError as exc:
            run = state.runner().begin(request, items=False)
            if run is None:
                return None
            if isinstance(exc, StorageError) or getattr(exc, "transient", False):
                run.transient.append(exc)
                countdown = _retry(run)
                if countdown is not None:
                    state.runner().prepare_retry(run, countdown)
                    return None
            state.runner().fail_all(run, exc)
            return None
        status = store.record_listing(request.id, inputs)
        if status is None or status.done:
            return None
    assert status.counts is not None
    items = store.get_items(request.id, 0, status.counts.total, summary=status) or []
    return request.model_copy(update={"inputs": [item.input for item in items], "prefix": None})


def _retry(run: JobRun) -> float | None:
    """Re-send a job after transient errors; None when its attempts are spent."""
    attempt = run.attempt
    if attempt >= settings.job_max_attempts:
        return None
    countdown = get_exponential_backoff_interval(
        factor=1, retries=attempt, maximum=settings.retry_backoff_max, full_jitter=True
    )
    countdown = max(countdown, 0.5)
    if run.chunk:
        start = run.offset or 0
        nonce = state.store().chunk_owner(run.request.id, start)
        _send_chunk(run.request, start, countdown=countdown, nonce=nonce)
        log.info(
            "job %s chunk %d: transient error, retry %d in %.1f s",
            run.request.id,
            run.offset,
            attempt,
            countdown,
        )
        return countdown
    name = TASK_REMOVE if run.request.kind == "single" else TASK_BATCH
    app.send_task(
        name,
        kwargs={"request": run.request.model_dump(mode="json")},
        task_id=run.request.id,
        countdown=countdown,
        queue=settings.queue,
    )
    log.info("job %s: transient error, retry %d in %.1f s", run.request.id, attempt, countdown)
    return countdown


class _ReceivedQueue(Queue):
    """The batch buffer; announces each buffered job to monitors (Flower) as received."""

    def put(self, req: Any, block: bool = True, timeout: float | None = None) -> None:
        req.send_event(
            "task-received",
            name=req.name,
            args=req.argsrepr,
            kwargs=req.kwargsrepr,
            root_id=req.root_id,
            parent_id=req.parent_id,
            retries=req.request_dict.get("retries", 0),
        )
        super().put(req, block, timeout)


class BatchedJobTask(Batches):
    """celery-batches with time limits, requeue on a lost child, busy-aware flushing and the
    per-job task events that plain tasks send (so Flower shows every job)."""

    _inflight = 0
    _inflight_lock = threading.Lock()
    _marked = 0.0
    """When this worker last marked buffered jobs in Redis (0: not marked)."""
    _pending = 0
    """Batches of single jobs handed to the pool and not yet started (behind chunks)."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _ReceivedQueue()

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:
        handle = super().Strategy(task, app, consumer)
        if settings.batch_window_ms > 0:
            return handle  # a lone job waits for companions until the timer fires

        def handle_now(*args: Any, **kwargs: Any) -> None:
            handle(*args, **kwargs)
            self._do_flush()  # idle: run it now; busy: it joins the next batch

        return handle_now

    def _do_flush(self) -> None:
        # While a batch of single jobs (or a batch job) runs, keep collecting (up to a full
        # batch) instead of queueing small batches behind it; when idle, flush at once.
        # Chunks of fanned-out batch jobs do not hold single jobs back: those are handed to
        # the pool at once, and until they start, chunks about to start step aside
        # (``chunk``, through the mark in Redis), so they run right after the current one.
        active = list(worker_state.active_requests)
        chunks = any(getattr(r, "name", None) == TASK_CHUNK for r in active)
        busy = self._inflight or any(getattr(r, "name", None) != TASK_CHUNK for r in active)
        waiting = self._buffer.qsize() or self._pending
        now = time.monotonic()
        if waiting and (busy or chunks) and now - self._marked > 5.0:  # the mark lives 10 s
            state.mark_jobs_buffered(True)
            self._marked = now
        elif not waiting and self._marked:
            state.mark_jobs_buffered(False)
            self._marked = 0.0
        if busy and self._buffer.qsize() < self.flush_every:
            return
        super()._do_flush()

    def _done(self) -> None:
        with self._inflight_lock:
            BatchedJobTask._inflight -= 1
        if self._buffer.qsize():
            self._do_flush()  # what collected while the model was busy runs next, now

    def flush(self, requests: Collection[Any]) -> Any:
        requests = list(requests)
        n = len(requests)
        simple = ([SimpleRequest.from_request(r) for r in requests],)
        with self._inflight_lock:
            BatchedJobTask._inflight += 1
            BatchedJobTask._pending += 1
        started = time.monotonic()
        accepted = threading.Event()

        def started_now() -> None:
            if not accepted.is_set():
                accepted.set()
                with self._inflight_lock:
                    BatchedJobTask._pending -= 1
                    idle = not BatchedJobTask._pending and not self._buffer.qsize()
                if idle and self._marked:  # at once: the chunk after this batch must run
                    state.mark_jobs_buffered(False)
                    self._marked = 0.0

        def on_accepted(pid: int, time_accepted: float) -> None:
            started_now()
            for req in requests:
                req.send_event("task-started")

        def on_return(_: Any) -> None:
            started_now()
            self._done()
            guard.job_finished()
            runtime = time.monotonic() - started
            for req in requests:
                req.send_event("task-succeeded", result="null", runtime=runtime)
                req.acknowledge()

        def on_error(einfo: Any) -> None:
            started_now()
            self._done()
            exc = getattr(einfo, "exception", einfo)
            if isinstance(exc, ExceptionWithTraceback):  # billiard's wrapper of the real one
                exc = exc.exc
            for req in requests:
                req.send_event("task-failed", exception=repr(exc), traceback="")
            if isinstance(exc, WorkerLostError):
                log.warning("worker child lost during %d jobs; requeueing them", n)
                for req in requests:
                    req.reject(requeue=True)
                return
            if isinstance(exc, TimeLimitExceeded):
                _fail_timed_out([r.kwargs for r in requests])
            for req in requests:
                req.acknowledge()

        return self._pool.apply_async(
            apply_batches_task,
            (self, simple, 0, None),
            accept_callback=on_accepted,
            callback=on_return,
            error_callback=on_error,
            soft_timeout=settings.job_soft_time_limit * n,
            timeout=settings.job_time_limit * n,
        )


def _send_chunk(
    request: JobRequest, start: int, *, countdown: float | None = None, nonce: str | None = None
) -> None:
    """Put a chunk on the batch queue. ``nonce`` names this copy of the chunk: a retry keeps
    it, a planner re-sending after a crash makes a new one, and only one copy runs."""
    app.send_task(
        TASK_CHUNK,
        kwargs={
            "request": request.model_dump(mode="json"),
            "start": start,
            "nonce": nonce or uuid.uuid4().hex,
        },
        task_id=f"{request.id}-{start}",
        countdown=countdown,
        queue=settings.batch_queue,
        ignore_result=True,
    )


def _fan_out(request: JobRequest, size: int) -> str | None:
    """Record the batch job running and put its chunks on the queue (those not sent yet:
    a redelivered batch message completes an interrupted fan-out, nothing more)."""
    store = state.store()
    sent = store.chunks_sent(request.id)
    if not sent:
        if state.runner().begin(request, items=False) is None:  # ended, cancelled, no attempts
            return None
    else:
        stored = store.get(request.id, items=False)
        if stored is None or stored.done:
            return None
    starts = range(0, len(request.inputs), size)
    for start in starts:
        if start in sent:
            continue
        piece = request.model_copy(update={"inputs": request.inputs[start : start + size]})
        _send_chunk(piece, start)
        store.chunk_sent(request.id, start)
    log.info(
        "job %s: %d items fanned out in %d chunks of %d",
        request.id,
        len(request.inputs),
        len(starts),
        size,
        extra={"job_id": request.id},
    )
    return "fanned_out"


def _fail_timed_out(kwargs_list: list[dict[str, Any]]) -> None:
    """In the parent, after the hard limit killed the child: fail those jobs ``timeout``
    (a chunk: its items, ending the job if they were its last)."""
    store = state.store()
    for kwargs in kwargs_list:
        request = _parse(kwargs)
        status = store.get(request.id, items=False) if request else None
        if status is None or status.done:
            continue
        err = JobTimeout("the job was killed at its hard time limit")
        info = ErrorInfo(**err.to_dict())
        start = kwargs.get("start")
        if isinstance(start, int) and request is not None:
            stop = start + len(request.inputs)
            items = store.get_items(request.id, start, stop, summary=status) or []
            for item in items:
                if item.state != "succeeded":
                    item.state, item.error = "failed", info
            merged, ended = store.merge_items(request.id, items)
            if ended and merged is not None:
                notify(store.shown(merged, final=True), "final")
            continue
        if not status.whole:
            status = store.get(request.id) or status
        for item in status.items:
            if item.state != "succeeded":
                item.state, item.error = "failed", info
        status.error = info
        status.state = "failed"
        status.finished_at = time.time()
        store.save(status)


@app.task(
    base=BatchedJobTask,
    name=TASK_REMOVE,
    bind=True,
    acks_late=True,
    flush_every=settings.max_batch,
    # the timer that ends a lone job's wait; with no wait, a backstop for delayed retries
    flush_interval=(settings.batch_window_ms or FLUSH_TICK_MS) / 1000.0,
)
def remove(self: BatchedJobTask, requests: list[SimpleRequest]) -> int:
    """Single-image jobs, several at a time: one shared, batched pass."""
    parsed = [
        r for r in (_admit(_parse(req.kwargs), "single") for req in requests) if r is not None
    ]
    try:
        run_jobs(state.runner(), parsed, timeouts=TIMEOUTS, on_retry=_retry)
    except DeviceUnavailable as exc:
        leave_service(exc)  # exits this process: the parent requeues the jobs
    return len(parsed)


class BatchJobMessage(Request):
    """A batch job's delivery; records the job as timed out when the hard limit kills it.

    Its time limits are the worker's policy (per input, for at most ``max_batch_items``
    inputs), whatever the message's headers ask for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        body = self.kwargs if isinstance(self.kwargs, dict) else {}
        request = body.get("request")
        inputs = request.get("inputs") if isinstance(request, dict) else None
        n = min(len(inputs), settings.max_batch_items) if isinstance(inputs, list) else 1
        if isinstance(request, dict) and request.get("prefix"):  # lists, then fans out
            n = settings.batch_chunk or settings.max_batch_items
        hard_cap, soft_cap = settings.job_time_limit * n, settings.job_soft_time_limit * n
        hard, soft = self.time_limits
        self.time_limits = (min(hard or hard_cap, hard_cap), min(soft or soft_cap, soft_cap))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            _fail_timed_out([self.kwargs])

    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> None:
        super().on_success(failed__retval__runtime, **kwargs)
        if not failed__retval__runtime[0]:
            guard.job_finished()


@app.task(
    name=TASK_BATCH,
    Request=BatchJobMessage,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def batch(self: Any, request: dict[str, Any]) -> str | None:
    """A batch job: its inputs run in chunks of ``max_batch``, pipelined with I/O."""
    parsed = _admit(_parse({"request": request}), "batch")
    if parsed is not None and parsed.prefix is not None:
        parsed = _listed(parsed)
    if parsed is None:
        return None
    if settings.batch_chunk and len(parsed.inputs) > settings.batch_chunk:
        return _fan_out(parsed, settings.batch_chunk)
    try:
        [status] = run_jobs(state.runner(), [parsed], timeouts=TIMEOUTS, on_retry=_retry)
    except DeviceUnavailable as exc:
        leave_service(exc)  # exits this process: the job is requeued (reject_on_worker_lost)
    return status.state if status else None


MAX_DEFER = 30.0
"""Chunks step aside for single jobs only while this worker ran a chunk in the last
``MAX_DEFER`` seconds: a steady stream of single jobs slows a batch job to one chunk per
worker per ``MAX_DEFER``, but never starves it."""

_last_chunk = time.monotonic()
"""When this pool process last started a chunk (or was made)."""


def _may_yield() -> bool:
    return time.monotonic() - _last_chunk < MAX_DEFER


@app.task(
    name=TASK_CHUNK,
    Request=BatchJobMessage,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def chunk(self: Any, request: dict[str, Any], start: int, nonce: str | None = None) -> str | None:
    """One chunk of a fanned-out batch job: the job's items ``start …``.

    A worker holds up to its prefetch of messages, which may all be chunks while single
    jobs arrive on the job queue it reads first; so a chunk about to start while single
    jobs wait goes back to the batch queue (``Reject(requeue=True)``, before any work or
    attempt is counted), the freed prefetch slot takes a single job, and the chunk runs
    later here or on another worker. It steps aside only while this process ran a chunk
    in the last ``MAX_DEFER`` seconds (no starvation).

    A planner that died between sending a chunk and marking it sent sends it again on
    redelivery, with another ``nonce``: the first copy to start claims the chunk, and any
    other copy is dropped (a redelivery of the same message keeps its nonce and runs)."""
    global _last_chunk
    if state.jobs_waiting() and _may_yield():
        raise Reject("single-image jobs are waiting; the chunk goes back to its queue", True)
    _last_chunk = time.monotonic()
    parsed = _admit(_parse({"request": request}), "batch")
    if parsed is None:
        return None
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        log.error("job %s: a chunk message with start %r; dropped", parsed.id, start)
        return None
    if nonce is not None and not state.store().claim_chunk(parsed.id, start, str(nonce)):
        log.warning("job %s chunk %d: another copy holds it; this one dropped", parsed.id, start)
        return "duplicate"
    try:
        status = run_chunk(state.runner(), parsed, start, timeouts=TIMEOUTS, on_retry=_retry)
    except DeviceUnavailable as exc:
        leave_service(exc)  # exits this process: the chunk is requeued (reject_on_worker_lost)
    return status.state if status else None


@app.task(
    name=TASK_WEBHOOK,
    bind=True,
    acks_late=True,
    ignore_result=True,
    soft_time_limit=webhook_time_limits(settings)[0],
    time_limit=webhook_time_limits(settings)[1],
)
def webhook(
    self: Any,
    job_id: str,
    url: str,
    body: str,
    msg_id: str,
    event: str,
    attempt: int = 1,
    not_before: float = 0.0,
) -> str:
    """One delivery attempt of a signed webhook event; schedules the next one if needed.

    Waits longer than half the visibility timeout hop through several messages, since a
    Redis-transport ETA beyond the visibility timeout would be delivered twice.
    """
    from .webhooks import deliver_once, next_delay

    kwargs = {"job_id": job_id, "url": url, "body": body, "msg_id": msg_id, "event": event}
    now = time.time()
    hop = settings.visibility_timeout / 2
    if not_before > now + 0.5:
        self.apply_async(
            kwargs={**kwargs, "attempt": attempt, "not_before": not_before},
            countdown=min(not_before - now, hop),
            queue=settings.webhook_queue,
        )
        return "waiting"
    secret = settings.webhook_secret
    if secret is None:
        result = WebhookAttempt(
            event=event,
            msg_id=msg_id,
            attempt=attempt,
            at=now,
            outcome="give_up",
            error="no BEN2Q_WEBHOOK_SECRET configured: events are never sent unsigned",
        )
    else:
        outcome = deliver_once(
            url,
            body.encode(),
            msg_id=msg_id,
            secret=secret.get_secret_value(),
            attempt=attempt,
            timeout=settings.webhook_timeout,
            allow_private=settings.allow_private_urls,
        )
        result = WebhookAttempt(event=event, msg_id=msg_id, **dataclasses.asdict(outcome))
    delay = (
        next_delay(attempt, settings.webhook_retry_schedule) if result.outcome == "retry" else None
    )
    if result.outcome == "retry" and delay is None:
        result.outcome = "give_up"
        result.error = f"{result.error or 'failed'}; retry schedule exhausted"

    def record(status: JobStatus) -> None:
        if status.webhook is not None:
            status.webhook.attempts.append(result)
            if result.outcome == "delivered" and not event.endswith("progress"):
                status.webhook.delivered = True

    state.store().update(job_id, record)
    log.info(
        "webhook %s of job %s attempt %d: %s",
        event,
        job_id,
        attempt,
        result.outcome,
        extra={"job_id": job_id, "code": result.status_code},
    )
    if delay is not None:
        self.apply_async(
            kwargs={**kwargs, "attempt": attempt + 1, "not_before": time.time() + delay},
            countdown=min(delay, hop),
            queue=settings.webhook_queue,
        )
    return result.outcome
