"""``POST /v1/remove``: one image in, its cut-out out, in one request (the remove.bg /
rembg shape), for callers that do not want to poll.

It is an ordinary job on the queue (the key's scopes, limits, output prefix and retention
apply, and ``GET /v1/jobs/{id}`` shows it); the request waits for it at most
``BEN2Q_API_REMOVE_TIMEOUT`` seconds, then answers the output's bytes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.responses import Response

from ...jobs import CONTENT_TYPES, JobStatus, OutputFormat
from .. import idempotency
from ..bodies import is_json, media_type, read_json
from ..deps import KeyDep, ServicesDep
from ..models import RemoveJson
from ..problems import STATUS_OF, Problem
from ..state import Services
from ..submit import admit, build_request, enqueue, owned
from ..uploads import merge_options, receive_one, receive_raw
from .outputs import open_output, stream

router = APIRouter(prefix="/v1", tags=["remove"])

OPTIONS = ("refine", "format", "mask")


def _follow(job_id: str) -> dict[str, str]:
    return {"X-Job-Id": job_id, "Location": f"/v1/jobs/{job_id}"}


def failure(status: JobStatus) -> Problem:
    """The problem for a job that ended without an output: its item's error code."""
    item = status.items[0]
    error = item.error or status.error
    if status.state == "cancelled" or item.state == "cancelled":
        return Problem(
            409, "cancelled", f"job {status.id} was cancelled", headers=_follow(status.id)
        )
    code = error.code if error else "internal"
    message = error.message if error else f"job {status.id} {status.state}"
    return Problem(STATUS_OF.get(code, 500), code, message, headers=_follow(status.id))


async def answer(svc: Services, status: JobStatus, mask: bool) -> Response:
    """The finished job's output (or mask) as the response body, with its size headers."""
    item = status.items[0]
    if status.state != "succeeded" or item.state != "succeeded":
        raise failure(status)
    uri = item.mask if mask else item.output
    if uri is None:  # a worker that did not write what was asked: not the caller's fault
        raise Problem(500, "internal", f"job {status.id} has no {'mask' if mask else 'output'}")
    reader = await open_output(svc, uri)
    return StreamingResponse(
        stream(svc, reader),
        media_type="image/png" if mask else CONTENT_TYPES[status.options.format],
        headers={
            "X-Job-Id": status.id,
            "X-Width": str(item.width),
            "X-Height": str(item.height),
            "Content-Length": str(reader.size),
            "Cache-Control": "no-store",
        },
    )


@router.post(
    "/remove",
    response_class=Response,
    responses={
        200: {
            "description": "The cut-out (RGBA PNG or lossless WebP), or with `mask=true` the "
            "8-bit grayscale mask PNG; `X-Job-Id`, `X-Width` and `X-Height` describe it",
            "content": {"image/png": {}, "image/webp": {}},
        },
        400: {"description": "A malformed `Idempotency-Key`"},
        401: {"description": "No, unknown or revoked API key"},
        403: {"description": "The input lies outside the key's scopes"},
        409: {"description": "A request with this `Idempotency-Key` is still in flight"},
        413: {"description": "The image is too large (bytes or pixels)"},
        415: {"description": "Not multipart, JSON or an image body"},
        422: {"description": "Invalid request, or the job failed (e.g. `invalid_image`)"},
        429: {"description": "Over the key's rate limit"},
        503: {"description": "Back-pressure, or uploads are not configured"},
        504: {"description": "The job did not end in time; `Location` and `X-Job-Id` follow it"},
    },
    openapi_extra={
        "parameters": [idempotency.PARAMETER],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "format": {"type": "string", "enum": ["png", "webp"]},
                            "refine": {"type": "boolean"},
                            "mask": {"type": "boolean"},
                        },
                    }
                },
                "application/json": {"schema": {"$ref": "#/components/schemas/RemoveJson"}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    },
)
async def remove(
    request: Request,
    svc: ServicesDep,
    key: KeyDep,
    format: Annotated[OutputFormat | None, Query(description="png or webp")] = None,
    refine: Annotated[bool | None, Query(description="Estimate foreground colours")] = None,
    mask: Annotated[
        bool | None, Query(description="Answer the grayscale mask instead of the cut-out")
    ] = None,
) -> Response:
    """Remove the background of one image and answer the result's bytes.

    The image comes as a `multipart/form-data` part named `file`, as the whole body
    (`image/*` or `application/octet-stream`, at most `BEN2Q_MAX_IMAGE_BYTES`), or by URI
    as JSON `{"input": "s3://..." | "https://..."}`.

    Options: `format` (`png` or `webp`), `refine` and `mask`, given as query parameters
    (any body), as form fields (multipart) or as JSON fields; the same option given in
    both places with different values is refused. **`mask=true` answers the mask instead
    of the cut-out**: the alpha matte as an 8-bit grayscale PNG (whatever `format` is),
    like remove.bg's `channels=alpha` and rembg's `only_mask`; the job also keeps the
    cut-out, so `GET /v1/jobs/{id}/items/0/output` still has it.

    Answers `200` with the image and `X-Job-Id`, `X-Width`, `X-Height`. A job that fails
    answers its error's problem (e.g. `422 invalid_image`); one that does not end within
    `BEN2Q_API_REMOVE_TIMEOUT` seconds answers `504 timeout` with `X-Job-Id` and
    `Location: /v1/jobs/{id}`, where it can be followed.
    """
    query = {
        name: value
        for name, value in (("refine", refine), ("format", format), ("mask", mask))
        if value is not None
    }
    async with idempotency.claim(request, svc, key) as idem:
        if idem is not None and idem.stored is not None:  # a retry: the same job's answer
            job_id = (await owned(svc, key.id, idem.stored.job_id)).id
        else:
            kind = media_type(request)
            if kind == "multipart/form-data":
                job = await receive_one(request, svc, key, query)
            elif is_json(request):
                body = await read_json(request, RemoveJson, svc.settings.api_max_json_bytes)
                given = body.model_dump(include=set(OPTIONS), exclude_unset=True)
                create = merge_options({"input": body.input, **given}, query)
                job = await build_request(svc, key, create)
                await admit(request, svc, key, 1)
            elif kind.startswith("image/") or kind == "application/octet-stream":
                job = await receive_raw(request, svc, key, query)
            else:
                raise Problem(
                    415,
                    "unsupported_media_type",
                    "send multipart/form-data with a 'file' part, an image body (image/* or "
                    "application/octet-stream), or application/json with 'input'",
                )
            await enqueue(svc, key, job)
            if idem is not None:  # a retry re-makes the answer from this job
                await idem.save(job.id)
            job_id = job.id
        try:
            status = await svc.client.wait(job_id, timeout=svc.settings.api_remove_timeout)
        except TimeoutError as exc:
            raise Problem(
                504,
                "timeout",
                f"job {job_id} did not end within {svc.settings.api_remove_timeout:g} s; "
                f"follow it at /v1/jobs/{job_id}",
                headers=_follow(job_id),
            ) from exc
        return await answer(svc, status, status.options.mask)
