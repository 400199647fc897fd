"""Producers: submit jobs to the queue, follow them, cancel them.

``Client`` (sync) and ``AsyncClient`` (asyncio) have the same methods over one I/O-free
``BaseClient`` (settings, request building, task choice, record decoding), as httpx does.

Flow of ``submit``/``submit_batch``:

1. the request is validated (``jobs.make_request``) before anything touches Redis: a bad
   field raises ``InvalidRequest`` (a ``ValueError``) whose ``.field`` names it (``input``,
   ``inputs``, ``inputs[3]``, ``output``, ``format``, ``background``, ``crop_margin``...);
2. the job record is created in state ``queued`` (``status.StatusStore.create``), so the
   job exists for ``get``/``wait`` before any worker can see it;
3. the task (``ben2q.remove`` for one input, ``ben2q.batch`` for a batch job) is sent with
   the job id as Celery task id. If sending fails, the record is marked ``failed`` with
   error code ``internal`` and the broker's error is re-raised.

Then ``get`` returns the record (``NotFound`` for unknown or expired ids), ``events``
yields each update until a terminal state, ``wait`` returns the terminal record (builtin
``TimeoutError`` if it takes longer than ``timeout``), and ``cancel`` cancels a queued job
at once or flags a running one (its worker stops at the next item).

A job of more than ``INLINE_ITEMS`` inputs keeps its items apart from its summary
(``JobStatus.items_apart``): its events carry the summary and the items that just changed;
``get``/``wait`` assemble the whole record unless asked for the summary (``items=False``);
``items``/``iter_items`` page through them (a 100,000-item catalogue need not be read at
once).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .broker import TASK_BATCH, TASK_REMOVE, celery_config
from .config import Settings, get_settings
from .errors import NotFound
from .jobs import (
    ErrorInfo,
    ItemStatus,
    JobKind,
    JobRequest,
    JobStatus,
    OutputOptions,
    make_request,
)
from .status import AsyncStatusStore, StatusStore

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Job", "BaseClient", "Client", "AsyncClient"]


PAGE = 1000
"""Items per page of ``items``/``iter_items`` by default (the API's largest page too)."""


@dataclass(frozen=True)
class Job:
    """A submitted job: its id (also the Celery task id), kind and request."""

    id: str
    kind: JobKind
    request: JobRequest

    def __str__(self) -> str:
        return self.id


class BaseClient:
    """What both clients share, without I/O."""

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None):
        settings = settings if settings is not None else get_settings()
        if broker_url is not None:
            # status_url follows the broker unless a result backend is set
            settings = settings.model_copy(update={"broker_url": broker_url})
        self.settings = settings
        self._app: Celery | None = None
        self._app_lock = threading.Lock()

    def _request(
        self,
        kind: JobKind,
        inputs: Sequence[str],
        output: str,
        **options: Any,
    ) -> JobRequest:
        local_root = self.settings.local_root
        for name in ("refine", "format", "mask"):  # unset: the default, or ``options``'s
            if name in options and options[name] is None:
                del options[name]
        return make_request(
            kind,
            inputs,
            output,
            **options,
            max_items=self.settings.max_batch_items,
            local_root=None if local_root is None else str(local_root),
        )

    @staticmethod
    def task_name(request: JobRequest) -> str:
        return TASK_REMOVE if request.kind == "single" else TASK_BATCH

    def _send_args(self, request: JobRequest) -> dict[str, Any]:
        """Arguments of ``Celery.send_task`` for ``request``."""
        return {
            "name": self.task_name(request),
            "kwargs": {"request": request.model_dump(mode="json")},
            "task_id": request.id,
            "queue": self.settings.queue,
            # send_task ignores task_ignore_result: without this the Redis result backend
            # would subscribe to a result channel per sent task.
            "ignore_result": True,
            # Time limits grow with the number of images in the job.
            "soft_time_limit": self.settings.job_soft_time_limit * len(request.inputs),
            "time_limit": self.settings.job_time_limit * len(request.inputs),
        }

    def _celery(self) -> Celery:
        """The producer-only Celery app (built on first use; building does no I/O)."""
        with self._app_lock:
            if self._app is None:
                from celery import Celery

                app = Celery("ben2q-client", set_as_current=False)
                app.conf.update(celery_config(self.settings))
                self._app = app
            return self._app

    def _close_celery(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None

    @staticmethod
    def _job_id(job: str | Job) -> str:
        return job.id if isinstance(job, Job) else job

    @staticmethod
    def _found(status: JobStatus | None, job_id: str) -> JobStatus:
        if status is None:
            raise NotFound(f"no job {job_id!r} (unknown or expired)")
        return status

    @staticmethod
    def _found_items(items: list[ItemStatus] | None, job_id: str) -> list[ItemStatus]:
        if items is None:
            raise NotFound(f"no job {job_id!r} (unknown or expired)")
        return items

    @staticmethod
    def _reread(last: JobStatus, items: bool | int) -> bool:
        """Whether ``wait`` must read the record again for the items asked for (the last
        event of a job that keeps items apart is a summary)."""
        return last.items_apart and items is not False

    @staticmethod
    def _send_failed(status: JobStatus, exc: BaseException) -> JobStatus:
        """The record of a job whose task could not be sent."""
        error = ErrorInfo(code="internal", message=f"could not enqueue the job: {exc}")
        new = status.model_copy(deep=True)
        new.state = "failed"
        new.error = error
        new.finished_at = time.time()
        for item in new.items:
            item.state = "failed"
            item.error = error
        return new

    @staticmethod
    def _job(request: JobRequest) -> Job:
        return Job(id=request.id, kind=request.kind, request=request)


class Client(BaseClient):
    """Synchronous producer client; ``with Client() as c: c.wait(c.submit(...))``."""

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None):
        super().__init__(broker_url, settings=settings)
        self.store = StatusStore(self.settings.status_url, ttl=self.settings.status_ttl)

    def submit(
        self,
        input: str,
        output: str,
        *,
        refine: bool | None = None,
        format: str | None = None,
        mask: bool | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] = ("final",),
        options: OutputOptions | None = None,
        **fields: Any,
    ) -> Job:
        """Enqueue one image; its result goes under ``output`` (``s3://`` or ``file://``).

        Output options (``ben2q.jobs.OutputOptions``) come as keywords
        (``background="white", format="jpeg", crop=True, max_side=1000``...) or as one
        ``options`` model; a bad one raises ``InvalidRequest`` naming it."""
        request = self._request(
            "single",
            [input],
            output,
            refine=refine,
            format=format,
            mask=mask,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            options=options,
            **fields,
        )
        return self.enqueue(request)

    def submit_batch(
        self,
        inputs: Sequence[str],
        output: str,
        *,
        refine: bool | None = None,
        format: str | None = None,
        mask: bool | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] = ("final",),
        options: OutputOptions | None = None,
        **fields: Any,
    ) -> Job:
        """Enqueue many images as one job (at most ``settings.max_batch_items``)."""
        request = self._request(
            "batch",
            inputs,
            output,
            refine=refine,
            format=format,
            mask=mask,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            options=options,
            **fields,
        )
        return self.enqueue(request)

    def submit_prefix(
        self,
        prefix: str,
        output: str,
        *,
        refine: bool | None = None,
        format: str | None = None,
        mask: bool | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] = ("final",),
        options: OutputOptions | None = None,
        **fields: Any,
    ) -> Job:
        """Enqueue every image under ``prefix`` (``s3://bucket/photos/``, a ``file://``
        folder) as one batch job: a worker lists them once and they become its items."""
        request = self._request(
            "batch",
            [],
            output,
            prefix=prefix,
            refine=refine,
            format=format,
            mask=mask,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            options=options,
            **fields,
        )
        return self.enqueue(request)

    def enqueue(self, request: JobRequest) -> Job:
        """Create the record of a request built with ``jobs.make_request`` and send it."""
        status = JobStatus.queued(request)
        self.store.create(status)
        try:
            self._celery().send_task(**self._send_args(request))
        except Exception as exc:
            with contextlib.suppress(Exception):  # the broker's error is the one to report
                self.store.save(self._send_failed(status, exc))
            raise
        return self._job(request)

    def get(self, job_id: str | Job, *, items: bool | int = True) -> JobStatus:
        """The job's record; ``NotFound`` if unknown or expired. ``items``: of a job that
        keeps them apart, read all (True), none (False: the summary) or all if at most that
        many."""
        job_id = self._job_id(job_id)
        return self._found(self.store.get(job_id, items=items), job_id)

    def items(self, job_id: str | Job, *, start: int = 0, limit: int = PAGE) -> list[ItemStatus]:
        """Items ``start … start + limit - 1`` of a job (fewer at its end)."""
        job_id = self._job_id(job_id)
        return self._found_items(self.store.get_items(job_id, start, start + limit), job_id)

    def iter_items(self, job_id: str | Job, *, page: int = PAGE) -> Iterator[ItemStatus]:
        """Every item of a job, read ``page`` at a time."""
        start = 0
        while batch := self.items(job_id, start=start, limit=page):
            yield from batch
            start += len(batch)

    def events(self, job_id: str | Job, timeout: float | None = None) -> Iterator[JobStatus]:
        """The record now, then each update until a terminal state.

        All ``events``/``wait`` calls of a client, from any thread, share one Redis
        subscription (``eventhub.EventHub``)."""
        return self.store.events(self._job_id(job_id), timeout=timeout)

    def wait(
        self, job_id: str | Job, timeout: float | None = None, *, items: bool | int = True
    ) -> JobStatus:
        """The terminal record; builtin ``TimeoutError`` after ``timeout`` seconds.
        ``items`` as for ``get`` (an event of a job that keeps items apart is a summary)."""
        last: JobStatus | None = None
        for last in self.events(job_id, timeout=timeout):  # noqa: B007
            pass
        assert last is not None and last.done
        if self._reread(last, items):
            return self.get(last.id, items=items)
        return last

    def cancel(self, job_id: str | Job) -> JobStatus:
        """Cancel a queued job now, or flag a running one; finished jobs are unchanged."""
        return self.store.request_cancel(self._job_id(job_id))

    def close(self) -> None:
        self._close_celery()
        self.store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self.close()


