"""The Celery app, built from ``Settings``, and the warm model of each worker process.

``celery -A ben2q.worker worker`` (or ``ben2q worker``) runs it. A worker is one prefork
child per GPU (``worker_concurrency=1``): the child loads BEN2 once when it starts, runs one
warm-up forward, and keeps it for every job; a hard time limit or a crash replaces the child
while the parent keeps the broker connection, heartbeats and Flower events alive.

Delivery guarantees: ``acks_late`` with ``reject_on_worker_lost``: a job is acknowledged
after it finished, and a job whose child died is requeued. With the Redis transport an
unacknowledged job of a worker that vanished entirely comes back after
``BEN2Q_VISIBILITY_TIMEOUT`` (every worker sweeps for such jobs every
``restore_interval`` seconds). A live worker never lets that happen to the jobs it holds:

- it refuses to start unless the visibility timeout exceeds the longest time a
  single-image job can stay unacknowledged on it, ``prefetch × hard time limit + margin``
  (``check_visibility_timeout``);
- every ``renew_interval`` seconds it renews the visibility of every message it holds
  (``RenewVisibility``), so batch jobs, whose limits grow with their size, and jobs
  prefetched behind them are not redelivered either, however long they take.

A worker is either able to run jobs or not running. ``ModelReady`` sits between the pool
and the consumer: the worker takes no job until its pool process has loaded the model and
run the warm-up forward; a process that cannot (no weights, corrupt weights, no device,
out of memory) records the reason and exits, and the worker exits with
``EXIT_OUT_OF_SERVICE`` and that one line. Later, ``Heartbeat`` touches the liveness file
from the consumer loop and watches the pool: a device failure during a job, or a pool
process dying ``BEN2Q_WORKER_MAX_CHILD_FAILURES`` times in a row with no job finished in
between, takes the worker out of service the same way; the jobs it holds go back to the
queue. The probe files are described in ``ben2q.health``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import warnings
from typing import Any, NoReturn

from celery import Celery, bootsteps
from celery.exceptions import SecurityWarning
from celery.signals import celeryd_init, setup_logging, worker_process_init, worker_shutdown
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from kombu import Queue

from .broker import celery_config
from .config import Settings, get_settings
from .errors import BEN2QError
from .health import EXIT_OUT_OF_SERVICE, WorkerFiles
from .status import StatusStore

log = logging.getLogger(__name__)


VISIBILITY_MARGIN = 5.0
"""Seconds between a job's hard time limit and its acknowledgement at worst: the limit is
enforced within about a second, then the job is failed in Redis and acknowledged."""


class ConfigurationError(ValueError):
    """Settings a worker refuses to start with."""


def prefetch(settings: Settings) -> int:
    """Messages a worker reserves: enough to fill a batch while the previous one runs."""
    return max(2 * settings.max_batch, 1)


def longest_job_seconds(settings: Settings) -> float:
    """The hard time limit of the longest job a worker can be running when it is told to
    stop: a pass of celery-batches (``BEN2Q_MAX_BATCH`` images), a batch job run whole (at
    most ``BEN2Q_BATCH_CHUNK`` inputs; larger ones only fan out) or one chunk, at
    ``BEN2Q_JOB_TIME_LIMIT`` per image. A warm shutdown finishes within it: a supervisor's
    grace period (Kubernetes' ``terminationGracePeriodSeconds``) must exceed it, or the
    running job is killed and delivered again."""
    images = max(settings.max_batch, settings.batch_chunk or settings.max_batch_items)
    return settings.job_time_limit * images


def webhook_time_limits(settings: Settings) -> tuple[float, float]:
    """Soft and hard time limits of one webhook delivery attempt."""
    return settings.webhook_timeout * 3, settings.webhook_timeout * 4


def restore_interval(settings: Settings) -> int:
    """Seconds between a worker's sweeps for messages whose visibility timeout expired."""
    return max(1, min(10, settings.visibility_timeout // 6))


def renew_interval(settings: Settings) -> float:
    """Seconds between renewals of the visibility of the messages a worker holds."""
    return max(1.0, settings.visibility_timeout / 4)


def check_visibility_timeout(settings: Settings) -> None:
    """Refuse a visibility timeout a job can outlive while its worker is alive.

    A reserved message waits behind at most ``prefetch - 1`` others and then runs, each
    bounded by its hard time limit (``BEN2Q_JOB_TIME_LIMIT`` per image; a webhook attempt:
    4 × ``BEN2Q_WEBHOOK_TIMEOUT``). So ``visibility_timeout`` must exceed
    ``prefetch × hard limit + VISIBILITY_MARGIN``. Batch jobs, whose limit scales with their
    size, are covered by the renewal of held messages instead (``RenewVisibility``).
    """
    n = prefetch(settings)
    limit = max(settings.job_time_limit, webhook_time_limits(settings)[1])
    bound = n * limit + VISIBILITY_MARGIN
    if settings.visibility_timeout <= bound:
        raise ConfigurationError(
            f"BEN2Q_VISIBILITY_TIMEOUT={settings.visibility_timeout} s is too short: a job "
            f"can stay unacknowledged on a live worker for prefetch {n} (2 × "
            f"BEN2Q_MAX_BATCH) × hard time limit {limit:g} s (BEN2Q_JOB_TIME_LIMIT, or 4 × "
            f"BEN2Q_WEBHOOK_TIMEOUT) + {VISIBILITY_MARGIN:g} s = {bound:g} s, and Redis "
            "would deliver it a second time; raise BEN2Q_VISIBILITY_TIMEOUT above that, or "
            "lower the time limits or BEN2Q_MAX_BATCH"
        )


def worker_config(settings: Settings) -> dict[str, Any]:
    """Worker policy on top of the shared producer/worker configuration."""
    shared = celery_config(settings)
    return {
        **shared,
        # Sweep for the jobs of vanished workers often enough that they come back soon
        # after the visibility timeout (kombu's default sweeps every 100 s).
        "broker_transport_options": {
            **shared["broker_transport_options"],
            "unacked_restore_interval": restore_interval(settings),
            "unacked_restore_throttle": 1,
        },
        # A plain worker consumes webhook deliveries, jobs and batch chunks, in that order of
        # precedence (see broker.celery_config); production may split them with --queues.
        "task_queues": [
            Queue(settings.webhook_queue),
            Queue(settings.queue),
            Queue(settings.batch_queue),
        ],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_time_limit,
        "worker_concurrency": 1,
        # Enough reserved messages to fill a batch while the previous one runs.
        "worker_prefetch_multiplier": prefetch(settings),
        # Loading BEN2 and its warm-up forward happen before the child reports for work
        # (``ModelReady`` bounds that wait by BEN2Q_MODEL_LOAD_TIMEOUT).
        "worker_proc_alive_timeout": settings.model_load_timeout + 30,
        "worker_consumer": "ben2q.worker:HeartbeatConsumer",
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
    app.steps["worker"].add(ModelReady)
    app.steps["consumer"].add(RenewVisibility)
    app.steps["consumer"].add(RearmBatchFlush)
    app.steps["consumer"].add(Heartbeat)
    return app


def renew_held_messages(consumer: Any) -> int:
    """Mark every message ``consumer`` holds (prefetched, buffered or running) as delivered
    now, so no sweep redelivers it while this worker lives; returns how many.

    With the Redis transport a delivered message sits in the ``unacked_index`` sorted set,
    scored by its delivery time, until it is acknowledged; a sweep redelivers those older
    than the visibility timeout. ``ZADD XX`` only touches messages still there.
    """
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    qos = getattr(channel, "qos", None)
    delivered = getattr(qos, "_delivered", None)
    index = getattr(qos, "unacked_index_key", None)
    if not delivered or not isinstance(index, str):
        return 0  # nothing held, or not the Redis transport
    dirty = getattr(qos, "_dirty", set())
    tags = [tag for tag in list(delivered) if tag not in dirty]
    if not tags:
        return 0
    try:
        with channel.conn_or_acquire() as client:
            client.zadd(index, dict.fromkeys(tags, time.time()), xx=True)
    except Exception as exc:  # Redis away for a moment: the next round renews them
        log.warning("could not renew the visibility of %d held jobs: %s", len(tags), exc)
        return 0
    return len(tags)


class TimerStep(bootsteps.StartStopStep):
    """Consumer step calling ``tick(consumer)`` every ``interval(settings)`` seconds from
    the consumer's event loop; Celery stops and starts it again around a broker reconnect,
    which re-arms the timer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def interval(self, settings: Settings) -> float:
        raise NotImplementedError

    def tick(self, parent: Any) -> None:
        raise NotImplementedError

    def start(self, parent: Any) -> None:
        settings: Settings = parent.app.conf.ben2q_settings
        self.tref = parent.timer.call_repeatedly(
            self.interval(settings), self.tick, (parent,), priority=10
        )

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop


class RenewVisibility(TimerStep):
    """Consumer step: renews the visibility of held messages every ``renew_interval``."""

    def interval(self, settings: Settings) -> float:
        return renew_interval(settings)

    def tick(self, parent: Any) -> None:
        renew_held_messages(parent)


class RearmBatchFlush(bootsteps.StartStopStep):
    """Consumer step: re-arm the periodic flush of batched tasks after a broker reconnect.

    On a connection loss Celery clears the event loop's timer, and with it the flush timer
    of each celery-batches task, which celery-batches only arms for the first message of an
    empty buffer: jobs buffered before the loss would wait until ``flush_every`` more came.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        from celery_batches import Batches

        for task in parent.app.tasks.values():
            if isinstance(task, Batches) and task._tref is not None:
                task._tref.cancel()
                task._tref = parent.timer.call_repeatedly(task.flush_interval, task._do_flush)


# --- in service or out: the main process's watch over its pool --------------------------


def describe_exit(code: int | None) -> str:
    """``exit code 3`` or ``signal SIGKILL`` for a process's exit status."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def pool_processes(pool: Any) -> list[Any]:
    """The prefork pool's processes (billiard ``Process`` objects); [] for other pools."""
    procs = getattr(getattr(pool, "_pool", None), "_pool", None)
    return list(procs) if isinstance(procs, list) else []


class ServiceGuard:
    """Decides, in the worker's main process, when the worker must leave service.

    ``observe`` is called on every heartbeat with the pool's processes. A pid that is gone
    from the pool died (killed at a hard time limit, crashed, or exited out of service). The
    worker leaves service when a pool process recorded a reason (``failed``: the model
    could not load, the device failed), or when ``max_failures`` processes died in a row
    without a job finishing in between: a model that keeps dying must not keep taking jobs.
    """

    def __init__(self) -> None:
        self.files: WorkerFiles | None = None
        self.max_failures = 3
        self.known: dict[int, Any] = {}
        self.deaths = 0
        self.last_exit: int | None = None
        self.leaving = False
        self.exitcode: int | None = None
        self.pool: Any = None

    def attach(self, files: WorkerFiles, max_failures: int) -> None:
        self.files, self.max_failures = files, max_failures

    def beat(self) -> None:
        if self.files is not None:
            self.files.beat()

    def job_finished(self) -> None:
        """A job ran to its end on the model: the deaths before it were not in a row.

        Deaths the heartbeat has not seen yet happened before this job ended (its process
        replaced the dead one), so they are counted first, then forgiven with the rest."""
        if self.pool is not None:
            self._count_deaths(pool_processes(self.pool))
        self.deaths = 0

    def watch(self, processes: list[Any], pool: Any = None) -> None:
        self.known = {p.pid: p for p in processes if p.pid}
        if pool is not None:
            self.pool = pool

    def observe(self, processes: list[Any]) -> str | None:
        """The reason to leave service, if there is one now."""
        self._count_deaths(processes)
        if self.files is None:
            return None
        reason = self.files.failure()
        if reason is None and self.deaths >= self.max_failures:
            reason = (
                f"its pool process died {self.deaths} times in a row without finishing a job "
                f"(last: {describe_exit(self.last_exit)}); see the log above"
            )
            self.files.mark_failed(reason)
        return reason

    def _count_deaths(self, processes: list[Any]) -> None:
        """Count the pool processes gone since the last look (each one died)."""
        current = {p.pid: p for p in processes if p.pid}
        for pid, proc in self.known.items():
            if pid not in current:
                self.deaths += 1
                self.last_exit = proc.exitcode
                if self.files is not None:
                    self.files.forget_process(pid)
                log.warning(
                    "pool process %d died (%s); %d in a row without a finished job",
                    pid,
                    describe_exit(self.last_exit),
                    self.deaths,
                )
        self.known = current


guard = ServiceGuard()

NO_MODEL = {"model": "none", "device": "-", "precision": "-"}
"""The readiness record of a worker that takes no image jobs (webhook deliveries only)."""


def consumes_model_jobs(app: Celery) -> bool:
    """Whether this worker takes image jobs (a webhook-only worker needs no model)."""
    settings: Settings = app.conf.ben2q_settings
    selected = getattr(app.amqp.queues, "consume_from", None) or app.amqp.queues
    return settings.queue in selected or settings.batch_queue in selected


class ModelReady(bootsteps.StartStopStep):
    """Worker step between the pool and the consumer: the worker consumes no job until
    every pool process holds a warm model (its ``ready-<pid>`` file), and exits with
    ``EXIT_OUT_OF_SERVICE`` and the one-line reason if one cannot get there."""

    requires = ("celery.worker.components:Pool",)
    label = "ModelReady"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.files: WorkerFiles | None = None

    def start(self, parent: Any) -> None:
        settings: Settings = parent.app.conf.ben2q_settings
        files = self.files = WorkerFiles(settings.health_dir, parent.hostname)
        try:
            files.start()
        except OSError as exc:
            log.critical(
                "cannot run jobs: cannot write the probe files in BEN2Q_HEALTH_DIR=%s (%s); "
                "point BEN2Q_HEALTH_DIR at a writable directory",
                settings.health_dir,
                exc,
            )
            raise SystemExit(EXIT_OUT_OF_SERVICE) from None
        guard.attach(files, settings.worker_max_child_failures)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            log.warning("running as root: run workers as an unprivileged user in production")
        procs = pool_processes(parent.pool)
        if not consumes_model_jobs(parent.app):
            guard.watch(procs)
            if not procs:  # a threads/solo pool: nothing else would say it is ready
                files.mark_ready(NO_MODEL)
            return  # a webhook-only worker needs no model
        if not procs:
            self._leave("image jobs need the prefork pool (one process per model)")
        deadline = time.monotonic() + settings.model_load_timeout
        next_beat = 0.0
        while True:
            ready = files.ready_processes()
            if all(p.pid in ready for p in procs):
                break
            for proc in procs:
                if proc.pid not in ready and proc.exitcode is not None:
                    self._leave(
                        files.failure()
                        or f"its pool process exited while loading the model "
                        f"({describe_exit(proc.exitcode)})"
                    )
            if time.monotonic() > deadline:
                self._leave(
                    f"the model was not ready after {settings.model_load_timeout:g} s "
                    "(BEN2Q_MODEL_LOAD_TIMEOUT)"
                )
            if time.monotonic() >= next_beat:
                files.beat()  # waiting for the model is being alive
                next_beat = time.monotonic() + settings.heartbeat_interval
            time.sleep(0.05)
        guard.watch(procs, parent.pool)

    def _leave(self, reason: str) -> None:
        assert self.files is not None
        self.files.mark_failed(reason)
        log.critical("cannot run jobs: %s", reason)
        raise SystemExit(EXIT_OUT_OF_SERVICE)

    def stop(self, parent: Any) -> None:
        if self.files is not None:
            self.files.draining()  # no longer ready while the running job finishes

    shutdown = stop


class Heartbeat(TimerStep):
    """Consumer step: every ``BEN2Q_HEARTBEAT_INTERVAL`` seconds, from the consumer's own
    event loop, touch the liveness file and check whether the worker must leave service
    (then a warm shutdown with ``EXIT_OUT_OF_SERVICE``: prefetched jobs go back to the
    queue, a running one finishes). The ``consuming`` file marks the time between its
    start and stop."""

    def interval(self, settings: Settings) -> float:
        return settings.heartbeat_interval

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.presence: StatusStore | None = None

    def tick(self, parent: Any) -> None:
        guard.beat()
        reason = guard.observe(pool_processes(parent.pool))
        if reason is not None and not guard.leaving:
            guard.leaving = True
            if guard.files is not None:
                guard.files.draining()
            log.critical("leaving service: %s", reason)
            worker_state.should_stop = EXIT_OUT_OF_SERVICE
            self._absent(parent)
        elif not guard.leaving and self.presence is not None:
            with contextlib.suppress(Exception):  # the broker's own reconnect handles outages
                self.presence.worker_seen(parent.hostname)

    def _absent(self, parent: Any) -> None:
        if self.presence is not None:
            with contextlib.suppress(Exception):
                self.presence.worker_gone(parent.hostname)

    def start(self, parent: Any) -> None:
        if self.presence is None and consumes_model_jobs(parent.app):
            settings: Settings = parent.app.conf.ben2q_settings
            # its own client: one short try per beat, never blocking the event loop long
            self.presence = StatusStore(settings.status_url, ttl=settings.status_ttl, retries=0)
            self.presence.redis.connection_pool.connection_kwargs.update(
                socket_timeout=1.0, socket_connect_timeout=1.0
            )
        self.tick(parent)
        super().start(parent)
        if guard.files is not None and not guard.leaving:
            guard.files.consumer_started()

    def stop(self, parent: Any) -> None:
        if guard.files is not None:
            guard.files.consumer_stopped()
        super().stop(parent)

    def shutdown(self, parent: Any) -> None:
        self._absent(parent)
        self.stop(parent)


class HeartbeatConsumer(Consumer):
    """Celery's consumer, also beating while it retries an unreachable broker: a worker
    waiting for Redis is alive (its liveness must not fail and restart it, losing its warm
    model, while the broker is away)."""

    def ensure_connected(self, conn: Any) -> Any:
        ensure = conn.ensure_connection

        def beating(errback: Any = None, *args: Any, **kwargs: Any) -> Any:
            def on_error(exc: Exception, interval: float) -> None:
                guard.beat()
                if errback is not None:
                    errback(exc, interval)

            return ensure(on_error, *args, **kwargs)

        conn.ensure_connection = beating
        return super().ensure_connected(conn)


app = create_app()


class _ProcessState:
    """The engine, storage and status store of this process, created once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hostname = os.environ.get("BEN2Q_WORKER_NAME", "")
        self._runner = None
        self._store = None
        self._broker = None
        self.model_info: dict[str, Any] = {}

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
                seconds = engine.warmup(settings.warmup)
                self.model_info = {
                    "model": engine.spec.name,
                    "device": str(engine.device),
                    "precision": engine.precision.name,
                    "precision_reason": engine.precision.reason,
                    "warmup_s": round(seconds, 3),
                }
                log.info(
                    "BEN2 %s ready on %s in %s (%s), warm-up %.2f s",
                    engine.spec.name,
                    engine.device,
                    engine.precision.name,
                    engine.precision.reason,
                    seconds,
                )
                runner = JobRunner(
                    engine,
                    Storage(settings),
                    self.store(),
                    settings,
                    hostname=self.hostname,
                    notify=notify,
                    metrics=MetricsRecorder(settings.status_url),
                )
                runner.warmup()
                self._runner = runner
            return self._runner

    def _broker_redis(self):
        settings: Settings = app.conf.ben2q_settings
        if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return None
        if self._broker is None:
            import redis

            self._broker = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
        return self._broker

    @staticmethod
    def _waiting_key(parent_pid: int) -> str:
        return f"ben2q:waiting:{socket.gethostname()}:{parent_pid}"

    def mark_jobs_buffered(self, buffered: bool) -> None:
        """In the worker's main process: say (in Redis, for its pool process) whether
        single-image jobs wait in its batch buffer behind the running task."""
        client = self._broker_redis()
        if client is None:
            return
        try:
            if buffered:
                client.set(self._waiting_key(os.getpid()), "1", px=10_000)
            else:
                client.delete(self._waiting_key(os.getpid()))
        except Exception:  # the broker hiccups: chunks then just run in order
            log.warning("could not mark buffered jobs", exc_info=True)

    def jobs_waiting(self) -> bool:
        """In a pool process: whether single-image jobs wait, on the job queue or in this
        worker's batch buffer (Redis brokers; else False)."""
        settings: Settings = app.conf.ben2q_settings
        client = self._broker_redis()
        if client is None:
            return False
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.llen(settings.queue)
                pipe.exists(self._waiting_key(os.getppid()))
                queued, buffered = pipe.execute()
            return bool(queued or buffered)
        except Exception:  # the broker hiccups: run the chunk rather than fail it
            log.warning("could not read the length of queue %s", settings.queue, exc_info=True)
            return False

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


def health_files() -> WorkerFiles:
    settings: Settings = app.conf.ben2q_settings
    return WorkerFiles(settings.health_dir, state.hostname or "ben2q")


def one_line(exc: BaseException) -> str:
    """``code: message`` of an error, on one line."""
    if isinstance(exc, BEN2QError):
        text = f"{exc.code}: {exc.message}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def leave_service(exc: BaseException) -> NoReturn:
    """In a pool process: record why this worker cannot run jobs and exit at once.

    The main process reports the reason once and exits (before taking any job when this
    happens at start-up); the jobs this process held go back to the queue."""
    log.debug("out of service", exc_info=exc)
    health_files().mark_failed(one_line(exc))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_OUT_OF_SERVICE)


@celeryd_init.connect
def _refuse_unsafe_delivery(**_: Any) -> None:
    """``celery -A ben2q.worker worker`` refuses what ``ben2q worker`` refuses."""
    try:
        check_visibility_timeout(app.conf.ben2q_settings)
    except ConfigurationError as exc:
        raise SystemExit(f"error: {exc}") from None


@celeryd_init.connect
def _remember_hostname(sender: str | None = None, **_: Any) -> None:
    if sender:
        state.hostname = sender


@celeryd_init.connect
def _one_line_root_warning(**_: Any) -> None:
    """Celery's multi-line superuser warning becomes one line, logged once logging is set
    up (``ModelReady``): JSON serialisation only, so no pickle; running as root is a
    hardening matter."""
    warnings.filterwarnings("ignore", category=SecurityWarning)


@worker_shutdown.connect
def _probe_files_gone(sender: Any = None, **_: Any) -> None:
    guard.exitcode = getattr(sender, "exitcode", None)
    if guard.files is not None:
        guard.files.stopped()


@setup_logging.connect
def _logging(loglevel: Any = None, **_: Any) -> None:
    """Our handler instead of Celery's: JSON lines (or text) with job ids, secrets redacted."""
    from .logs import configure_logging

    settings: Settings = app.conf.ben2q_settings
    level = loglevel if isinstance(loglevel, str) else logging.getLevelName(loglevel or 20)
    configure_logging(fmt=settings.log_format, level=level, worker=state.hostname or None)


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    """In each pool process, before it reports for work: the warm model, or out of service."""
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
    info = NO_MODEL
    if consumes_model_jobs(app):
        try:
            state.runner()
        except BaseException as exc:  # whatever it is, this process cannot run jobs
            leave_service(exc)
        info = state.model_info
    with contextlib.suppress(OSError):  # the main process checked the directory already
        health_files().mark_ready(info)
