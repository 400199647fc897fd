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

from ...jobs import CONTENT_TYPES, JobOptions, JobStatus
from .. import idempotency
from ..bodies import is_json, media_type, read_json
from ..deps import KeyDep, ServicesDep
from ..models import RemoveJson, RemoveQuery
from ..problems import STATUS_OF, Problem
from ..state import Services
from ..submit import admit, build_request, enqueue, owned
from ..uploads import merge_options, receive_one, receive_raw
from .outputs import open_output, stream

router = APIRouter(prefix="/v1", tags=["remove"])

OPTIONS = frozenset(JobOptions.model_fields)

FORM_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        **JobOptions.model_json_schema()["properties"],
    },
}


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
    """The finished job's output (or mask) as the response body, with headers describing
    it: ``X-Width``/``X-Height`` and, when there is a subject, its box in output pixels as
    remove.bg names it (``X-Foreground-Left/Top/Width/Height``)."""
    item = status.items[0]
    if status.state != "succeeded" or item.state != "succeeded":
        raise failure(status)
    uri = item.mask if mask else item.output
    if uri is None:  # a worker that did not write what was asked: not the caller's fault
        raise Problem(500, "internal", f"job {status.id} has no {'mask' if mask else 'output'}")
    reader = await open_output(svc, uri)
    headers = {
        "X-Job-Id": status.id,
        "X-Width": str(item.width),
        "X-Height": str(item.height),
        "X-Subject": "true" if item.subject else "false",
        "Content-Length": str(reader.size),
        "Cache-Control": "no-store",
    }
    if item.box is not None:
        headers.update(
            {
                "X-Foreground-Left": str(item.box.left),
                "X-Foreground-Top": str(item.box.top),
                "X-Foreground-Width": str(item.box.width),
                "X-Foreground-Height": str(item.box.height),
            }
        )
    encoding = item.format or status.options.encoding
    return StreamingResponse(
        stream(svc, reader),
        media_type="image/png" if mask else CONTENT_TYPES[encoding],
        headers=headers,
    )


@router.post(
    "/remove",
    response_class=Response,
    responses={
        200: {
            "description": "The output (PNG, WebP or JPEG, as the options make it), or with "
            "`mask=true` the 8-bit grayscale matte PNG; `X-Job-Id`, `X-Width`, `X-Height`, "
            "`X-Subject` and (with a subject) `X-Foreground-Left/Top/Width/Height` describe it",
            "content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}},
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
                "multipart/form-data": {"schema": FORM_SCHEMA},
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
    query: Annotated[RemoveQuery, Query()],
) -> Response:
    """Remove the background of one image and answer the result's bytes.

    The image comes as a `multipart/form-data` part named `file`, as the whole body
    (`image/*` or `application/octet-stream`, at most `BEN2Q_MAX_IMAGE_BYTES`), or by URI
    as JSON `{"input": "s3://..." | "https://..."}`.

    Options: the job options (`background`, `format`, `quality`, `channels`, `crop`,
    `crop_margin`, `max_side`, `scale`, `mask_threshold`, `mask_smooth`, `refine`,
    `mask`; see the README, "Output options"), given as query parameters (any body), as
    form fields (multipart) or as JSON fields; the same option given in both places with
    different values is refused. **`mask=true` answers the matte instead of the output**
    (an 8-bit grayscale PNG whatever `format` is); the job also keeps the output, so
    `GET /v1/jobs/{id}/items/0/output` still has it. `channels=alpha` makes the matte the
    output itself.

    Answers `200` with the image and `X-Job-Id`, `X-Width`, `X-Height`, `X-Subject`, and
    the subject's box in output pixels as `X-Foreground-Left`, `-Top`, `-Width`,
    `-Height` (remove.bg's names) when there is one. A job that fails
    answers its error's problem (e.g. `422 invalid_image`); one that does not end within
    `BEN2Q_API_REMOVE_TIMEOUT` seconds answers `504 timeout` with `X-Job-Id` and
    `Location: /v1/jobs/{id}`, where it can be followed.
    """
    given = query.given()
    async with idempotency.claim(request, svc, key) as idem:
        if idem is not None and idem.stored is not None:  # a retry: the same job's answer
            job_id = (await owned(svc, key.id, idem.stored.job_id)).id
        else:
            kind = media_type(request)
            if kind == "multipart/form-data":
                job = await receive_one(request, svc, key, given)
            elif is_json(request):
                body = await read_json(request, RemoveJson, svc.settings.api_max_json_bytes)
                options = body.model_dump(include=set(OPTIONS), exclude_unset=True)
                create = merge_options({"input": body.input, **options}, given)
                job = await build_request(svc, key, create)
                await admit(request, svc, key, 1)
            elif kind.startswith("image/") or kind == "application/octet-stream":
                job = await receive_raw(request, svc, key, given)
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
