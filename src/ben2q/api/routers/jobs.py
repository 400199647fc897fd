"""``/v1/jobs``: submit (JSON or uploads), read, list and cancel the caller's jobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError

from ...jobs import ITEMS_SHOWN, JobState, JobStatus
from .. import idempotency
from ..bodies import is_json, media_type, read_json
from ..deps import KeyDep, ServicesDep
from ..models import ItemPage, JobCreate, JobPage
from ..problems import Problem, invalid
from ..submit import admit, build_request, enqueue, owned, plausible, shown

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)

PROBLEMS = {
    401: {"description": "No, unknown or revoked API key"},
    404: {"description": "No such job for this key"},
    429: {"description": "Over the key's rate limit"},
}


def prefer_wait(prefer: str | None, limit: float) -> int | None:
    """Seconds of ``Prefer: wait=N`` (RFC 7240), capped at ``limit``; None if absent."""
    if not prefer:
        return None
    match = _WAIT.search(prefer)
    if match is None:
        return None
    return int(min(int(match.group(1)), limit))


async def hold(svc, job: JobStatus, seconds: int) -> JobStatus:
    """The record once ``job`` ends or ``seconds`` pass, whichever is first."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            return await svc.client.wait(job.id, timeout=seconds, items=ITEMS_SHOWN)
    return await svc.store.get(job.id, items=ITEMS_SHOWN) or job


@router.post(
    "",
    status_code=202,
    response_model=JobStatus,
    responses={
        **PROBLEMS,
        201: {
            "description": "With `Prefer: wait=N`: the record after the wait",
            "model": JobStatus,
        },
        400: {"description": "A malformed `Idempotency-Key`"},
        403: {"description": "An input or the output lies outside the key's scopes"},
        409: {"description": "A request with this `Idempotency-Key` is still in flight"},
        413: {"description": "An upload or the body is too large"},
        415: {"description": "Neither JSON nor multipart/form-data"},
        422: {
            "description": "Invalid request (`errors` names each field), or an "
            "`Idempotency-Key` reused with another request"
        },
        503: {"description": "The queue is over its bound (back-pressure)"},
    },
    openapi_extra={
        "parameters": [idempotency.PARAMETER],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/JobUpload"}},
            },
        },
    },
)
async def create_job(
    request: Request,
    svc: ServicesDep,
    key: KeyDep,
    prefer: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    """Submit one image (`input`) or a batch (`inputs`) by URI, or upload files
    (`multipart/form-data`, one or more `file` parts). Answers 202 with the job's record
    and `Location`; with `Prefer: wait=N` (N ≤ 60) it answers 201 once the job ended or N
    seconds passed, whichever is first. With `Idempotency-Key`, a retry answers the first
    request's job and answer again."""
    async with idempotency.claim(request, svc, key) as idem:
        if idem is not None and idem.stored is not None:
            replay = idem.stored.response()
            if replay is not None:
                return replay
            return _answer(await owned(svc, key.id, idem.stored.job_id), 202)
        if media_type(request) == "multipart/form-data":
            from ..uploads import receive  # noqa: PLC0415 - the upload path's own module

            job = await receive(request, svc, key)
        elif is_json(request):
            body = await read_json(request, JobCreate, svc.settings.api_max_json_bytes)
            job = await build_request(svc, key, body)
            await admit(request, svc, key, max(1, len(job.inputs)))  # a prefix: 1
        else:
            raise Problem(
                415,
                "unsupported_media_type",
                "send application/json, or multipart/form-data with 'file' parts",
            )
        status = await enqueue(svc, key, job)
        answer = _answer(status, 202)
        if idem is not None:
            await idem.save(status.id, answer)
        seconds = prefer_wait(prefer, svc.settings.api_max_wait)
        if seconds is None:
            return answer
        answer = _answer(
            await hold(svc, status, seconds), 201, {"Preference-Applied": f"wait={seconds}"}
        )
        if idem is not None:
            await idem.save(status.id, answer)
        return answer


def _answer(status: JobStatus, code: int, headers: dict[str, str] | None = None) -> Response:
    """The job's record as the answer (serialized here so a replay repeats its bytes)."""
    return Response(
        shown(status).model_dump_json(),
        status_code=code,
        media_type="application/json",
        headers={"Location": f"/v1/jobs/{status.id}", **(headers or {})},
    )


def _cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}:{job_id}".encode()).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, job_id = text.split(":", 1)
        return float(when), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise invalid("query:cursor", "not a cursor from a previous page") from exc


