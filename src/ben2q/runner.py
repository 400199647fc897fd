"""What a job does, without Celery: download, batched inference, upload, status.

``JobRunner`` lives once per worker process next to the warm engine. ``run`` takes the items
of one or several jobs and pipelines them: the inputs of the next chunk download while the
current chunk is in the model, and outputs upload while the next chunk is in the model.
Items of different jobs share forward passes (cross-job batching).

A batch job larger than ``BEN2Q_BATCH_CHUNK`` is fanned out by the task layer into chunks
that any worker takes; ``begin_chunk`` runs one as a ``JobRun`` over the job's items
``offset …`` only, and every save of such a run is a merge into the job's record
(``StatusStore.merge_items``): the merge that writes the last item ends the job, once.

Failures are per item. A permanent failure (bad image, missing input, forbidden URL) fails
that item with its code. A transient one (storage unreachable, a URL answering 5xx or not
connecting) leaves the item pending and
the job ``needs_retry``; the task layer schedules a retry with backoff, and items already
done are not done again (their outputs sit at deterministic keys).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
from PIL import Image

from .config import Settings
from .engine import Engine, Prediction, is_out_of_memory
from .errors import BEN2QError, DeviceUnavailable, ImageTooLarge, JobTimeout, StorageError
from .imageio import decode_image
from .jobs import ErrorInfo, ItemStatus, JobRequest, JobStatus, mask_uri, output_uri
from .metrics import MetricsRecorder
from .png import encode_png
from .render import encode_matte, render
from .status import StatusStore
from .storage import Storage

log = logging.getLogger(__name__)


def public_uri(uri: str) -> str:
    """``uri`` without credentials, query or fragment: what may be stored beside an output
    (a presigned URL's signature, or a token in its query, must not be copied around)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class JobRun:
    """One job inside a run: its request, its live record, and what went wrong in passing."""

    request: JobRequest
    status: JobStatus
    transient: list[BEN2QError] = field(default_factory=list)
    cancelled: bool = False
    offset: int | None = None
    """Set for a chunk of a fanned-out batch job: ``request.inputs`` are the job's items
    ``offset …``, ``status.items`` those items only (with their job-wide ``index``)."""
    attempt: int = 1
    """Deliveries of this job (or of this chunk) so far, this one included."""
    written: dict[int, str] = field(default_factory=dict)
    """Item index -> its JSON as last written, where items are kept apart (a save then
    writes only the items that changed since)."""

    def changed(self) -> list[ItemStatus]:
        """Items that changed since they were last written; noted as written now."""
        changed = []
        for item in self.status.items:
            data = item.model_dump_json()
            if self.written.get(item.index) != data:
                self.written[item.index] = data
                changed.append(item)
        return changed

    @property
    def chunk(self) -> bool:
        return self.offset is not None

    @property
    def needs_retry(self) -> bool:
        return bool(self.transient) and not self.cancelled


@dataclass
class _Item:
    run: JobRun
    index: int
    """Into ``run.request.inputs`` and ``run.status.items`` (a chunk's own numbering)."""
    started: float = 0.0

    @property
    def number(self) -> int:
        """The item's index in its job (what logs and records say)."""
        return self.run.status.items[self.index].index


class Backgrounds:
    """Background images of one run, each fetched and decoded once however many items use
    it (a batch of 1,000 product photos on one backdrop reads the backdrop once)."""

    def __init__(self, storage: Storage, settings: Settings) -> None:
        self.storage, self.settings = storage, settings
        self._lock = threading.Lock()
        self._entries: dict[str, Future] = {}

    def get(self, uri: str) -> Image.Image:
        """The decoded background; its fetch error (message prefixed) if it has none."""
        with self._lock:
            future = self._entries.get(uri)
            owner = future is None
            if owner:
                future = self._entries[uri] = Future()
        if owner:
            try:
                data = self.storage.read(uri)
                future.set_result(decode_image(data, settings=self.settings))
            except BaseException as exc:
                future.set_exception(exc)
                if getattr(exc, "transient", False) or isinstance(exc, StorageError):
                    with self._lock:  # a retry may succeed: do not keep the failure
                        self._entries.pop(uri, None)
        try:
            return future.result()
        except BEN2QError as exc:
            raise _about_background(exc) from exc


def _about_background(exc: BEN2QError) -> BEN2QError:
    """``exc`` (same class and code) with a message saying it was the background."""
    twin = copy.copy(exc)
    twin.message = f"background: {exc.message}"
    twin.args = (twin.message,)
    return twin


class JobRunner:
    """Runs job items on a warm engine; one per worker process."""

    def __init__(
        self,
        engine: Engine,
        storage: Storage,
        store: StatusStore,
        settings: Settings,
        *,
        hostname: str = "",
        notify: Callable[[JobStatus, str], None] | None = None,
        metrics: MetricsRecorder | None = None,
    ) -> None:
        self.engine = engine
        self.notify = notify
        self.metrics = metrics
        self.storage = storage
        self.store = store
        self.settings = settings
        self.hostname = hostname
        self.pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="ben2q-io")

    def warmup(self) -> None:
        """Pay the first-use costs of the I/O path before the first job does: the S3
        client, Pillow's decoder plugins and the PNG encoder's threads."""
        self.storage.warm()
        probe = np.zeros((512, 256, 4), np.uint8)  # 512 KiB: deflated on the encoder's threads
        decode_image(encode_png(probe), settings=self.settings)

    # --- job lifecycle -------------------------------------------------------------------

    def begin(self, request: JobRequest, *, items: bool = True) -> JobRun | None:
        """Mark a delivered job running; ``None`` if it must not run (ended or cancelled).
        ``items=False``: the job is about to be fanned out, its items stay unread (where
        they are kept apart) and unwritten."""
        stored, cancel = self.store.get_and_cancel_requested(request.id, items=items)
        status = stored or JobStatus.queued(request)
        if status.done:
            log.info("job %s already %s; skipping redelivery", request.id, status.state)
            return None
        now = time.time()
        if cancel:
            self._cancel(status, now)
            return None
        status.attempts += 1
        status.state = "running"
        status.error = None  # why it was not running (a retry, a worker lost) is past
        status.worker = self.hostname
        status.started_at = status.started_at or now
        if status.queue_wait_ms is None:
            status.queue_wait_ms = round((now - status.created_at) * 1000, 3)
        if status.attempts > self.settings.job_max_attempts:
            status.error = ErrorInfo(
                code="internal",
                message=f"job was delivered {status.attempts} times without finishing "
                "(its worker died each time)",
            )
            if not status.whole:
                stop = len(request.inputs)
                status.items = self.store.get_items(request.id, 0, stop, summary=status) or []
            for item in status.items:
                if item.state != "succeeded":
                    item.state, item.error = "failed", status.error
            self.finish(JobRun(request, status))
            return None
        self.store.save(status, items=[])  # the items are as they were
        run = JobRun(request, status, attempt=status.attempts)
        run.changed()
        return run

    def begin_chunk(self, request: JobRequest, offset: int) -> JobRun | None:
        """Take the chunk of job ``request.id`` whose first input is the job's item
        ``offset``; ``None`` if it must not run (job ended, cancelled, gone, or a chunk
        that does not match the job's record)."""
        stored, cancel = self.store.get_and_cancel_requested(request.id, items=False)
        if stored is None or stored.done:
            log.info("chunk %s@%d: job %s; skipped", request.id, offset, stored and stored.state)
            return None
        stop = offset + len(request.inputs)
        if stored.items_apart:
            items = self.store.get_items(request.id, offset, stop, summary=stored) or []
        else:
            items = stored.items[max(0, offset) : stop]
        if offset < 0 or [item.input for item in items] != request.inputs:
            log.error("chunk %s@%d does not match its job's record; dropped", request.id, offset)
            return None
        status = stored.model_copy(deep=True, update={"items": items})
        run = JobRun(request, status, offset=offset)
        run.changed()
        if cancel:
            run.cancelled = True
            self.finish(run)
            return None
        run.attempt = self.store.chunk_attempt(request.id, offset)
        if run.attempt > self.settings.job_max_attempts:
            error = ErrorInfo(
                code="internal",
                message=f"chunk of items {offset}-{stop - 1} was delivered {run.attempt} "
                "times without finishing (its worker died each time)",
            )
            for item in status.items:
                if item.state != "succeeded":
                    item.state, item.error = "failed", error
            self.finish(run)
            return None
        return run

    def _merge(self, run: JobRun) -> JobStatus | None:
        """Write a chunk's items that changed into its job's record; the record (a summary
        where items are kept apart), or None if nothing changed (the record holds the chunk
        as it is) or the record is gone. The merge that writes the job's last item ends it
        here, whichever save it is (a pass's uploads may all be done by its checkpoint):
        the final log line, metrics and webhook happen once."""
        changed = run.changed()
        if not changed:
            return None
        merged, ended = self.store.merge_items(run.request.id, changed)
        if ended and merged is not None:
            log.info(
                "job %s %s in %.0f ms (its last chunk ended here)",
                merged.id,
                merged.state,
                merged.run_ms or 0,
                extra={"job_id": merged.id, "state": merged.state},
            )
            self._ended(merged)
        return merged

    def _save(self, run: JobRun) -> None:
        """Save a whole job's record (where items are kept apart: those that changed)."""
        self.store.save(run.status, items=run.changed() if run.status.items_apart else None)

    def finish(self, run: JobRun) -> JobStatus:
        """Settle and save the final state (or leave it for a retry)."""
        status = run.status
        now = time.time()
        if run.chunk:
            if run.cancelled:
                for item in status.items:
                    if item.state in ("pending", "running"):
                        item.state = "cancelled"
            if self.metrics is not None and run.status.items_apart:
                self.metrics.record_chunk(run.status, worker=self.hostname)  # the job: without
            return self._merge(run) or run.status
        if run.cancelled:
            self._cancel(status, now)
            return status
        status.settle()
        status.finished_at = now
        if status.started_at:
            status.run_ms = round((now - status.started_at) * 1000, 3)
        self._save(run)
        log.info(
            "job %s %s in %.0f ms",
            status.id,
            status.state,
            status.run_ms or 0,
            extra={"job_id": status.id, "state": status.state, "duration_ms": status.run_ms},
        )
        self._ended(status)
        return status

    def _ended(self, status: JobStatus) -> None:
        if self.metrics is not None:
            self.metrics.record_job(status, worker=self.hostname)
        self._notify(status, "final")

    def _notify(self, status: JobStatus, event: str) -> None:
        """Enqueue a webhook event. Of a job whose items are kept apart, a progress event
        carries its summary, a final one the whole record up to ``ITEMS_SHOWN`` items."""
        if self.notify is None or status.webhook is None or event not in status.webhook.events:
            return
        try:
            self.notify(self.store.shown(status, final=event == "final"), event)
        except Exception:  # a broker hiccup must not fail a finished job
            log.exception("could not enqueue the %s webhook of job %s", event, status.id)

    def prepare_retry(self, run: JobRun, countdown: float) -> None:
        """Record that the job waits for a retry after transient errors."""
        err = run.transient[-1]
        if run.chunk:  # the job stays running; the chunk's finished items are kept
            self._merge(run)
            return
        run.status.state = "queued"
        run.status.error = ErrorInfo(
            code=err.code, message=f"{err.message}; retrying in {countdown:.1f} s"
        )
        self._save(run)

    def requeue(self, runs: Sequence[JobRun], error: BEN2QError) -> None:
        """Put the records of jobs this worker cannot finish back to ``queued`` (their
        messages are redelivered to another worker); items done stay done."""
        for run in runs:
            status = run.status
            if status.done:
                continue
            for item in status.items:
                if item.state == "running":
                    item.state = "pending"
            if run.chunk:  # its message is redelivered; the job's record stays running
                self._merge(run)
                continue
            status.state = "queued"
            status.worker = None
            status.error = ErrorInfo(
                code=error.code,
                message=f"worker {self.hostname or '?'} left service ({error.message}); "
                "the job goes back to the queue",
            )
            self._save(run)

    def give_up(self, run: JobRun) -> JobStatus:
        """Transient errors past the retry budget become the items' failures."""
        for item in run.status.items:
            if item.state in ("pending", "running"):
                err = run.transient[-1]
                item.state, item.error = "failed", ErrorInfo(**err.to_dict())
        run.transient.clear()
        return self.finish(run)

    def fail_all(self, run: JobRun, error: BEN2QError) -> JobStatus:
        """Fail every unfinished item with ``error`` (time limits, internal errors)."""
        info = ErrorInfo(**error.to_dict())
        for item in run.status.items:
            if item.state != "succeeded":
                item.state, item.error = "failed", info
        run.status.error = info
        return self.finish(run)

    def _cancel(self, status: JobStatus, now: float) -> None:
        if not status.whole and status.counts is not None:  # a summary: its items too
            total = status.counts.total
            status.items = self.store.get_items(status.id, 0, total, summary=status) or []
        status.state = "cancelled"
        status.finished_at = now
        for item in status.items:
            if item.state in ("pending", "running"):
                item.state = "cancelled"
        self.store.save(status)
        self._ended(status)

    # --- the pipeline --------------------------------------------------------------------

    def run(self, runs: Sequence[JobRun], *, deadline: float | None = None) -> None:
        """Process every unfinished item of ``runs`` in shared batches of ``max_batch``."""
        items = [
            _Item(run, i)
            for run in runs
            for i, item in enumerate(run.status.items)
            if item.state != "succeeded"
        ]
        chunks = [items[r.start : r.stop] for r in self.engine.chunks(len(items))]
        self.backgrounds = Backgrounds(self.storage, self.settings)
        uploads: list[tuple[_Item, Future]] = []
        downloads = self._download(chunks[0]) if chunks else []
        for n, chunk in enumerate(chunks):
            images = [f.result() if f is not None else None for f in downloads]
            downloads = self._download(chunks[n + 1]) if n + 1 < len(chunks) else []
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeout("the job ran over its time limit")
            ready = [
                (item, img)
                for item, img in zip(chunk, images, strict=True)
                if img is not None and not item.run.cancelled
            ]
            if ready:
                for item, _ in ready:
                    item.run.status.items[item.index].batch_size = len(ready)
                t0 = time.perf_counter()
                preds = self.engine.predict(
                    [img for _, img in ready],
                    refine=[item.run.request.options.refine for item, _ in ready],
                )
                infer_ms = _ms_since(t0)
                for (item, _), pred in zip(ready, preds, strict=True):
                    item.run.status.items[item.index].infer_ms = infer_ms
                    uploads.append((item, self.pool.submit(self._upload, item, pred)))
            self._collect(uploads, block=False)
            self._checkpoint(runs)
        self._collect(uploads, block=True)
        self._checkpoint(runs, final=True)

    def _download(self, chunk: list[_Item]) -> list[Future | None]:
        futures: list[Future | None] = []
        for item in chunk:
            if item.run.cancelled:
                futures.append(None)
                continue
            item.started = time.perf_counter()
            record = item.run.status.items[item.index]
            record.state, record.worker = "running", self.hostname or None
            futures.append(self.pool.submit(self._fetch, item))
        return futures

    def _fetch(self, item: _Item) -> Image.Image | None:
        uri = item.run.request.inputs[item.index]
        t0 = time.perf_counter()
        try:
            image = decode_image(self.storage.read(uri), settings=self.settings)
            background = item.run.request.options.background_uri
            if background is not None:  # fetched before the forward pass it would waste
                self.backgrounds.get(background)
            item.run.status.items[item.index].fetch_ms = _ms_since(t0)
            return image
        except BEN2QError as exc:
            self._item_error(item, exc)
            return None
        except Exception as exc:  # a decoder or storage bug: fail the item, not the run
            log.exception("input of job %s item %d failed", item.run.request.id, item.number)
            self._item_error(item, BEN2QError(f"{type(exc).__name__}: {exc}"))
            return None

    def _upload(self, item: _Item, pred: Prediction) -> None:
        t0 = time.perf_counter()
        request, record = item.run.request, item.run.status.items[item.index]
        options = request.options
        offset = item.run.offset or 0
        meta = {
            "job-id": request.id,
            "item": str(item.number),
            "source": quote(public_uri(request.inputs[item.index]), safe=":/"),
        }
        background = None
        if options.background_uri is not None:
            background = self.backgrounds.get(options.background_uri)
        out = render(
            pred.rgb,
            pred.alpha,
            options,
            background=background,
            max_pixels=self.settings.max_image_pixels,
        )
        target = output_uri(request, item.index, offset=offset)
        self.storage.write(target, out.data, content_type=out.content_type, metadata=meta)
        mask_target = None
        if options.mask:
            mask_target = mask_uri(request, item.index, offset=offset)
            self.storage.write(
                mask_target, encode_matte(out.alpha), content_type="image/png", metadata=meta
            )
        record.output, record.mask = target, mask_target
        record.width, record.height = out.width, out.height
        record.format, record.bytes = out.encoding, len(out.data)
        record.subject, record.box = out.subject, out.box
        record.state, record.error = "succeeded", None
        record.store_ms = _ms_since(t0)
        record.duration_ms = _ms_since(item.started)

    def _collect(self, uploads: list[tuple[_Item, Future]], *, block: bool) -> None:
        for pair in list(uploads):
            item, fut = pair
            if not block and not fut.done():
                continue
            uploads.remove(pair)
            try:
                fut.result()
            except BEN2QError as exc:
                self._item_error(item, exc)
            except Exception as exc:  # an encoder or storage bug: fail the item, not the worker
                if not fut.done() or fut.exception() is not exc:
                    raise  # the wait itself was interrupted (the soft time limit): not the item's
                log.exception("upload of job %s item %d failed", item.run.request.id, item.number)
                self._item_error(item, BEN2QError(f"{type(exc).__name__}: {exc}"))

    def _item_error(self, item: _Item, exc: BEN2QError) -> None:
        record = item.run.status.items[item.index]
        if isinstance(exc, StorageError) or getattr(exc, "transient", False):
            item.run.transient.append(exc)
            record.state = "pending"
            return
        record.state, record.error = "failed", ErrorInfo(**exc.to_dict())
        record.duration_ms = _ms_since(item.started)
        log.info(
            "job %s item %d failed: %s",
            item.run.request.id,
            item.number,
            exc.code,
            extra={"job_id": item.run.request.id, "item": item.number, "code": exc.code},
        )

    def _checkpoint(self, runs: Sequence[JobRun], *, final: bool = False) -> None:
        """Publish progress and notice cancellations (once per chunk)."""
        for run in runs:
            if run.cancelled:
                continue
            status = run.status
            done = sum(1 for i in status.items if i.state in ("succeeded", "failed"))
            status.progress = round(done / len(status.items), 4) if status.items else 1.0
            if final:
                continue
            if self.store.cancel_requested(status.id):
                run.cancelled = True
                log.info("job %s cancelled while running", status.id)
            elif run.chunk:
                merged = self._merge(run)
                if merged is not None and not merged.done:
                    self._notify(merged, "progress")
            else:
                self._save(run)
                self._notify(status, "progress")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def run_jobs(
    runner: JobRunner,
    requests: Sequence[JobRequest],
    *,
    deadline: float | None = None,
    timeouts: tuple[type[BaseException], ...] = (JobTimeout,),
    on_retry: Callable[[JobRun], float | None] | None = None,
) -> list[JobStatus | None]:
    """Begin, run and finish jobs together; returns their final records (None: skipped).

    Exceptions of ``timeouts`` (the task layer adds Celery's soft time limit) fail the
    unfinished items with ``timeout``; running out of memory fails them with
    ``image_too_large``; anything else with ``internal``; the worker process carries on.
    ``DeviceUnavailable`` (the device failed) is not the jobs' fault: their records go back
    to ``queued`` and it propagates, so the worker leaves service and the jobs are
    redelivered to another one.
    ``on_retry(run)`` schedules a retry and returns its countdown, or ``None`` when the
    retry budget is spent (then the transient errors fail their items).
    """
    runs = [r for r in (runner.begin(req) for req in requests) if r is not None]
    results = run_begun(runner, runs, deadline=deadline, timeouts=timeouts, on_retry=on_retry)
    return [results.get(req.id) for req in requests]


