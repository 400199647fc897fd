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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidRequest

JobKind = Literal["single", "batch"]
JobState = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]
ItemState = Literal["pending", "running", "succeeded", "failed", "cancelled"]
OutputFormat = Literal["png", "webp", "jpeg", "auto"]
Encoding = Literal["png", "webp", "jpeg"]
Channels = Literal["rgba", "alpha"]
WebhookEvent = Literal["final", "progress"]

TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "partial", "failed", "cancelled"})
INPUT_SCHEMES = ("s3", "http", "https", "file")
OUTPUT_SCHEMES = ("s3", "file")
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
MAX_SIDE = 16384
"""The largest ``max_side`` (and the side any output may have: WebP's own limit)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""What a prefix's listing takes as images (case-insensitive); anything else is skipped.
The content is checked when each item is read: a file that is not an image fails alone."""
INLINE_ITEMS = 16
"""Records of jobs with more items keep them apart (``JobStatus.items_apart``): each save
then writes the summary and the items that changed, not the whole list."""
ITEMS_SHOWN = 1000
"""Whole records (the API's job, a final webhook) carry the items of jobs with at most this
many; beyond, ``items`` is empty and readers page (``GET /v1/jobs/{id}/items``)."""
MAX_MARGIN_PX = 10_000
MAX_MARGIN_PERCENT = 100.0
TRANSPARENT = ("none", "transparent")
"""``background`` values that mean no background (as leaving it out does)."""


class ErrorInfo(BaseModel):
    """A failure in a record: a stable code from ``ben2q.errors`` and a human message."""

    code: str
    message: str