class AsyncClient(BaseClient):
    """Asyncio producer client: ``Client``'s methods, awaited; ``aclose``.

    Records and events use ``redis.asyncio``; Celery has no asyncio producer, so the task
    is sent from a worker thread (``asyncio.to_thread``).
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        settings: Settings | None = None,
        max_connections: int | None = None,
    ):
        """``max_connections`` bounds this client's Redis connections (see
        ``AsyncStatusStore``); by default they grow with concurrent calls."""
        super().__init__(broker_url, settings=settings)
        self.store = AsyncStatusStore(
            self.settings.status_url,
            ttl=self.settings.status_ttl,
            max_connections=max_connections,
        )

    async def submit(
        self,
        input: str,
        output: str,
        *,
        refine: bool | None = None,
        format: str | None = None,
        mask: bool | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] = ("final",),
        options: OutputOptions | None = None,
        **fields: Any,
    ) -> Job:
        request = self._request(
            "single",
            [input],
            output,
            refine=refine,
            format=format,
            mask=mask,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            options=options,
            **fields,
        )
        return await self.enqueue(request)

    async def submit_batch(
        self,
        inputs: Sequence[str],
        output: str,
        *,
        refine: bool | None = None,
        format: str | None = None,
        mask: bool | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] = ("final",),
        options: OutputOptions | None = None,
        **fields: Any,
    ) -> Job:
        request = self._request(
            "batch",
            inputs,
            output,
            refine=refine,
            format=format,
            mask=mask,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            options=options,
            **fields,
        )
        return await self.enqueue(request)

    async def submit_prefix(
        self,
        prefix: str,
        output: str,
        *,
        refine: bool | None = None,
        format: str | None = None,
        mask: bool | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] = ("final",),
        options: OutputOptions | None = None,
        **fields: Any,
    ) -> Job:
        request = self._request(
            "batch",
            [],
            output,
            prefix=prefix,
            refine=refine,
            format=format,
            mask=mask,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            options=options,
            **fields,
        )
        return await self.enqueue(request)

    async def enqueue(self, request: JobRequest) -> Job:
        """Create the record of a request built with ``jobs.make_request`` and send it."""
        status = JobStatus.queued(request)
        await self.store.create(status)
        app = self._celery()
        try:
            await asyncio.to_thread(app.send_task, **self._send_args(request))
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self.store.save(self._send_failed(status, exc))
            raise
        return self._job(request)

    async def get(self, job_id: str | Job, *, items: bool | int = True) -> JobStatus:
        job_id = self._job_id(job_id)
        return self._found(await self.store.get(job_id, items=items), job_id)

    async def items(
        self, job_id: str | Job, *, start: int = 0, limit: int = PAGE
    ) -> list[ItemStatus]:
        job_id = self._job_id(job_id)
        return self._found_items(await self.store.get_items(job_id, start, start + limit), job_id)

    async def iter_items(self, job_id: str | Job, *, page: int = PAGE) -> AsyncIterator[ItemStatus]:
        start = 0
        while batch := await self.items(job_id, start=start, limit=page):
            for item in batch:
                yield item
            start += len(batch)

    def events(self, job_id: str | Job, timeout: float | None = None) -> AsyncIterator[JobStatus]:
        """``async for status in client.events(job):`` until a terminal state."""
        return self.store.events(self._job_id(job_id), timeout=timeout)

    async def wait(
        self, job_id: str | Job, timeout: float | None = None, *, items: bool | int = True
    ) -> JobStatus:
        """The terminal record. Any number of concurrent waits share one subscription and
        batch their reads (``eventhub.AsyncEventHub``): a few connections in all."""
        last: JobStatus | None = None
        async with contextlib.aclosing(
            self.store.events(self._job_id(job_id), timeout=timeout)
        ) as stream:
            async for last in stream:  # noqa: B007
                pass
        assert last is not None and last.done
        if self._reread(last, items):
            return await self.get(last.id, items=items)
        return last

    async def cancel(self, job_id: str | Job) -> JobStatus:
        return await self.store.request_cancel(self._job_id(job_id))

    async def aclose(self) -> None:
        self._close_celery()
        await self.store.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.aclose()
