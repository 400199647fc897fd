"""What producers and workers must agree on: task names, queues and Celery settings.

Both ``ben2q.client`` (which only sends) and ``ben2q.worker`` (which runs) build their
Celery app from ``celery_config``, so serialization and transport options cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import Settings

TASK_REMOVE = "ben2q.remove"
"""One image; several pending ones are run as one batched forward by the worker."""
TASK_BATCH = "ben2q.batch"
"""A batch job: many inputs under one job id."""
TASK_CHUNK = "ben2q.chunk"
"""A part of a fanned-out batch job: its inputs ``start`` … ``start + len − 1``."""
TASK_WEBHOOK = "ben2q.webhook"
"""One delivery attempt of a signed webhook event (its own queue)."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by producers and workers (JSON only, never pickle)."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.status_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_routes": {
            TASK_REMOVE: {"queue": settings.queue},
            TASK_BATCH: {"queue": settings.queue},
            TASK_CHUNK: {"queue": settings.batch_queue},
        },
        # Redis redelivers a message nobody acknowledged within this many seconds; it must
        # be longer than the longest job, or a running job is delivered twice (README).
        # Queues are read in the order a worker lists them (--queues): webhook deliveries
        # (short), single-image jobs, then batch chunks, so chunks never hold back a job.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "queue_order_strategy": "priority",
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,  # job records live in ben2q.status, not in Celery results
        "timezone": "UTC",
        "enable_utc": True,
    }


UNACKED = "unacked"
"""The Redis transport's default hash of held messages (``unacked_index``, ``unacked_mutex``
beside it)."""


def unacked_key(settings: Settings, queues: Sequence[str]) -> str:
    """The hash in which a worker consuming ``queues`` keeps the messages it holds.

    Webhook workers hold retries for up to half the visibility timeout before they are
    due. Kept apart from the job workers' hash, those never count as GPU work for an
    autoscaler that counts held messages (deploy/kubernetes: KEDA)."""
    if settings.unacked_key:
        return settings.unacked_key
    if list(queues) == [settings.webhook_queue]:
        return webhook_unacked_key(settings.webhook_queue)
    return UNACKED


def webhook_unacked_key(webhook_queue: str) -> str:
    """The default hash of the messages held by workers of ``webhook_queue`` alone."""
    return f"{UNACKED}:{webhook_queue}"


def held_options(key: str) -> dict[str, str]:
    """Transport options that keep a worker's held messages under ``key``."""
    if key == UNACKED:
        return {
            "unacked_key": UNACKED,
            "unacked_index_key": "unacked_index",
            "unacked_mutex_key": "unacked_mutex",
        }
    return {
        "unacked_key": key,
        "unacked_index_key": f"{key}:index",
        "unacked_mutex_key": f"{key}:mutex",
    }