@router.get("", response_model=JobPage, responses=PROBLEMS)
async def list_jobs(
    svc: ServicesDep,
    key: KeyDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> JobPage:
    """The key's jobs, newest first, `limit` per page; pass `next_cursor` as `cursor`."""
    before = None if not cursor else _parse_cursor(cursor)  # "" is the first page too
    found: list[JobStatus] = []
    scanned = 0
    exhausted = False
    while len(found) < limit and scanned < 20 * limit + 200:
        page = await svc.keys.job_page(key.id, before=before, count=limit)
        if not page:
            exhausted = True
            break
        scanned += len(page)
        raws = await svc.redis.mget([svc.store.keys.job(job_id) for job_id, _ in page])
        gone = []
        for (job_id, created), raw in zip(page, raws, strict=True):
            before = (created, job_id)
            if raw is None:
                gone.append(job_id)
                continue
            try:
                status = JobStatus.model_validate_json(raw)
            except ValidationError:
                continue
            if state is None or status.state == state:
                found.append(status)
                if len(found) == limit:
                    break
        await svc.keys.forget_jobs(key.id, gone)
    more = not exhausted and before is not None
    return JobPage(jobs=found, next_cursor=_cursor(*before) if more and before else None)


@router.get("/{job_id}", response_model=JobStatus, responses=PROBLEMS)
async def get_job(job_id: str, svc: ServicesDep, key: KeyDep) -> Response:
    """The job's record."""
    # The stored JSON is the JobStatus the workers wrote: answered as it is, after the
    # tenant check, instead of being validated and serialized again (the hottest route).
    raw = await svc.redis.get(svc.store.keys.job(job_id)) if plausible(job_id) else None
    record = None if raw is None else json.loads(raw)
    if record is None or record.get("tenant") != key.id:
        raise Problem(404, "not_found", f"no job {job_id!r}")
    if record.get("items_apart") and record["counts"]["total"] <= ITEMS_SHOWN:
        whole = await svc.store.get(job_id)  # its items are kept apart: assembled
        if whole is not None:
            return Response(whole.model_dump_json(), media_type="application/json")
    return Response(raw, media_type="application/json")


@router.get("/{job_id}/items", response_model=ItemPage, responses=PROBLEMS)
async def list_items(
    job_id: str,
    svc: ServicesDep,
    key: KeyDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
) -> ItemPage:
    """The job's items in index order, `limit` per page; pass `next_cursor` as `cursor`.
    A job's record carries its items only up to 1,000 of them: beyond, page them here."""
    start = _parse_item_cursor(cursor)
    status = await owned(svc, key.id, job_id, items=False)
    total = status.counts.total if status.counts is not None else len(status.items)
    items = await svc.store.get_items(job_id, start, start + limit, summary=status)
    if items is None:
        raise Problem(404, "not_found", f"no job {job_id!r}")
    stop = start + len(items)
    return ItemPage(items=items, total=total, next_cursor=str(stop) if stop < total else None)


def _parse_item_cursor(cursor: str | None) -> int:
    """The index a page starts at: a cursor is the ``next_cursor`` of the page before."""
    if not cursor:
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > 10**9:
        raise invalid("query:cursor", "not a cursor from a previous page")
    return int(cursor)


@router.post("/{job_id}/cancel", response_model=JobStatus, responses=PROBLEMS)
async def cancel_job(job_id: str, svc: ServicesDep, key: KeyDep) -> JobStatus:
    """Cancel a queued job now, or flag a running one (its worker stops at the next item);
    a finished job is answered unchanged."""
    await owned(svc, key.id, job_id)
    return await svc.client.cancel(job_id)
