"""What a worker re-checks of a delivered job before it spends anything on it.

The broker is a trust boundary: whoever can write to it can send raw task messages that
never went through ``Client``/``make_request`` or the HTTP API. So every delivered request
is checked again, at the worker, with the same rules and the worker's own limits:

- the form rules of ``make_request`` (input and output URIs, the local root, options,
  webhook), run by ``make_request`` itself so the two can never drift apart;
- the batch size against ``BEN2Q_MAX_BATCH_ITEMS``, and the task a kind belongs to
  (``ben2q.remove`` takes one input, ``ben2q.batch`` a list);
- for a job made through the HTTP API (``tenant`` set), the key's scopes: its inputs under
  the key's input prefixes (or public URLs if it allows them, or its own uploads) and its
  output under the key's output prefix, as ``ben2q.api.submit`` applies them.

A request that fails is refused with ``InvalidRequest``/``ScopeError`` naming the field;
the task layer records the failure (``refuse``) and acknowledges the message. Nothing
else is fetched, decoded or run.
"""

from __future__ import annotations

import logging
import time

from .config import Settings
from .errors import BEN2QError, InvalidRequest
from .jobs import ErrorInfo, JobKind, JobRequest, JobStatus, make_request
from .keys import ApiKey, ScopeError, check_input, key_output_prefix, under_prefix
from .status import StatusStore

log = logging.getLogger(__name__)


def check_request(
    request: JobRequest,
    settings: Settings,
    *,
    expected_kind: JobKind | None = None,
    key: ApiKey | None = None,
) -> JobRequest:
    """``request`` if the worker may run it; ``InvalidRequest``/``ScopeError`` otherwise.

    ``key`` is the API key named by ``request.tenant`` (``None`` when it has no tenant, or
    when the key does not exist: then a tenant job is refused)."""
    if expected_kind is not None and request.kind != expected_kind:
        raise InvalidRequest("kind", f"a {request.kind!r} job sent to the {expected_kind} task")
    max_items = batch_limit(settings, key if request.tenant is not None else None)
    local_root = None if settings.local_root is None else str(settings.local_root)
    make_request(  # the producer's own rules; raises InvalidRequest naming the field
        request.kind,
        request.inputs,
        request.output,
        prefix=request.prefix,
        options=request.options,
        webhook_url=request.webhook_url,
        webhook_events=request.webhook_events,
        max_items=max_items,
        local_root=local_root,
        job_id=request.id,
        tenant=request.tenant,
    )
    if request.tenant is not None:
        _check_scope(request, settings, key)
    return request


def batch_limit(settings: Settings, key: ApiKey | None) -> int:
    """Inputs of one batch job at most: the worker's limit, or the key's if lower."""
    if key is not None and key.max_batch:
        return min(settings.max_batch_items, key.max_batch)
    return settings.max_batch_items


def _check_scope(request: JobRequest, settings: Settings, key: ApiKey | None) -> None:
    if key is None or key.id != request.tenant:
        raise ScopeError("tenant", f"no API key {request.tenant!r}")
    uploads = _uploads_prefix(key, settings.api_upload_location)
    single = request.kind == "single"
    for i, uri in enumerate(request.inputs):
        field = "input" if single else f"inputs[{i}]"
        if uploads is None or not under_prefix(uri, uploads, field):
            check_input(key, uri, field)
    if request.prefix is not None:  # a prefix under the key's own (uploads included)
        if uploads is None or not under_prefix(request.prefix, uploads, "prefix"):
            check_input(key, request.prefix, "prefix")
    background = request.options.background_uri
    if background is not None:
        check_input(key, background, "background")
    base = key_output_prefix(key, settings.api_output_location)
    if not under_prefix(request.output, base, "output"):
        raise ScopeError("output", f"outputs of this key must lie under {base}")


def _uploads_prefix(key: ApiKey, location: str | None) -> str | None:
    """Where the API stores this key's uploads (``<location><key id>/``), if it takes any."""
    if not location:
        return None
    return f"{location if location.endswith('/') else location + '/'}{key.id}/"


def refuse(
    store: StatusStore,
    request: JobRequest,
    error: BEN2QError,
    *,
    max_items: int,
    worker: str | None = None,
) -> JobStatus | None:
    """Record ``request`` as failed with ``error``, unless that would touch a record it does
    not own: a record of the same id that is already final or belongs to another tenant is
    left alone (a forged message must not overwrite somebody else's job). Returns the
    record written, or ``None``. A request over ``max_items`` inputs gets a record without
    items (a forgery's 10⁶ inputs are not copied into Redis)."""
    stored = store.get(request.id)
    if stored is not None and (stored.done or stored.tenant != request.tenant):
        log.warning("refused job %s (%s) left its existing record alone", request.id, error.code)
        return None
    info = ErrorInfo(**error.to_dict())
    if stored is not None:
        status = stored
    else:
        status = JobStatus.queued(request)
        if len(request.inputs) > max_items:  # counted, not listed
            status.items, status.items_apart = [], True
    for item in status.items:
        if item.state != "succeeded":
            item.state, item.error = "failed", info
    now = time.time()
    status.state, status.error = "failed", info
    if not status.whole and status.counts is not None:
        status.counts.failed = status.counts.total - status.counts.succeeded
    status.progress = 1.0
    status.worker = worker
    status.attempts += 1
    status.started_at = status.started_at or now
    status.finished_at = now
    store.save(status)
    log.warning(
        "refused job %s: %s",
        request.id,
        error.message,
        extra={"job_id": request.id, "code": error.code},
    )
    return status
