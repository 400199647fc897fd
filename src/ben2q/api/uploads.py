"""Uploads (``multipart/form-data`` and raw image bodies) for ``POST /v1/jobs`` and
``POST /v1/remove``.

Bodies may be gigabytes, so nothing here holds a whole one: python-multipart's streaming
parser reads ``request.stream()`` chunk by chunk, each ``file`` part is spooled (memory up
to 1 MiB, then a temporary file) and refused the moment it passes ``max_image_bytes``,
there are at most ``api_max_upload_files`` of them, and form fields are bounded in size and
number. Each problem names its part (``file[2]`` is the pointer ``/file/2``; indices are
the job's item indices). Only then is each image's header read (Pillow ``Image.open``, no
pixels decoded) to refuse non-images and images over ``max_image_pixels``; then the request
is validated like a JSON one, back-pressure and the image limit are applied, and the files
are written to ``<api_upload_location>/<key id>/<job id>/<index>-<name>``: the job id is
chosen first, so the job's inputs can be those URIs.

When a request is refused before its body is read to the end, up to ``DRAIN_BYTES`` more are
read and dropped, so that the client (still sending) gets to read the answer instead of a
connection reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import tempfile
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from ..errors import ImageTooLarge, InvalidImage
from ..imageio import _allowed_formats, _pillow_errors, configure_pillow
from ..jobs import OPTION_NAMES, JobRequest, new_job_id
from ..keys import ApiKey
from .bodies import validation_problem
from .models import JobCreate
from .problems import Problem, invalid, pointer
from .state import Services
from .submit import admit, build_request

SPOOL_MEMORY = 1024 * 1024
"""Bytes of one upload kept in memory before it is spooled to a temporary file."""
FIELD_BYTES = 8 * 1024
"""Bytes of one form field (an option) at most."""
MAX_FIELDS = 32
"""Form fields (non-file parts) of one request at most."""
PART_OVERHEAD = 16 * 1024
"""Allowance per part for its boundary and headers when judging ``Content-Length``."""
DRAIN_BYTES = 16 * 1024 * 1024
DRAIN_SECONDS = 2.0

REMOVE_FIELDS = OPTION_NAMES
"""Form fields of ``POST /v1/remove``: the job options; ``/v1/jobs`` takes ``JOB_FIELDS``."""
JOB_FIELDS = OPTION_NAMES | {"output", "webhook_url", "webhook_events"}
LIST_FIELDS = frozenset({"webhook_events"})
"""Fields that may repeat (or hold a comma-separated list)."""


class _Spool:
    """One upload's bytes: in memory up to ``SPOOL_MEMORY``, then in a temporary file
    (written from a thread, so a slow disk does not stall the event loop)."""

    def __init__(self) -> None:
        self.memory = bytearray()
        self.file: IO[bytes] | None = None
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.file is None and len(self.memory) + len(data) <= SPOOL_MEMORY:
            self.memory += data
            return
        if self.file is None:
            self.file = await asyncio.to_thread(tempfile.TemporaryFile)
            data, self.memory = bytes(self.memory) + data, bytearray()
        await asyncio.to_thread(self.file.write, data)

    def reader(self) -> IO[bytes]:
        """A file object over the whole upload, at its start (call from a thread)."""
        if self.file is None:
            return io.BytesIO(self.memory)
        self.file.flush()
        self.file.seek(0)
        return self.file

    def read_all(self) -> bytes:
        """The upload's bytes (call from a thread)."""
        return self.reader().read()

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


@dataclass
class Upload:
    """One received ``file`` part (or a raw body): its bytes and what its header says."""

    index: int
    filename: str
    spool: _Spool = field(default_factory=_Spool)
    format: str | None = None
    width: int = 0
    height: int = 0
    raw: bool = False
    """The whole request body, not a form part (problems then name ``/``)."""

    @property
    def part(self) -> str:
        return "/" if self.raw else f"file[{self.index}]"


@dataclass
class Form:
    """A parsed upload request: its files, spooled, and its (bounded) text fields."""

    files: list[Upload] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)

    def close(self) -> None:
        for upload in self.files:
            upload.spool.close()


# --- problems ------------------------------------------------------------------------------


