"""Job requests and job statuses: the typed JSON that crosses the queue. No I/O here.

A producer builds a ``JobRequest`` with ``make_request`` (which validates every field and
raises ``InvalidRequest`` naming the field before anything is enqueued); the worker reads it
back with ``JobRequest.model_validate``. Job records are ``JobStatus`` documents.

Output locations are deterministic: item ``i`` of job ``J`` with input ``.../name.jpg`` is
written to ``<output>/<J>/<i:04d>-name.<ext>`` (and its mask to ``...-name.mask.png``), so a
redelivered job overwrites its own outputs and equal file names never collide.
"""

from __future__ import annotations

import posixpath
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequest

JobKind = Literal["single", "batch"]
JobState = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]
ItemState = Literal["pending", "running", "succeeded", "failed", "cancelled"]
OutputFormat = Literal["png", "webp"]
WebhookEvent = Literal["final", "progress"]

TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "partial", "failed", "cancelled"})
INPUT_SCHEMES = ("s3", "http", "https", "file")
OUTPUT_SCHEMES = ("s3", "file")
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp"}


class ErrorInfo(BaseModel):
    """A failure in a record: a stable code from ``ben2q.errors`` and a human message."""

    code: str
    message: str


class JobOptions(BaseModel):
    """What to produce for every input of a job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    refine: bool = False
    """Estimate foreground colours (blur fusion) instead of keeping the input's."""
    format: OutputFormat = "png"
    """``png`` or lossless ``webp``; RGBA either way."""
    mask: bool = False
    """Also write the alpha as an 8-bit grayscale PNG."""


JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
"""Job ids are one safe path segment: they are part of every output key and file path."""


class JobRequest(BaseModel):
    """One job as enqueued: the message body of the ``ben2q.*`` tasks."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=JOB_ID_PATTERN)
    kind: JobKind
    inputs: list[str]
    output: str
    options: JobOptions = JobOptions()
    submitted_at: float
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] = ["final"]
    tenant: str | None = Field(None, pattern=JOB_ID_PATTERN)
    """The API key (its id) that made the job; None for jobs sent with the broker's
    credentials. Only that key sees the job through the HTTP API."""
    expires_at: float | None = None
    """When the job's outputs (and uploads) expire under the API's retention; None: kept."""


class ItemStatus(BaseModel):
    """One input of a job and what became of it."""

    index: int
    input: str
    state: ItemState = "pending"
    output: str | None = None
    mask: str | None = None
    width: int | None = None
    height: int | None = None
    error: ErrorInfo | None = None
    duration_ms: float | None = None
    batch_size: int | None = None
    """Images in the forward pass that ran this item (items of other jobs included)."""
    fetch_ms: float | None = None
    """Reading and decoding the input."""
    infer_ms: float | None = None
    """The engine's pass over the chunk this item was in (shared with ``batch_size - 1``)."""
    store_ms: float | None = None
    """Encoding and writing the output (and the mask)."""


class WebhookAttempt(BaseModel):
    """One delivery attempt of one webhook event, as recorded on the job."""

    event: str
    msg_id: str
    attempt: int
    at: float
    status_code: int | None = None
    error: str | None = None
    outcome: Literal["delivered", "retry", "give_up"]
    duration_ms: float | None = None


class WebhookState(BaseModel):
    """Where a job's events go and what became of each delivery attempt."""

    url: str
    events: list[WebhookEvent] = ["final"]
    attempts: list[WebhookAttempt] = []
    delivered: bool = False
    """True once the final event was accepted (2xx)."""