class OutputOptions(BaseModel):
    """What the output of each input looks like: the one rendering step (``ben2q.render``)
    applies these after the engine, identically for the library, the CLI, queue jobs and
    the HTTP API. Order: matte clean-up (``mask_smooth``, then ``mask_threshold``) →
    subject box → ``crop`` (+ ``crop_margin``) → ``max_side``/``scale`` → ``background``
    → ``channels`` → encode (``format``, ``quality``). Every default leaves BEN2's output as
    it is: a transparent RGBA PNG of the input's size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: OutputFormat = "png"
    """``png`` (default), ``webp`` (lossless unless ``quality``), ``jpeg`` (alias ``jpg``;
    needs an opaque ``background``), or ``auto``: JPEG when the output is opaque, else PNG."""
    quality: int | None = Field(None, ge=1, le=100)
    """Lossy quality 1-100: JPEG (default 90) or lossy WebP (unset: lossless WebP)."""
    background: str | None = Field(None, max_length=4096)
    """Unset, ``none`` or ``transparent``: a transparent background. A colour (``#RRGGBB``,
    ``#RRGGBBAA``, ``#RGB``, ``rgb()``, CSS names such as ``white``). Or an image's URI
    (``s3://``, ``http(s)://``, ``file://``), fetched like an input and scaled to cover
    the output, centred."""
    channels: Channels = "rgba"
    """``rgba`` (default): the cut-out. ``alpha``: the matte alone, 8-bit grayscale."""
    crop: bool = False
    """Trim the output to the subject's box (pixels with alpha >= 8 of 255)."""
    crop_margin: int | str = "0px"
    """Margin around the cropped subject: pixels (``20`` or ``20px``) or a percentage of
    the subject box's size on each axis (``5%``); at most 10000 px or 100 %. Space beyond
    the image is transparent (or the background)."""
    max_side: int | None = Field(None, ge=1, le=MAX_SIDE)
    """Shrink the output (Lanczos, keeping its aspect) so its longest side is at most this;
    a smaller output is left as it is."""
    scale: float | None = Field(None, gt=0.0, le=4.0)
    """Resize the output by this factor (Lanczos), at most 4; not with ``max_side``."""
    mask_threshold: int | None = Field(None, ge=1, le=255)
    """Make the matte binary: alpha >= this becomes 255, the rest 0. Off by default (BEN2's
    soft edges are its strength)."""
    mask_smooth: bool = False
    """Clear specks and fill pinholes of the matte (see the README, "Output options")."""

    @field_validator("format", mode="before")
    @classmethod
    def _format_alias(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return "jpeg" if value == "jpg" else value
        return value

    @field_validator("background", mode="before")
    @classmethod
    def _background(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.lower() in TRANSPARENT or not value:
                return None
            if "://" in value:
                return validate_input(value, "background", check_local_root=False)
            parse_color(value)
        return value

    @field_validator("crop_margin", mode="before")
    @classmethod
    def _margin(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("a number of pixels or a percentage, not true/false")
        if isinstance(value, int | float | str):
            amount, percent = parse_margin(value)
            return f"{amount:g}%" if percent else f"{amount:g}px"
        return value

    @model_validator(mode="after")
    def _combination(self) -> OutputOptions:
        if self.channels == "alpha":
            if self.background is not None:
                raise InvalidRequest(
                    "background", "channels=alpha writes the matte alone: leave out background"
                )
            if self.format == "jpeg":
                raise InvalidRequest(
                    "format", "channels=alpha is written losslessly: use png, webp or auto"
                )
            if self.quality is not None:
                raise InvalidRequest(
                    "quality", "channels=alpha is written losslessly: leave out quality"
                )
        if self.format == "jpeg" and not self.opaque:
            raise InvalidRequest(
                "format",
                "jpeg has no transparency: give an opaque background (e.g. background=white) "
                "or use png, webp or auto",
            )
        if self.format == "png" and self.quality is not None:
            raise InvalidRequest("quality", "applies to jpeg and webp, not png (lossless)")
        if self.max_side is not None and self.scale is not None:
            raise InvalidRequest("scale", "give max_side or scale, not both")
        if not self.crop and self.margin[0] > 0:
            raise InvalidRequest("crop_margin", "needs crop=true")
        return self

    # --- derived (what the renderer reads) ------------------------------------------------

    @property
    def background_uri(self) -> str | None:
        """The background image's URI, if the background is an image."""
        return self.background if self.background and "://" in self.background else None

    @property
    def background_color(self) -> tuple[int, int, int, int] | None:
        """The background colour as RGBA, if the background is a colour."""
        if self.background is None or self.background_uri is not None:
            return None
        return parse_color(self.background)

    @property
    def opaque(self) -> bool:
        """Whether every output pixel is opaque (an image, or a colour without alpha)."""
        if self.channels == "alpha" or self.background is None:
            return False
        color = self.background_color
        return color is None or color[3] == 255

    @property
    def encoding(self) -> Encoding:
        """The format written: ``auto`` resolved (JPEG when opaque, else PNG)."""
        if self.format == "auto":
            return "jpeg" if self.opaque else "png"
        return self.format

    @property
    def margin(self) -> tuple[float, bool]:
        """``crop_margin`` as (amount, is a percentage)."""
        return parse_margin(self.crop_margin)


class JobOptions(OutputOptions):
    """What to produce for every input of a job: the output options, plus the engine's
    ``refine`` and the extra ``mask`` file."""

    refine: bool = False
    """Estimate foreground colours (blur fusion) instead of keeping the input's."""
    mask: bool = False
    """Also write the output's matte (after clean-up, crop and resize) as a grayscale PNG."""


OPTION_NAMES: frozenset[str] = frozenset(JobOptions.model_fields)


def parse_color(text: str) -> tuple[int, int, int, int]:
    """A CSS colour (``#RRGGBB``, ``#RRGGBBAA``, ``#RGB``, ``rgb()``, ``hsl()``, names) as
    RGBA; ``ValueError`` naming what is wrong."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(text)
    except ValueError as exc:
        raise ValueError(
            f"unknown colour {text[:40]!r}: use #RRGGBB, #RRGGBBAA, rgb(r, g, b) or a CSS "
            "colour name, or an image URI (s3://, http(s)://, file://)"
        ) from exc
    return (*rgb, 255) if len(rgb) == 3 else tuple(rgb)  # type: ignore[return-value]


_MARGIN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(px|%)?\s*$", re.IGNORECASE)


def parse_margin(value: object) -> tuple[float, bool]:
    """``20``, ``"20px"`` or ``"5%"`` as (amount, is a percentage); ``ValueError`` if bad."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        amount, percent = float(value), False
    else:
        match = _MARGIN.match(str(value))
        if match is None:
            if str(value).strip().startswith("-"):
                raise ValueError("must not be negative")
            raise ValueError(f"{str(value)[:40]!r} is not a margin: use 20, 20px or 5%")
        amount, percent = float(match.group(1)), match.group(2) == "%"
    if amount < 0:
        raise ValueError("must not be negative")
    if percent and amount > MAX_MARGIN_PERCENT:
        raise ValueError(f"at most {MAX_MARGIN_PERCENT:g}%")
    if not percent and (amount > MAX_MARGIN_PX or amount != int(amount)):
        raise ValueError(f"a whole number of pixels, at most {MAX_MARGIN_PX}")
    return amount, percent


def job_options(options: object = None, /, **fields: object) -> JobOptions:
    """``JobOptions`` from a mapping or keyword fields (or an ``OutputOptions``, widened);
    ``InvalidRequest`` naming the first bad field."""
    data: dict[str, object] = {}
    if isinstance(options, BaseModel):
        data.update(options.model_dump(exclude_unset=True))
    elif options is not None:
        data.update(options)  # type: ignore[call-overload]
    data.update(fields)
    unknown = sorted(set(data) - OPTION_NAMES)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown option; options are {sorted(OPTION_NAMES)}")
    try:
        return JobOptions.model_validate(data)
    except ValidationError as exc:
        raise request_error(exc) from exc


def request_error(exc: ValidationError) -> InvalidRequest:
    """The first error of a validation as ``InvalidRequest`` naming its field."""
    err = exc.errors(include_url=False)[0]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, InvalidRequest):
        return cause
    loc = err.get("loc") or ("options",)
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return InvalidRequest(str(loc[0]), message)


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
    prefix: str | None = None
    """A batch job's input location (``s3://bucket/photos/``, a ``file://`` folder): the
    worker lists the images under it once, records them as the job's items, and runs them
    as ``inputs``. ``inputs`` is empty in the message as submitted."""


class Box(BaseModel):
    """A rectangle in output pixels: the subject's bounding box."""

    model_config = ConfigDict(frozen=True)

    left: int
    top: int
    width: int
    height: int


class ItemStatus(BaseModel):
    """One input of a job and what became of it."""

    index: int
    input: str
    state: ItemState = "pending"
    output: str | None = None
    mask: str | None = None
    width: int | None = None
    """The output's width in pixels (after crop and resize)."""
    height: int | None = None
    format: Encoding | None = None
    """The output's format (``auto`` resolved)."""
    bytes: int | None = None
    """The output's size in bytes."""
    subject: bool | None = None
    """Whether the matte has a subject (any pixel with alpha >= 8); False: empty."""
    box: Box | None = None
    """The subject's bounding box in output pixels (None when there is no subject)."""
    error: ErrorInfo | None = None
    worker: str | None = None
    """The worker that ran the item (a fanned-out batch job's items spread over many)."""
    duration_ms: float | None = None
    batch_size: int | None = None
    """Images in the forward pass that ran this item (items of other jobs included)."""
    fetch_ms: float | None = None
    """Reading and decoding the input."""
    infer_ms: float | None = None
    """The engine's pass over the chunk this item was in (shared with ``batch_size - 1``)."""
    store_ms: float | None = None
    """Encoding and writing the output (and the mask)."""


class ItemCounts(BaseModel):
    """How many of a job's items have ended, and how (pending and running: the rest)."""

    total: int
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    def add(self, state: str, n: int = 1) -> None:
        if state in ("succeeded", "failed", "cancelled"):
            setattr(self, state, getattr(self, state) + n)

    @classmethod
    def of(cls, items: Sequence[ItemStatus]) -> ItemCounts:
        counts = cls(total=len(items))
        for item in items:
            counts.add(item.state)
        return counts


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
    counts: ItemCounts | None = None
    """Items ended so far, by outcome (None only in records written before it existed)."""
    prefix: str | None = None
    """Where a batch job's items were listed from (see ``JobRequest.prefix``); until the
    listing is recorded, ``counts.total`` is 0."""
    items_apart: bool = False
    """The items are stored apart from this summary (a job of more than ``INLINE_ITEMS``).
    Then events carry only the items that changed, and a whole record (``Client.get``; the
    API up to ``ITEMS_SHOWN`` items) is assembled on reading; page the rest."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def queued(cls, request: JobRequest) -> JobStatus:
        """The first record of a freshly submitted job."""
        n = len(request.inputs)
        return cls(
            id=request.id,
            kind=request.kind,
            items=[ItemStatus(index=i, input=uri) for i, uri in enumerate(request.inputs)],
            counts=ItemCounts(total=n),
            items_apart=n > INLINE_ITEMS or request.prefix is not None,
            prefix=request.prefix,
            options=request.options,
            output=request.output,
            created_at=request.submitted_at,
            webhook=WebhookState(url=request.webhook_url, events=request.webhook_events)
            if request.webhook_url
            else None,
            tenant=request.tenant,
            expires_at=request.expires_at,
        )

    @property
    def whole(self) -> bool:
        """Whether ``items`` holds every item of the job (not a summary or an event)."""
        return self.counts is None or len(self.items) == self.counts.total

    def recount(self) -> JobStatus:
        """Derive ``counts`` from ``items`` (a whole record only)."""
        if self.whole:
            self.counts = ItemCounts.of(self.items)
        return self

    def summary(self) -> JobStatus:
        """This record without its items (what is stored of a job that keeps them apart)."""
        return self.model_copy(update={"items": []})

    def settle(self) -> JobStatus:
        """Derive the final state from the items: all good, some good, or none (from the
        counts where the record holds only some items)."""
        counts = self.recount().counts  # a summary keeps the counts it has
        assert counts is not None  # a whole record was just counted
        ok, total = counts.succeeded, counts.total
        if total and ok == total:
            self.state = "succeeded"
        elif ok:
            self.state = "partial"
        else:
            self.state = "failed"
            first = next((item.error for item in self.items if item.error is not None), None)
            if self.error is None and first is not None:
                self.error = first
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


def _check_file_uri(uri: str, field: str, local_root: str | None, need_root: bool = True) -> None:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise InvalidRequest(field, f"file:// URIs name no host, got {parts.netloc!r}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidRequest(field, "file:// URIs need an absolute path")
    if ".." in PurePosixPath(path).parts:
        raise InvalidRequest(field, "'..' is not allowed in file:// paths")
    if local_root is None:
        if not need_root:
            return
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


def validate_input(
    uri: object, field: str, *, local_root: str | None = None, check_local_root: bool = True
) -> str:
    """Check one input URI's form (not its existence); return it. ``check_local_root=False``
    checks a ``file://`` URI's form only (where the local root is not known yet)."""
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
        _check_file_uri(uri, field, local_root, check_local_root)
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


def validate_prefix(uri: object, *, local_root: str | None = None) -> str:
    """Check a batch job's input location (``s3://bucket/some/prefix/``, or a ``file://``
    folder inside the local root); returned ending in ``/`` (``photos`` must not take
    ``photos2/``)."""
    field = "prefix"
    if not isinstance(uri, str) or not uri:
        raise InvalidRequest(field, "must be an s3:// or file:// location")
    if len(uri) > 1024:
        raise InvalidRequest(field, "at most 1024 characters")
    parts = _split(uri, field)
    scheme = parts.scheme.lower()
    if scheme not in OUTPUT_SCHEMES:
        raise InvalidRequest(
            field, f"unsupported scheme {scheme or '(none)'!r}; use s3:// or file://"
        )
    if parts.query or parts.fragment:
        raise InvalidRequest(field, "a location has no query or fragment")
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
    prefix: object = None,
    options: object = None,
    webhook_url: object = None,
    webhook_events: object = ("final",),
    max_items: int = 100_000,
    local_root: str | None = None,
    job_id: str | None = None,
    tenant: str | None = None,
    expires_at: float | None = None,
    **fields: object,
) -> JobRequest:
    """Validate a submission and build its ``JobRequest``; ``InvalidRequest`` names the field.

    The job's options come as ``options`` (a ``JobOptions``/``OutputOptions`` or a mapping)
    and/or as keyword fields (``refine=True, format="jpeg", background="white"``...)."""
    field = "input" if kind == "single" else "inputs"
    if job_id is not None and not re.fullmatch(JOB_ID_PATTERN, str(job_id)):
        raise InvalidRequest("job_id", "must be letters, digits, '_' or '-' (one path segment)")
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise InvalidRequest(field, "must be a list of URIs")
    if prefix is not None:
        if kind != "batch":
            raise InvalidRequest("prefix", "only a batch job takes a prefix")
        if inputs:
            raise InvalidRequest("prefix", "give inputs or a prefix, not both")
        prefix = validate_prefix(prefix, local_root=local_root)
    elif not inputs:
        raise InvalidRequest(field, "a batch needs at least one input")
    if kind == "single" and len(inputs) != 1:
        raise InvalidRequest(field, "a single job takes exactly one input")
    if len(inputs) > max_items:
        raise InvalidRequest(field, f"{len(inputs)} inputs; at most {max_items} per batch")
    checked = [
        validate_input(uri, field if kind == "single" else f"inputs[{i}]", local_root=local_root)
        for i, uri in enumerate(inputs)
    ]
    for name in ("refine", "mask", "crop", "mask_smooth"):
        if name in fields and not isinstance(fields[name], bool):
            raise InvalidRequest(name, f"must be true or false, got {fields[name]!r}")
    opts = job_options(options, **fields)
    if opts.background_uri is not None:
        validate_input(opts.background_uri, "background", local_root=local_root)
    events = _check_webhook(webhook_url, webhook_events)
    return JobRequest(
        id=job_id or new_job_id(),
        kind=kind,
        inputs=checked,
        output=validate_output(output, local_root=local_root),
        options=opts,
        submitted_at=time.time(),
        webhook_url=webhook_url,  # type: ignore[arg-type]
        webhook_events=events,
        tenant=tenant,
        expires_at=expires_at,
        prefix=prefix,  # type: ignore[arg-type]
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


def output_uri(request: JobRequest, index: int, *, offset: int = 0) -> str:
    """Where item ``index``'s RGBA output goes (deterministic, see the module docstring).

    ``offset``: ``request`` is the chunk of a batch job whose ``inputs[0]`` is the job's
    item ``offset`` (the name carries the job's item number)."""
    ext = EXTENSIONS[request.options.encoding]
    stem = _safe_stem(request.inputs[index])
    return f"{request.output}{request.id}/{offset + index:04d}-{stem}.{ext}"


def mask_uri(request: JobRequest, index: int, *, offset: int = 0) -> str:
    """Where item ``index``'s grayscale mask goes (``offset`` as in ``output_uri``)."""
    stem = _safe_stem(request.inputs[index])
    return f"{request.output}{request.id}/{offset + index:04d}-{stem}.mask.png"