def malformed(detail: str) -> Problem:
    """400 for a body that is not well-formed multipart (syntax, not content)."""
    return Problem(400, "invalid_multipart", detail)


def part_problem(status: int, code: str, part: str, message: str) -> Problem:
    detail = message if part == "/" else f"{part}: {message}"
    return Problem(status, code, detail, errors=[{"pointer": pointer(part), "detail": message}])


def upload_location(svc: Services) -> str:
    """The upload location (ends with '/'); 503 when this deployment takes no uploads."""
    location = svc.settings.api_upload_location
    if not location:
        raise Problem(
            503,
            "unavailable",
            "this server takes no uploads (BEN2Q_API_UPLOAD_LOCATION is unset); "
            "submit input URIs as JSON instead",
        )
    return location if location.endswith("/") else location + "/"


# --- reading the body ----------------------------------------------------------------------


class _Parts:
    """python-multipart callbacks that sort parts into a ``Form`` with every limit applied.

    Callbacks are synchronous, so file data is queued in ``pending`` and written by the
    async reader after each chunk; limits raise ``Problem`` from inside the callbacks.
    """

    def __init__(self, form: Form, *, fields: Collection[str], max_files: int, limit: int):
        self.form = form
        self.allowed = fields
        self.max_files = max_files
        self.limit = limit
        self.pending: list[tuple[Upload, bytes]] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._name = b""
        self._value = b""
        self._upload: Upload | None = None
        self._field: str | None = None
        self._text = bytearray()
        self._fields = 0

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._headers, self._upload, self._field = {}, None, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.strip().lower()] = self._value.strip()
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise malformed("a part has no Content-Disposition header")
        kind, params = parse_options_header(disposition)
        raw_name = params.get(b"name")
        if kind.lower() != b"form-data" or raw_name is None:
            raise malformed("every part needs 'Content-Disposition: form-data; name=...'")
        name = raw_name.decode("utf-8", "replace")
        if name == "file":
            index = len(self.form.files)
            if index >= self.max_files:
                raise part_problem(
                    413,
                    "payload_too_large",
                    f"file[{index}]",
                    f"at most {self.max_files} files per request",
                )
            filename = params.get(b"filename", b"").decode("utf-8", "replace")
            self._upload = Upload(index, filename)
            self.form.files.append(self._upload)
            return
        if name not in self.allowed:
            expected = ", ".join(["file", *sorted(self.allowed)])
            raise invalid(name or "/", f"unknown form field; expected {expected}")
        self._fields += 1
        if self._fields > MAX_FIELDS:
            raise part_problem(
                413, "payload_too_large", name, f"at most {MAX_FIELDS} form fields per request"
            )
        if name in self.form.fields and name not in LIST_FIELDS:
            raise invalid(name, "given more than once")
        self._field, self._text = name, bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        if self._upload is not None:
            upload = self._upload
            queued = sum(len(chunk) for u, chunk in self.pending if u is upload)
            if upload.spool.size + queued + size > self.limit:
                raise part_problem(
                    413,
                    "image_too_large",
                    upload.part,
                    f"over the limit of {self.limit} bytes per image",
                )
            self.pending.append((upload, data[start:end]))
        elif self._field is not None:
            if len(self._text) + size > FIELD_BYTES:
                raise part_problem(
                    413, "payload_too_large", self._field, f"over {FIELD_BYTES} bytes"
                )
            self._text += data[start:end]

    def on_part_end(self) -> None:
        if self._field is not None:
            try:
                text = self._text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise invalid(self._field, "not valid UTF-8") from exc
            self.form.fields.setdefault(self._field, []).append(text)
        self._upload, self._field = None, None

    def on_end(self) -> None:
        self.ended = True


def _boundary(request: Request) -> bytes:
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise malformed("multipart/form-data needs a boundary parameter in Content-Type")
    if len(boundary) > 70:  # RFC 2046's bound
        raise malformed("the multipart boundary is longer than 70 characters")
    return boundary


