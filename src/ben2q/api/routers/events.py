"""``GET /v1/jobs/{id}/events``: a job's updates as Server-Sent Events.

Each update is one ``event: status`` whose ``data:`` is the job's record (``JobStatus``
JSON) and whose ``id:`` orders it (``ben2q.status.event_id``: terminal, attempts, state,
progress); the stream ends by itself after a terminal state. It streams *latest state*,
not a history: a slow client, or one that reconnects, gets the newest record and may never
see some intermediate progress. A reconnecting client sends ``Last-Event-ID`` (browsers
do): records not newer than it are skipped, so after the terminal event it gets nothing
and the stream ends at once. Keep-alive comments go out every ``api_sse_keepalive``
seconds so proxies keep an idle stream open.

The stream is a waiter of the process's one event subscription (``AsyncEventHub``), so
hundreds of open streams cost no Redis connection each; a client that disconnects frees
its waiter (the generator is closed).

Browsers' ``EventSource`` cannot send an ``Authorization`` header. For them,
``POST /v1/jobs/{id}/events/ticket`` (with the key) gives a URL with a ``ticket``: a random
token for this one job's stream, valid ``TICKET_TTL`` seconds (reconnects included), stored
in Redis only as a hash, so the API key itself never goes into a URL.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated

import redis
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from ...errors import NotFound
from ...jobs import JobStatus
from ...keys import ApiKey
from ...status import event_id, event_order, parse_event_id
from ..deps import KeyDep, ServicesDep, authenticated, bearer
from ..problems import Problem
from ..state import Services
from ..submit import owned, plausible

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

TICKET_TTL = 300
"""Seconds an event-stream ticket stays valid (an ``EventSource`` reconnects with it)."""


class EventTicket(BaseModel):
    """A URL for ``EventSource``: this job's stream, without the API key."""

    url: str
    expires_at: float


def _ticket_key(svc: Services, job_id: str, ticket: str) -> str:
    digest = hashlib.sha256(ticket.encode("utf-8", "replace")).hexdigest()
    return f"{svc.store.keys.prefix}:ticket:{job_id}:{digest}"


async def stream_key(
    request: Request,
    job_id: str,
    svc: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ticket: Annotated[
        str | None,
        Query(max_length=128, description="From `POST .../events/ticket`, for EventSource"),
    ] = None,
) -> str:
    """The id of the key allowed to read this job's stream: from the bearer token, or
    from a ticket made for this job."""
    if ticket is not None and credentials is None:
        key_id = await svc.redis.get(_ticket_key(svc, job_id, ticket))
        if key_id is None:
            raise Problem(
                401,
                "unauthorized",
                "unknown or expired ticket",
                headers={"WWW-Authenticate": 'Bearer realm="ben2q"'},
            )
        return key_id.decode() if isinstance(key_id, bytes) else str(key_id)
    key: ApiKey = await authenticated(request, svc, credentials)
    return key.id


async def _stream(
    job_id: str,
    events: AsyncGenerator[JobStatus, None],
    first: JobStatus,
    after: tuple[int, int, int, int] | None,
) -> AsyncIterator[ServerSentEvent]:
    """``first`` (the record the route checked), then ``events``' updates, as SSE."""
    try:
        status: JobStatus | None = first
        while status is not None:
            if after is None or event_order(status) > after:  # else the client has it
                yield ServerSentEvent(status.model_dump_json(), event="status", id=event_id(status))
            status = await anext(events, None)
    except NotFound:  # the record expired while the stream was open
        problem = Problem(404, "not_found", f"no job {job_id!r} (expired)")
        yield ServerSentEvent(_json(problem), event="error")
    except (TimeoutError, redis.ConnectionError, redis.TimeoutError):
        problem = Problem(503, "unavailable", "job events are unavailable; reconnect later")
        yield ServerSentEvent(_json(problem), event="error")
    finally:
        await events.aclose()  # leaves the hub now, also when the client went away


def _json(problem: Problem) -> str:
    return json.dumps(problem.body(), separators=(",", ":"))


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`event: status` per update (`data:` the job's record, `id:` "
            "its order); ends after a terminal state",
            "content": {"text/event-stream": {}},
        },
        401: {"description": "No, unknown or revoked API key"},
        404: {"description": "No such job for this key"},
        429: {"description": "Over the key's rate limit"},
    },
)
async def job_events(
    job_id: str,
    svc: ServicesDep,
    key_id: Annotated[str, Depends(stream_key)],
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    """The job's updates as Server-Sent Events until it ends. Send `Last-Event-ID` to
    resume: updates not newer than it are skipped (the stream carries the latest state,
    not a history). Authenticate with the key, or with `?ticket=` from
    `POST /v1/jobs/{id}/events/ticket` (for browsers' EventSource)."""
    missing = Problem(404, "not_found", f"no job {job_id!r}")
    if not plausible(job_id):
        raise missing
    # The stream's own first read (made once its subscription is live) is the record the
    # tenant check needs: no second read per stream opened.
    events = svc.store.events(job_id)
    try:
        first = await anext(events)
    except NotFound:
        await events.aclose()
        raise missing from None
    except TimeoutError as exc:  # Redis did not confirm the subscription in time
        await events.aclose()
        raise redis.TimeoutError(str(exc)) from exc  # answered 503 like every Redis error
    except BaseException:
        await events.aclose()
        raise
    if first.tenant != key_id:  # 404 for other keys' jobs too: ids are not probeable
        await events.aclose()
        raise missing
    return EventSourceResponse(
        _stream(job_id, events, first, parse_event_id(last_event_id)),
        ping=svc.settings.api_sse_keepalive,
        # No per-send timeout: it costs a timer per event (a tenth of the CPU of a burst of
        # 5,000 streams' events); a stalled client's sends wait on its own socket only, and
        # its waiter's bounded mailbox keeps it from holding up the hub.
        send_timeout=None,
        headers={"Cache-Control": "no-store"},
    )


@router.post(
    "/{job_id}/events/ticket",
    status_code=201,
    response_model=EventTicket,
    responses={
        401: {"description": "No, unknown or revoked API key"},
        404: {"description": "No such job for this key"},
        429: {"description": "Over the key's rate limit"},
    },
)
async def events_ticket(job_id: str, svc: ServicesDep, key: KeyDep) -> EventTicket:
    """A ticket URL for this job's event stream, for `new EventSource(url)` (which cannot
    send headers); valid 5 minutes, reconnects included."""
    await owned(svc, key.id, job_id)
    ticket = secrets.token_urlsafe(32)
    await svc.redis.set(_ticket_key(svc, job_id, ticket), key.id, ex=TICKET_TTL)
    return EventTicket(
        url=f"/v1/jobs/{job_id}/events?ticket={ticket}", expires_at=time.time() + TICKET_TTL
    )
