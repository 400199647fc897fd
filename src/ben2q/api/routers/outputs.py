"""``/v1/jobs/{id}/items/{index}/output`` and ``/mask``: an item's result, for its key only.

Outputs in S3 are answered with a ``302`` to a presigned GET URL, so the bytes go from
the store to the client without passing through the API; the URL is signed for
``BEN2Q_API_PRESIGN_ENDPOINT_URL`` when set (clients may reach S3 under another address
than the workers do) and is valid ``BEN2Q_API_PRESIGN_EXPIRY`` seconds, which
``X-Expires-At`` (epoch seconds) and ``Cache-Control: private, max-age`` state. Outputs on
``file://`` storage have no URL a client could follow, so they are streamed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Path
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.responses import Response

from ...jobs import ItemStatus, JobStatus
from ...keys import ApiKey
from ...storage import Reader
from ..deps import KeyDep, ServicesDep
from ..problems import Problem
from ..state import Services
from ..submit import owned

router = APIRouter(prefix="/v1/jobs", tags=["outputs"])

CHUNK = 256 * 1024

RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "The bytes (outputs on file:// storage)",
        "content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}},
    },
    302: {"description": "A presigned URL of the object (outputs in S3)"},
    401: {"description": "No, unknown or revoked API key"},
    404: {"description": "No such job for this key, no such item, or no mask was asked for"},
    409: {"description": "The item has not succeeded (yet)"},
    410: {"description": "The job's outputs have expired (retention)"},
}


async def stream(svc: Services, reader: Reader) -> AsyncIterator[bytes]:
    """The reader's bytes, each blocking read in a thread; the reader is closed at the end."""
    try:
        while True:
            async with svc.io_limit:
                chunk = await asyncio.to_thread(reader.read, CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        await asyncio.to_thread(reader.close)


async def open_output(svc: Services, uri: str) -> Reader:
    async with svc.io_limit:
        return await asyncio.to_thread(svc.storage.open, uri)


def item_of(status: JobStatus, index: int, found: list[ItemStatus]) -> ItemStatus:
    """The succeeded item ``index`` (``found``: the job's items from it on); a problem
    saying why there is no output otherwise."""
    total = status.counts.total if status.counts is not None else len(status.items)
    if index >= total or not found:
        raise Problem(404, "not_found", f"job {status.id} has {total} item(s)")
    item = found[0]
    if item.state in ("pending", "running"):
        raise Problem(
            409,
            "not_ready",
            f"item {index} of job {status.id} is {item.state}; try again when it succeeded",
            headers={"Retry-After": "1"},
        )
    if item.state != "succeeded":
        reason = f": {item.error.code}: {item.error.message}" if item.error else ""
        raise Problem(409, "no_output", f"item {index} of job {status.id} {item.state}{reason}")
    if status.expires_at is not None and time.time() > status.expires_at:
        raise Problem(410, "expired", f"the outputs of job {status.id} have expired")
    return item


async def serve(
    svc: Services, key: ApiKey, job_id: str, index: int, which: Literal["output", "mask"]
) -> Response:
    status = await owned(svc, key.id, job_id, items=False)
    found = (
        await svc.store.get_items(job_id, index, index + 1, summary=status)
        if status.items_apart
        else status.items[index : index + 1]
    )
    item = item_of(status, index, found or [])
    uri = item.output if which == "output" else item.mask
    if uri is None:
        raise Problem(
            404,
            "not_found",
            f"job {job_id} has no {which} for item {index}"
            + (" (it was submitted without mask=true)" if which == "mask" else ""),
        )
    expiry = svc.settings.api_presign_expiry
    if urlsplit(uri).scheme == "s3":
        endpoint = svc.settings.api_presign_endpoint_url
        async with svc.io_limit:
            url = await asyncio.to_thread(svc.storage.presign, uri, expiry, endpoint_url=endpoint)
        return RedirectResponse(
            url,
            status_code=302,
            headers={
                "X-Expires-At": str(int(time.time()) + expiry),
                "Cache-Control": f"private, max-age={expiry}",
            },
        )
    reader = await open_output(svc, uri)
    return StreamingResponse(
        stream(svc, reader),
        media_type=reader.content_type,
        headers={"Content-Length": str(reader.size), "Cache-Control": "private, no-cache"},
    )


Index = Annotated[int, Path(ge=0, le=1_000_000, description="The item's index in the job")]


@router.get("/{job_id}/items/{index}/output", responses=RESPONSES, response_class=Response)
async def item_output(job_id: str, index: Index, svc: ServicesDep, key: KeyDep) -> Response:
    """The item's RGBA output: a `302` to a presigned URL (S3), or the bytes (file://)."""
    return await serve(svc, key, job_id, index, "output")


@router.get("/{job_id}/items/{index}/mask", responses=RESPONSES, response_class=Response)
async def item_mask(job_id: str, index: Index, svc: ServicesDep, key: KeyDep) -> Response:
    """The item's grayscale mask (jobs submitted with `mask=true`), as `/output` does."""
    return await serve(svc, key, job_id, index, "mask")