def _check_declared(request: Request, ceiling: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > ceiling:
        raise Problem(
            413,
            "payload_too_large",
            f"the body ({declared} bytes) is over what the allowed files can add up to "
            f"({ceiling} bytes)",
        )


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop up to ``DRAIN_BYTES`` more (bounded in time), see the module doc."""
    seen = 0
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in chunks:
                seen += len(chunk)
                if seen > DRAIN_BYTES:
                    break


async def read_form(
    request: Request, svc: Services, *, fields: Collection[str], max_files: int
) -> Form:
    """Parse a multipart body into a ``Form`` under every limit (see the module doc)."""
    limit = svc.settings.max_image_bytes
    boundary = _boundary(request)
    _check_declared(
        request, max_files * (limit + PART_OVERHEAD) + MAX_FIELDS * (FIELD_BYTES + PART_OVERHEAD)
    )
    form = Form()
    parts = _Parts(form, fields=fields, max_files=max_files, limit=limit)
    chunks = request.stream().__aiter__()
    try:
        try:
            parser = MultipartParser(boundary, parts.callbacks())
        except FormParserError as exc:
            raise malformed(f"bad multipart boundary: {exc}") from exc
        try:
            async for chunk in chunks:
                parser.write(chunk)
                for upload, data in parts.pending:
                    await upload.spool.write(data)
                parts.pending.clear()
                if parts.ended:
                    break
            parser.finalize()
        except FormParserError as exc:
            raise malformed(f"malformed multipart body: {exc}") from exc
        except ClientDisconnect as exc:
            raise malformed("the client closed the connection before the body ended") from exc
        if not parts.ended:
            raise malformed("the multipart body ended before its closing boundary (truncated)")
    except Problem:
        form.close()
        await _drain(chunks)
        raise
    except BaseException:
        form.close()
        raise
    return form


# --- checking and storing --------------------------------------------------------------------


def _probe(upload: Upload, svc: Services) -> None:
    """Read the image's header only: its format and size (no pixels are decoded)."""
    configure_pillow(svc.settings)
    if upload.spool.size == 0:
        raise part_problem(422, "invalid_image", upload.part, "empty file")
    try:
        with _pillow_errors(), Image.open(upload.spool.reader(), formats=_allowed_formats()) as img:
            upload.format = img.format
            upload.width, upload.height = img.size
    except ImageTooLarge as exc:
        raise part_problem(413, "image_too_large", upload.part, exc.message) from exc
    except InvalidImage as exc:
        raise part_problem(422, "invalid_image", upload.part, exc.message) from exc
    pixels = upload.width * upload.height
    if pixels <= 0:
        raise part_problem(422, "invalid_image", upload.part, "the image has no pixels")
    if pixels > svc.settings.max_image_pixels:
        raise part_problem(
            413,
            "image_too_large",
            upload.part,
            f"{upload.width}x{upload.height} = {pixels} pixels, over the limit of "
            f"{svc.settings.max_image_pixels} pixels",
        )


async def probe_all(svc: Services, uploads: list[Upload]) -> None:
    for upload in uploads:
        await asyncio.to_thread(_probe, upload, svc)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _ext_of(fmt: str) -> str:
    for ext, name in Image.registered_extensions().items():
        if name == fmt:
            return ext.lstrip(".")
    return fmt.lower()


def safe_name(upload: Upload) -> str:
    """The client's file name as one harmless path segment, with the image's extension."""
    base = re.split(r"[/\\]", upload.filename)[-1]
    name = _UNSAFE.sub("_", base).strip("._")[:100] or "upload"
    if "." not in name and upload.format:
        name += "." + _ext_of(upload.format)
    return name


def upload_uri(location: str, key: ApiKey, job_id: str, upload: Upload) -> str:
    return f"{location}{key.id}/{job_id}/{upload.index}-{safe_name(upload)}"


async def store(svc: Services, uploads: list[Upload], uris: list[str], job_id: str) -> None:
    """Write every upload (concurrently, at most ``svc.io_limit`` blocking calls at once)."""

    def write(upload: Upload, uri: str) -> None:
        mime = Image.MIME.get(upload.format or "", "application/octet-stream")
        meta = {"job-id": job_id, "item": str(upload.index)}
        svc.storage.write(uri, upload.spool.read_all(), content_type=mime, metadata=meta)

    async def one(upload: Upload, uri: str) -> None:
        async with svc.io_limit:
            await asyncio.to_thread(write, upload, uri)

    await asyncio.gather(*(one(u, uri) for u, uri in zip(uploads, uris, strict=True)))


def form_body(form: Form, defaults: Mapping[str, object] | None = None) -> JobCreate:
    """The form's options as a ``JobCreate`` (``defaults``: options from the query string;
    giving one both ways with different values is refused)."""
    data: dict[str, object] = {}
    for name, values in form.fields.items():
        if name in LIST_FIELDS:
            data[name] = [v.strip() for value in values for v in value.split(",") if v.strip()]
        else:
            data[name] = values[-1]
    return merge_options(data, defaults)


def merge_options(
    data: Mapping[str, object], defaults: Mapping[str, object] | None = None
) -> JobCreate:
    """``JobCreate`` of body options plus query options (``defaults``), lax-parsed (form
    values are text: ``true``/``1``/``on``); a 422 naming the field when invalid."""
    merged = dict(defaults or {})
    for name, value in data.items():
        if name in merged and merged[name] != _lax(value):
            message = "given both in the query and in the body, with different values"
            raise Problem(
                422,
                "invalid_request",
                f"{name}: {message}",
                errors=[{"pointer": f"query:{name}", "detail": message}],
            )
        merged[name] = value
    try:
        return JobCreate.model_validate(merged)
    except ValidationError as exc:
        raise validation_problem(exc) from exc


def _lax(value: object) -> object:
    if isinstance(value, str) and value.lower() in ("true", "1", "on", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "off", "no"):
        return False
    return value


async def finish(
    request: Request,
    svc: Services,
    key: ApiKey,
    body: JobCreate,
    uploads: list[Upload],
    location: str,
) -> JobRequest:
    """Validate, admit and store ``uploads``; the job whose inputs they are."""
    await probe_all(svc, uploads)
    job_id = new_job_id()
    uris = [upload_uri(location, key, job_id, upload) for upload in uploads]
    job = await build_request(svc, key, body, uploads=uris, job_id=job_id)
    await admit(request, svc, key, len(uris))
    await store(svc, uploads, uris, job_id)
    return job


async def receive(request: Request, svc: Services, key: ApiKey) -> JobRequest:
    """``POST /v1/jobs`` as ``multipart/form-data``: the job of its ``file`` parts."""
    location = upload_location(svc)
    form = await read_form(
        request, svc, fields=JOB_FIELDS, max_files=svc.settings.api_max_upload_files
    )
    try:
        if not form.files:
            raise invalid("file", "send at least one image as a part named 'file'")
        return await finish(request, svc, key, form_body(form), form.files, location)
    finally:
        form.close()


async def receive_one(
    request: Request, svc: Services, key: ApiKey, options: Mapping[str, object]
) -> JobRequest:
    """``POST /v1/remove`` as ``multipart/form-data``: exactly one ``file`` part."""
    location = upload_location(svc)
    form = await read_form(request, svc, fields=REMOVE_FIELDS, max_files=1)
    try:
        if not form.files:
            raise invalid("file", "send the image as a part named 'file'")
        body = form_body(form, options)
        return await finish(request, svc, key, body, form.files, location)
    finally:
        form.close()


async def receive_raw(
    request: Request, svc: Services, key: ApiKey, options: Mapping[str, object]
) -> JobRequest:
    """``POST /v1/remove`` with the image as the whole body (at most ``max_image_bytes``)."""
    location = upload_location(svc)
    limit = svc.settings.max_image_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "image_too_large", f"the image is over the limit of {limit} bytes")
    upload = Upload(0, "image", raw=True)
    chunks = request.stream().__aiter__()
    try:
        try:
            async for chunk in chunks:
                if upload.spool.size + len(chunk) > limit:
                    raise Problem(
                        413, "image_too_large", f"the image is over the limit of {limit} bytes"
                    )
                await upload.spool.write(chunk)
        except ClientDisconnect as exc:
            raise malformed("the client closed the connection before the body ended") from exc
        except Problem:
            await _drain(chunks)
            raise
        return await finish(request, svc, key, merge_options({}, options), [upload], location)
    finally:
        upload.spool.close()
