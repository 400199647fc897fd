"""The Celery app, built from ``Settings``, and the warm model of each worker process.

``celery -A ben2q.worker worker`` (or ``ben2q worker``) runs it. A worker is one prefork
child per GPU (``worker_concurrency=1``): the child loads BEN2 once when it starts, runs one
warm-up forward, and keeps it for every job; a hard time limit or a crash replaces the child
while the parent keeps the broker connection, heartbeats and Flower events alive.

Delivery guarantees: ``acks_late`` with ``reject_on_worker_lost``: a job is acknowledged
after it finished, and a job whose child died is requeued. With the Redis transport an
unacknowledged job of a worker that vanished entirely comes back after
``BEN2Q_VISIBILITY_TIMEOUT``; it must exceed the longest time a job can stay unacknowledged
(prefetch wait + time limit), or a live worker's job is delivered a second time.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, setup_logging, worker_process_init
from kombu import Queue

from .broker import celery_config
from .config import Settings, get_settings

log = logging.getLogger(__name__)


def worker_config(settings: Settings) -> dict[str, Any]:
    """Worker policy on top of the shared producer/worker configuration."""
    return {
        **celery_config(settings),
        # A plain worker consumes jobs and webhook deliveries; production may split them
        # with --queues.
        "task_queues": [Queue(settings.queue), Queue(settings.webhook_queue)],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_time_limit,
        "worker_concurrency": 1,
        # Enough reserved messages to fill a batch while the previous one runs.
        "worker_prefetch_multiplier": max(2 * settings.max_batch, 1),
        # Loading BEN2 and its warm-up forward happen before the child reports for work.
        "worker_proc_alive_timeout": 900,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def create_app(settings: Settings | None = None) -> Celery:
    """The ben2q Celery app; its tasks live in ``ben2q.tasks``."""
    s = settings or get_settings()
    app = Celery("ben2q", include=["ben2q.tasks"])
    app.conf.update(worker_config(s))
    app.conf.ben2q_settings = s
    return app


app = create_app()


class _ProcessState:
    """The engine, storage and status store of this process, created once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hostname = os.environ.get("BEN2Q_WORKER_NAME", "")
        self._runner = None
        self._store = None

    def runner(self):
        """The process's ``JobRunner`` around the warm engine (built on first use)."""
        with self.lock:
            if self._runner is None:
                from .engine import Engine
                from .metrics import MetricsRecorder
                from .runner import JobRunner
                from .storage import Storage

                settings: Settings = app.conf.ben2q_settings
                engine = Engine.load(settings=settings)
                seconds = engine.warmup()
                log.info(
                    "BEN2 %s ready on %s (%s), warm-up %.2f s",
                    engine.spec.name,
                    engine.device,
                    engine.dtype,
                    seconds,
                )
                self._runner = JobRunner(
                    engine,
                    Storage(settings),
                    self.store(),
                    settings,
                    hostname=self.hostname,
                    notify=notify,
                    metrics=MetricsRecorder(settings.status_url),
                )
            return self._runner

    def store(self):
        """The status store (also used by the parent process for time-limit failures)."""
        if self._store is None:
            from .status import StatusStore

            settings: Settings = app.conf.ben2q_settings
            self._store = StatusStore(settings.status_url, ttl=settings.status_ttl)
        return self._store


state = _ProcessState()


def notify(status: Any, event: str) -> None:
    """Enqueue the signed webhook of a job event (``final`` or ``progress``), if asked for.

    Delivery is its own task on the webhook queue, so a slow receiver never holds the model;
    the message id is fixed per event so every attempt (and a redelivered job's duplicate)
    carries the same ``webhook-id``.
    """
    hook = status.webhook
    if hook is None or event not in hook.events:
        return
    from .broker import TASK_WEBHOOK
    from .webhooks import build_event, event_type_for

    event_type = event_type_for(status, final=event == "final")
    msg_id = f"msg_{status.id}_{event_type}"
    if event == "progress":
        msg_id += f"_{round(status.progress * 1000)}"
    settings: Settings = app.conf.ben2q_settings
    app.send_task(
        TASK_WEBHOOK,
        kwargs={
            "job_id": status.id,
            "url": hook.url,
            "body": build_event(status, event_type=event_type).decode(),
            "msg_id": msg_id,
            "event": event_type,
        },
        queue=settings.webhook_queue,
        ignore_result=True,
    )


@celeryd_init.connect
def _remember_hostname(sender: str | None = None, **_: Any) -> None:
    if sender:
        state.hostname = sender


@setup_logging.connect
def _logging(loglevel: Any = None, **_: Any) -> None:
    """Our handler instead of Celery's: JSON lines (or text) with job ids, secrets redacted."""
    from .logs import configure_logging

    settings: Settings = app.conf.ben2q_settings
    level = loglevel if isinstance(loglevel, str) else logging.getLevelName(loglevel or 20)
    configure_logging(fmt=settings.log_format, level=level, worker=state.hostname or None)


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    # A forked child must not share the parent's Redis connections.
    state._store = None
    if state.hostname:
        from .logs import configure_logging

        settings: Settings = app.conf.ben2q_settings
        configure_logging(
            fmt=settings.log_format,
            level=logging.getLevelName(logging.getLogger().level),
            worker=state.hostname,
        )
    state.runner()
