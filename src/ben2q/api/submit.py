"""From an API request to a job on the queue, with the key's scopes and limits applied.

Everything that can refuse a request (fields, scopes, addresses, sizes) runs before
anything is written; then back-pressure and the image limit; then the job is enqueued
through the same ``AsyncClient`` path Python producers use, and indexed under its key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from fastapi import Request

from ..errors import FetchError, InvalidRequest
from ..fetch import resolve_and_check
from ..jobs import ITEMS_SHOWN, JobRequest, JobStatus, make_request
from ..keys import ApiKey, check_input, resolve_output
from .deps import take_images
from .models import JobCreate
from .problems import Problem
from .state import Services

DNS_TIMEOUT = 3.0


async def guard_host(svc: Services, url: str, field: str) -> None:
    """Refuse a URL whose host resolves to a private or metadata address (unless the
    deployment allows them), as the fetcher will again at the worker."""
    if svc.settings.allow_private_urls:
        return
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a bad port or bracketed host: refuse, never a 500
        raise InvalidRequest(field, f"malformed URL: {exc}") from exc
    if not host:
        raise InvalidRequest(field, "the URL names no host")
    try:
        await asyncio.to_thread(
            resolve_and_check, host, port, allow_private=False, timeout=DNS_TIMEOUT
        )
    except FetchError as exc:  # ForbiddenURL too: 422 with its own code, naming the field
        raise Problem.of(exc, field=field) from exc


async def queue_length(svc: Services) -> int:
    return int(await svc.broker_redis.llen(svc.settings.queue))


async def build_request(
    svc: Services,
    key: ApiKey,
    body: JobCreate,
    *,
    uploads: Sequence[str] = (),
    job_id: str | None = None,
) -> JobRequest:
    """Validate ``body`` against the key (nothing is written); ``Problem``/errors if bad."""
    settings = svc.settings
    if body.prefix is not None and (uploads or body.input is not None or body.inputs is not None):
        raise InvalidRequest("prefix", "give a prefix alone, without input, inputs or files")
    if body.prefix is not None:
        inputs, kind = [], "batch"
    elif uploads:
        if body.input is not None or body.inputs is not None:
            raise InvalidRequest("input", "send files or input URIs, not both")
        inputs = list(uploads)
        kind = "single" if len(inputs) == 1 else "batch"
    elif body.input is not None and body.inputs is not None:
        raise InvalidRequest("inputs", "give 'input' (one image) or 'inputs' (a batch), not both")
    elif body.input is not None:
        inputs, kind = [body.input], "single"
    elif body.inputs is not None:
        inputs, kind = list(body.inputs), "batch"
    else:
        raise InvalidRequest("input", "give 'input' (one image URI) or 'inputs' (a list)")
    max_items = min(key.max_batch or settings.max_batch_items, settings.max_batch_items)
    if len(inputs) > max_items:
        raise InvalidRequest("inputs", f"{len(inputs)} inputs; at most {max_items} per batch")
    output = resolve_output(key, body.output, settings.api_output_location)
    local_root = None if settings.local_root is None else str(settings.local_root)
    now = time.time()
    request = make_request(
        kind,  # type: ignore[arg-type]
        inputs,
        output,
        prefix=body.prefix,
        options=body.options(),
        webhook_url=body.webhook_url,
        webhook_events=body.webhook_events,
        max_items=max_items,
        local_root=local_root,
        tenant=key.id,
        expires_at=now + settings.api_retention,
        job_id=job_id,
    )
    if request.prefix is not None:
        check_input(key, request.prefix, "prefix")
    if not uploads:  # uploads are the API's own objects; URIs must be in the key's scope
        for i, uri in enumerate(request.inputs):
            check_input(key, uri, "input" if kind == "single" else f"inputs[{i}]")
        hosts = {}
        for i, uri in enumerate(request.inputs):
            if urlsplit(uri).scheme.lower() in ("http", "https"):
                hosts.setdefault(
                    urlsplit(uri).netloc, (uri, "input" if kind == "single" else f"inputs[{i}]")
                )
        for uri, field in list(hosts.values())[:50]:
            await guard_host(svc, uri, field)
    background = request.options.background_uri
    if background is not None:  # fetched like an input: the key's scopes, the URL guard
        check_input(key, background, "background")
        if urlsplit(background).scheme.lower() in ("http", "https"):
            await guard_host(svc, background, "background")
    if request.webhook_url:
        await guard_host(svc, request.webhook_url, "webhook_url")
    return request


async def admit(request: Request, svc: Services, key: ApiKey, images: int) -> None:
    """Back-pressure (503 while the queue is over its bound), then the image limit."""
    queued = await queue_length(svc)
    if queued > svc.settings.api_max_queued:
        raise Problem(
            503,
            "overloaded",
            f"the queue holds {queued} jobs (bound {svc.settings.api_max_queued}); try again later",
            headers={"Retry-After": "10"},
        )
    await take_images(request, svc, key, images)


async def enqueue(svc: Services, key: ApiKey, job: JobRequest) -> JobStatus:
    """Send the job (as ``AsyncClient`` does) and index it under its key."""
    await svc.client.enqueue(job)
    await svc.keys.add_job(key.id, job.id, job.submitted_at, svc.settings.status_ttl)
    return JobStatus.queued(job)


async def owned(
    svc: Services, tenant: str, job_id: str, *, items: bool | int = ITEMS_SHOWN
) -> JobStatus:
    """The record of ``job_id`` if the key ``tenant`` (its id) made it; 404 otherwise (ids
    are not probeable). ``items``: as ``StatusStore.get`` (default: whole records of jobs
    of at most ``ITEMS_SHOWN`` items, summaries beyond)."""
    status = await svc.store.get(job_id, items=items) if plausible(job_id) else None
    if status is None or status.tenant != tenant:
        raise Problem(404, "not_found", f"no job {job_id!r}")
    return status


def shown(status: JobStatus) -> JobStatus:
    """The record as the API answers it: a job of more than ``ITEMS_SHOWN`` items (or a
    summary) without its items, which ``GET /v1/jobs/{id}/items`` pages."""
    if status.items_apart and (not status.whole or len(status.items) > ITEMS_SHOWN):
        return status.summary()
    return status


def plausible(job_id: str) -> bool:
    """Whether ``job_id`` has the form of a job id (anything else cannot exist)."""
    return (
        0 < len(job_id) <= 128
        and all(c.isalnum() or c in "_-" for c in job_id)
        and job_id.isascii()
    )