class JobStatus(BaseModel):
    """The record of a job, as stored in Redis and returned by ``Client.get``."""

    id: str
    kind: JobKind
    state: JobState = "queued"
    progress: float = Field(0.0, ge=0.0, le=1.0)
    items: list[ItemStatus]
    options: JobOptions = JobOptions()
    output: str
    error: ErrorInfo | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempts: int = 0
    """Deliveries so far: more than 1 means the job was redelivered or retried."""
    queue_wait_ms: float | None = None
    run_ms: float | None = None
    webhook: WebhookState | None = None
    tenant: str | None = None
    """The API key id that made the job (see ``JobRequest.tenant``)."""
    expires_at: float | None = None
    """Outputs are available until then (epoch seconds), when retention applies."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def queued(cls, request: JobRequest) -> JobStatus:
        """The first record of a freshly submitted job."""
        return cls(
            id=request.id,
            kind=request.kind,
            items=[ItemStatus(index=i, input=uri) for i, uri in enumerate(request.inputs)],
            options=request.options,
            output=request.output,
            created_at=request.submitted_at,
            webhook=WebhookState(url=request.webhook_url, events=request.webhook_events)
            if request.webhook_url
            else None,
            tenant=request.tenant,
            expires_at=request.expires_at,
        )

    def settle(self) -> JobStatus:
        """Derive the final state from the items: all good, some good, or none."""
        ok = sum(1 for item in self.items if item.state == "succeeded")
        if ok == len(self.items):
            self.state = "succeeded"
        elif ok:
            self.state = "partial"
        else:
            self.state = "failed"
            if self.error is None and self.items and self.items[0].error is not None:
                self.error = self.items[0].error
        self.progress = 1.0
        return self


# --- validation ------------------------------------------------------------------------

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def new_job_id() -> str:
    """A random job id (32 hex digits), also used as the Celery task id."""
    return uuid.uuid4().hex


def _split(uri: str, field: str) -> SplitResult:
    """``urlsplit`` that turns a malformed URI (bad IPv6 literal, port out of range, text
    that is not valid Unicode) into ``InvalidRequest`` instead of a bare ``ValueError``."""
    try:
        uri.encode("utf-8")  # lone surrogates would break the JSON of the queue and records
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError as exc:  # UnicodeEncodeError too
        raise InvalidRequest(field, f"malformed URI: {exc}") from exc
    return parts


def _check_file_uri(uri: str, field: str, local_root: str | None) -> None:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise InvalidRequest(field, f"file:// URIs name no host, got {parts.netloc!r}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidRequest(field, "file:// URIs need an absolute path")
    if ".." in PurePosixPath(path).parts:
        raise InvalidRequest(field, "'..' is not allowed in file:// paths")
    if local_root is None:
        raise InvalidRequest(field, "file:// needs a local root (BEN2Q_LOCAL_ROOT)")
    root = posixpath.normpath(str(local_root))
    if posixpath.commonpath([root, posixpath.normpath(path)]) != root:
        raise InvalidRequest(field, f"file:// path is outside the local root {root}")


def _check_s3_uri(uri: str, field: str, *, need_key: bool) -> None:
    parts = urlsplit(uri)
    if not _BUCKET.match(parts.netloc or ""):
        raise InvalidRequest(field, f"invalid S3 bucket name {parts.netloc!r}")
    key = parts.path.lstrip("/")
    if need_key and (not key or key.endswith("/")):
        raise InvalidRequest(field, "an s3:// input needs an object key")
    if ".." in PurePosixPath(key).parts:
        raise InvalidRequest(field, "'..' is not allowed in S3 keys")


def validate_input(uri: object, field: str, *, local_root: str | None = None) -> str:
    """Check one input URI's form (not its existence); return it."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidRequest(field, "must be a non-empty string URI")
    if len(uri) > 4096:
        raise InvalidRequest(field, "URI longer than 4096 characters")
    scheme = _split(uri, field).scheme.lower()
    if scheme not in INPUT_SCHEMES:
        raise InvalidRequest(
            field,
            f"unsupported URI scheme {scheme or '(none)'!r}; use s3://, http(s):// or file://",
        )
    if scheme == "s3":
        _check_s3_uri(uri, field, need_key=True)
    elif scheme == "file":
        _check_file_uri(uri, field, local_root)
    elif not urlsplit(uri).hostname:
        raise InvalidRequest(field, "URL has no host")
    return uri