def run_chunk(
    runner: JobRunner,
    request: JobRequest,
    offset: int,
    *,
    deadline: float | None = None,
    timeouts: tuple[type[BaseException], ...] = (JobTimeout,),
    on_retry: Callable[[JobRun], float | None] | None = None,
) -> JobStatus | None:
    """``run_jobs`` for one chunk of a fanned-out batch job (see ``begin_chunk``); returns
    the job's record after the chunk's merge (None: the chunk did not run)."""
    run = runner.begin_chunk(request, offset)
    if run is None:
        return None
    results = run_begun(runner, [run], deadline=deadline, timeouts=timeouts, on_retry=on_retry)
    return results.get(request.id)


def run_begun(
    runner: JobRunner,
    runs: list[JobRun],
    *,
    deadline: float | None = None,
    timeouts: tuple[type[BaseException], ...] = (JobTimeout,),
    on_retry: Callable[[JobRun], float | None] | None = None,
) -> dict[str, JobStatus]:
    """Run begun jobs (or chunks) and finish each; their records by job id."""
    failure: BEN2QError | None = None
    try:
        runner.run(runs, deadline=deadline)
    except DeviceUnavailable as exc:
        runner.requeue(runs, exc)
        raise
    except timeouts as exc:
        failure = JobTimeout(f"over the time limit ({type(exc).__name__})")
    except Exception as exc:
        log.exception("jobs %s failed", [r.request.id for r in runs])
        if is_out_of_memory(exc):
            failure = ImageTooLarge(f"out of memory: {exc}"[:500])
        else:
            failure = BEN2QError(f"{type(exc).__name__}: {exc}"[:500])
    results: dict[str, JobStatus] = {}
    for run in runs:
        if failure is not None and not run.cancelled:
            results[run.request.id] = runner.fail_all(run, failure)
            continue
        if run.needs_retry and on_retry is not None:
            countdown = on_retry(run)
            if countdown is not None:
                runner.prepare_retry(run, countdown)
                results[run.request.id] = run.status
                continue
        results[run.request.id] = runner.give_up(run) if run.transient else runner.finish(run)
    return results
