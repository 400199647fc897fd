"""Structured logs: one JSON object per line, with secrets redacted. Stdlib only.

``configure_logging()`` puts one handler on the root logger (stderr) with ``JsonFormatter``
(or a readable ``TextFormatter``) and a ``WorkerFilter`` that adds the worker name to every
record. Context goes in ``extra=``::

    log.info("item done", extra={"job_id": job.id, "item": 3, "duration_ms": 41.2,
                                 "batch_size": 4, "state": "succeeded"})

gives ``{"ts": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "ben2q.runner",
"message": "item done", "job_id": "...", "item": 3, "duration_ms": 41.2, "batch_size": 4,
"state": "succeeded", "worker": "celery@gpu-1"}``; an exception adds ``"exc"`` (the
traceback text). Only the fields of ``EXTRA_FIELDS`` are taken from ``extra=``.

Secrets never reach the output: ``redact`` is applied to the message, string fields and
exception text (webhook secrets ``whsec_...``, passwords in URLs, presigned S3 query strings,
AWS secret keys), and bytes are never written (``<N bytes>`` stands for them), so an image
passed by mistake as a log argument does not end up in the logs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "EXTRA_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "WorkerFilter",
    "configure_logging",
    "redact",
    "resolve_format",
]

EXTRA_FIELDS: tuple[str, ...] = (
    "job_id",
    "item",
    "worker",
    "duration_ms",
    "code",
    "batch_size",
    "state",
)
"""Fields taken from ``extra=`` into the output (in this order)."""

MASK = "***"
_MAX_FIELD_CHARS = 2000

# --- redaction ---------------------------------------------------------------------------

_WEBHOOK_SECRET = re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+")
# scheme://user:password@host -> scheme://user:***@host. The password may hold '@' (up to
# the last '@' before the path) or, failing that, '/' (AWS secret keys in s3://KEY:SECRET@b;
# up to the first '@', and not a port followed by a path: https://h:443/a@b is no password).
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@?#]*):"
    r"(?P<pw>[^\s/?#]*|(?!\d+/)[^\s?#@]*?)@"
)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
# query parameters that make an S3/AWS URL presigned: its whole query string goes
_PRESIGNED = re.compile(
    r"(?i)(?:^|&)(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|"
    r"AWSAccessKeyId|Signature)="
)
# secret-valued parameters anywhere (a query string, a header, an env dump, a repr)
_SECRET_PARAM = re.compile(
    r"(?i)(?P<name>\b(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|"
    r"aws_secret_access_key|aws_session_token|aws_security_token|AWSSecretAccessKey|"
    r"secret_access_key|SecretAccessKey|secret_key|access_token|refresh_token|"
    r"client_secret|password|passwd|api_key|apikey)"
    r"(?:[\"']?\s*[:=]\s*[\"']?|=))(?P<value>[^\s&\"',;}]+)"
)
# AWS SigV4 Authorization header parts: Credential=AKIA.../..., Signature=hex
_AUTH_HEADER = re.compile(r"(?P<name>\b(?:Credential|Signature)=)(?P<value>[^\s,&\"']+)")


def _redact_url(match: re.Match[str]) -> str:
    url = match.group(0)
    base, sep, query = url.partition("?")
    if sep and _PRESIGNED.search(query.split("#", 1)[0]):
        return f"{base}?{MASK}"
    return url


def redact(text: str) -> str:
    """``text`` without secrets; anything else is left as it is.

    Removes: webhook secrets (``whsec_...``); passwords in URLs (``redis://:pw@host``,
    ``https://user:pw@host``, ``s3://AKIA...:SECRET@bucket``); the query string of presigned
    S3 URLs (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, SigV2
    ``AWSAccessKeyId``/``Signature``); the values of secret parameters anywhere
    (``aws_secret_access_key=``, ``X-Amz-Signature=``, ``password=``, ``api_key=``...) and of
    SigV4 ``Credential=``/``Signature=`` header parts.
    """
    if not text:
        return text
    text = _WEBHOOK_SECRET.sub("whsec_" + MASK, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    text = _URL.sub(_redact_url, text)
    text = _SECRET_PARAM.sub(lambda m: m.group("name") + MASK, text)
    text = _AUTH_HEADER.sub(lambda m: m.group("name") + MASK, text)
    return text


# --- formatting --------------------------------------------------------------------------


def _no_bytes(value: Any) -> Any:
    """A stand-in for bytes-like values (images must never be logged)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return value


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()`` with bytes arguments replaced, redacted."""
    args = record.args
    if isinstance(args, tuple):
        args = tuple(_no_bytes(a) for a in args)
    elif isinstance(args, Mapping):
        args = {k: _no_bytes(v) for k, v in args.items()}
    msg = _no_bytes(record.msg)
    msg = str(msg)
    if args:
        try:
            msg = msg % args
        except (TypeError, ValueError, KeyError):
            msg = f"{msg} {args!r}"  # a bad format string must not lose the record
    return redact(msg)


def _field(value: Any) -> Any:
    """A JSON-safe, redacted form of an ``extra=`` value."""
    value = _no_bytes(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value[:_MAX_FIELD_CHARS])
    return redact(str(value)[:_MAX_FIELD_CHARS])


def _timestamp(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601 UTC), level, logger, message, the
    ``extra=`` fields of ``fields`` (default ``EXTRA_FIELDS``) that are set, and ``exc``
    (and ``stack``) text. Redacted, no bytes."""

    def __init__(self, fields: Iterable[str] = EXTRA_FIELDS) -> None:
        super().__init__()
        self.fields = tuple(fields)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        for name in self.fields:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = _field(value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2025-01-02T03:04:05.678Z INFO ben2q.runner: message job_id=... item=3``, redacted."""

    def __init__(self, fields: Iterable[str] = EXTRA_FIELDS) -> None:
        super().__init__()
        self.fields = tuple(fields)

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record.created)} {record.levelname} {record.name}: {_message(record)}"
        extras = [
            f"{name}={_field(record.__dict__[name])}"
            for name in self.fields
            if record.__dict__.get(name) is not None
        ]
        if extras:
            line += " " + " ".join(extras)
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + redact(self.formatStack(record.stack_info))
        return line


class WorkerFilter(logging.Filter):
    """Sets ``record.worker`` (unless the record has one already); never drops records."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "worker", None) is None:
            record.worker = self.worker
        return True


def resolve_format(fmt: Literal["auto", "json", "text"]) -> Literal["json", "text"]:
    """``auto``: readable text for a person at a terminal, JSON lines for a collector."""
    if fmt not in ("auto", "json", "text"):
        raise ValueError(f"fmt must be 'auto', 'json' or 'text', got {fmt!r}")
    if fmt == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return "text" if isatty is not None and isatty() else "json"
    return fmt


def _one_handler_for_libraries() -> None:
    """Libraries that print through a handler of their own and also propagate to the root
    (huggingface_hub) would show each message twice: theirs go, ours stays."""
    try:
        from huggingface_hub.utils import logging as hf_logging  # noqa: F401  (adds it)
    except ImportError:
        return
    hub = logging.getLogger("huggingface_hub")
    for old in list(hub.handlers):
        if type(old) is logging.StreamHandler and hub.propagate:
            hub.removeHandler(old)


def configure_logging(
    *,
    fmt: Literal["auto", "json", "text"] = "json",
    level: str = "INFO",
    worker: str | None = None,
) -> None:
    """One stderr handler on the root logger, replacing the root's handlers (idempotent).

    ``worker``: a name added to every record that goes through it (e.g. the Celery
    hostname, set in each prefork child). Python warnings go through it too (once each,
    in the same format), and libraries' own duplicate handlers are removed.
    """
    fmt = resolve_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(WorkerFilter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if getattr(old, "_ben2q", False):
            old.close()
    handler._ben2q = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    _one_handler_for_libraries()