def validate_output(uri: object, *, local_root: str | None = None) -> str:
    """Check the output location (``s3://bucket/prefix/`` or a ``file://`` directory)."""
    field = "output"
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidRequest(field, "must be an s3:// or file:// location")
    scheme = _split(uri, field).scheme.lower()
    if scheme not in OUTPUT_SCHEMES:
        raise InvalidRequest(
            field, f"unsupported scheme {scheme or '(none)'!r}; use s3:// or file://"
        )
    if scheme == "s3":
        _check_s3_uri(uri, field, need_key=False)
    else:
        _check_file_uri(uri, field, local_root)
    return uri if uri.endswith("/") else uri + "/"


def make_request(
    kind: JobKind,
    inputs: Sequence[str],
    output: str,
    *,
    refine: object = False,
    format: object = "png",
    mask: object = False,
    webhook_url: object = None,
    webhook_events: object = ("final",),
    max_items: int = 1000,
    local_root: str | None = None,
    job_id: str | None = None,
    tenant: str | None = None,
    expires_at: float | None = None,
) -> JobRequest:
    """Validate a submission and build its ``JobRequest``; ``InvalidRequest`` names the field."""
    field = "input" if kind == "single" else "inputs"
    if job_id is not None and not re.fullmatch(JOB_ID_PATTERN, str(job_id)):
        raise InvalidRequest("job_id", "must be letters, digits, '_' or '-' (one path segment)")
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise InvalidRequest(field, "must be a list of URIs")
    if not inputs:
        raise InvalidRequest(field, "a batch needs at least one input")
    if kind == "single" and len(inputs) != 1:
        raise InvalidRequest(field, "a single job takes exactly one input")
    if len(inputs) > max_items:
        raise InvalidRequest(field, f"{len(inputs)} inputs; at most {max_items} per batch")
    checked = [
        validate_input(uri, field if kind == "single" else f"inputs[{i}]", local_root=local_root)
        for i, uri in enumerate(inputs)
    ]
    for name, value in (("refine", refine), ("mask", mask)):
        if not isinstance(value, bool):
            raise InvalidRequest(name, f"must be true or false, got {value!r}")
    if not isinstance(format, str) or format not in CONTENT_TYPES:
        raise InvalidRequest("format", f"must be one of {sorted(CONTENT_TYPES)}, got {format!r}")
    events = _check_webhook(webhook_url, webhook_events)
    return JobRequest(
        id=job_id or new_job_id(),
        kind=kind,
        inputs=checked,
        output=validate_output(output, local_root=local_root),
        options=JobOptions(refine=refine, format=format, mask=mask),  # type: ignore[arg-type]
        submitted_at=time.time(),
        webhook_url=webhook_url,  # type: ignore[arg-type]
        webhook_events=events,
        tenant=tenant,
        expires_at=expires_at,
    )


def _check_webhook(url: object, events: object) -> list[WebhookEvent]:
    if url is None:
        return ["final"]
    if not isinstance(url, str) or _split(url, "webhook_url").scheme.lower() not in (
        "http",
        "https",
    ):
        raise InvalidRequest("webhook_url", "must be an http:// or https:// URL")
    if not urlsplit(url).hostname or len(url) > 2048:
        raise InvalidRequest("webhook_url", "must name a host (and be at most 2048 characters)")
    if (
        isinstance(events, str)
        or not isinstance(events, Sequence)
        or not events
        or not all(isinstance(event, str) for event in events)
    ):
        raise InvalidRequest("webhook_events", "must be a non-empty list of 'final', 'progress'")
    unknown = set(events) - {"final", "progress"}
    if unknown:
        raise InvalidRequest("webhook_events", f"unknown events {sorted(map(str, unknown))}")
    return sorted(set(events))  # type: ignore[arg-type]


def _safe_stem(uri: str) -> str:
    name = PurePosixPath(unquote(urlsplit(uri).path)).stem
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._")[:100]
    return safe or "image"


def output_uri(request: JobRequest, index: int) -> str:
    """Where item ``index``'s RGBA output goes (deterministic, see the module docstring)."""
    ext = request.options.format
    return f"{request.output}{request.id}/{index:04d}-{_safe_stem(request.inputs[index])}.{ext}"


def mask_uri(request: JobRequest, index: int) -> str:
    """Where item ``index``'s grayscale mask goes."""
    stem = _safe_stem(request.inputs[index])
    return f"{request.output}{request.id}/{index:04d}-{stem}.mask.png"
