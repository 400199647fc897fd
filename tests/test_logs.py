"""Structured JSON logs and secret redaction."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pytest

from ben2q.logs import JsonFormatter, TextFormatter, WorkerFilter, configure_logging, redact


@pytest.fixture()
def capture():
    """A logger whose records go through JsonFormatter into a buffer; returns (log, lines)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ben2q.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    def lines() -> list[dict]:
        return [json.loads(line) for line in buf.getvalue().splitlines()]

    yield logger, handler, lines
    logger.removeHandler(handler)
    logger.propagate = True


@pytest.fixture()
def root_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    logging.captureWarnings(False)
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_line_with_extra_fields(capture):
    log, _, lines = capture
    log.info(
        "item %d of %s done",
        3,
        "job1",
        extra={
            "job_id": "0123abcd",
            "item": 3,
            "duration_ms": 41.25,
            "code": "invalid_image",
            "batch_size": 4,
            "state": "failed",
            "unrelated": "not logged",
        },
    )
    [line] = lines()
    ts = line.pop("ts")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
    when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    assert when.tzinfo is not None and when.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60
    assert line == {
        "level": "INFO",
        "logger": "ben2q.test_logs",
        "message": "item 3 of job1 done",
        "job_id": "0123abcd",
        "item": 3,
        "duration_ms": 41.25,
        "code": "invalid_image",
        "batch_size": 4,
        "state": "failed",
    }


def test_worker_filter_and_exceptions(capture):
    log, handler, lines = capture
    handler.addFilter(WorkerFilter("celery@gpu-1"))
    log.warning("plain")
    log.warning("own worker", extra={"worker": "celery@other"})
    try:
        raise RuntimeError("cannot connect to redis://:hunter2@redis:6379/0")
    except RuntimeError:
        log.exception("job %s failed", "j1", extra={"job_id": "j1"})
    plain, own, failed = lines()
    assert plain["worker"] == "celery@gpu-1" and plain["level"] == "WARNING"
    assert own["worker"] == "celery@other"
    assert failed["level"] == "ERROR" and failed["job_id"] == "j1"
    assert failed["message"] == "job j1 failed"
    assert failed["exc"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: cannot connect to redis://:***@redis:6379/0" in failed["exc"]
    assert "hunter2" not in json.dumps(failed)


def test_secrets_in_messages_are_redacted(capture):
    log, _, lines = capture
    log.info("webhook signed with whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    log.info("broker %s", "redis://:secret@h:6379/0")
    log.info("fetching", extra={"state": "https://b.s3.amazonaws.com/k?X-Amz-Signature=f00"})
    out = [line["message"] for line in lines()]
    assert out[0] == "webhook signed with whsec_***"
    assert out[1] == "broker redis://:***@h:6379/0"
    assert lines()[2]["state"] == "https://b.s3.amazonaws.com/k?***"
    text = json.dumps(lines())
    for secret in ("MfKQ9r8", "secret@", "f00"):
        assert secret not in text


def test_no_image_bytes(capture):
    log, _, lines = capture
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    log.info("got %s from %s", png, "s3://in-bucket/a.png", extra={"item": png})
    log.info(png)
    first, second = lines()
    assert first["message"] == "got <1032 bytes> from s3://in-bucket/a.png"
    assert first["item"] == "<1032 bytes>"
    assert second["message"] == "<1032 bytes>"
    assert "PNG" not in json.dumps(lines())


def test_non_json_values_and_bad_format_strings():
    record = logging.LogRecord("ben2q.x", logging.INFO, __file__, 1, "%d items", ("many",), None)
    record.code, record.item = object(), None
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "%d items ('many',)"  # kept, not lost
    assert line["code"].startswith("<object object")
    assert "item" not in line


def test_configure_logging_json(root_restored, capsys):
    configure_logging(fmt="json", level="DEBUG", worker="celery@w1")
    configure_logging(fmt="json", level="DEBUG", worker="celery@w1")  # idempotent
    assert len(root_restored.handlers) == 1
    logging.getLogger("ben2q.somewhere").debug("hello", extra={"job_id": "j"})
    logging.getLogger("ben2q.somewhere").debug("pw %s", "https://u:pw@x.example/a")
    err = capsys.readouterr().err.splitlines()
    first, second = (json.loads(line) for line in err)
    assert first["message"] == "hello" and first["worker"] == "celery@w1"
    assert first["job_id"] == "j" and first["level"] == "DEBUG"
    assert first["logger"] == "ben2q.somewhere"
    assert second["message"] == "pw https://u:***@x.example/a"


def test_configure_logging_text(root_restored, capsys):
    configure_logging(fmt="text", level="info")
    logging.getLogger("ben2q.x").debug("hidden")
    logging.getLogger("ben2q.x").info("shown whsec_abc123", extra={"job_id": "j9", "item": 2})
    [line] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\S+Z INFO ben2q\.x: shown whsec_\*\*\* job_id=j9 item=2", line), line
    assert isinstance(root_restored.handlers[0].formatter, TextFormatter)
    with pytest.raises(ValueError):
        configure_logging(fmt="xml")  # type: ignore[arg-type]


def test_auto_format_is_text_at_a_terminal_and_json_otherwise(monkeypatch):
    from ben2q.logs import resolve_format

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr("sys.stderr", Stream(True))
    assert resolve_format("auto") == "text"
    monkeypatch.setattr("sys.stderr", Stream(False))
    assert resolve_format("auto") == "json"
    assert resolve_format("text") == "text" and resolve_format("json") == "json"


def _run_logging(code: str) -> str:
    """Standard error of a fresh interpreter (the handlers a library adds at import are
    only there once per process)."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_a_library_warning_shows_once_in_our_format():
    err = _run_logging(
        """
        import logging, warnings
        from ben2q.logs import configure_logging
        configure_logging(fmt="json")
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        warnings.warn("a deprecation, once", UserWarning)
        """
    )
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    records = [json.loads(line) for line in lines]
    assert records[0]["logger"] == "huggingface_hub.utils._http"
    assert records[0]["message"] == "Retrying in 1s [Retry 1/5]."
    assert records[1]["logger"] == "py.warnings" and "a deprecation, once" in records[1]["message"]


def test_text_format_at_a_terminal_has_no_json():
    err = _run_logging(
        """
        import logging, sys

        class Terminal:
            def __init__(self, stream):
                self.stream = stream

            def write(self, text):
                return self.stream.write(text)

            def flush(self):
                self.stream.flush()

            def isatty(self):
                return True

        sys.stderr = Terminal(sys.stderr)
        from ben2q.logs import configure_logging
        configure_logging(fmt="auto")
        logging.getLogger("ben2q.worker").warning("running as root")
        """
    )
    [line] = err.strip().splitlines()
    assert line.endswith("WARNING ben2q.worker: running as root") and "{" not in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw.", "secret whsec_***."),
        ("redis://:p4ss@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:p@ss@h:6380/1 next", "rediss://default:***@h:6380/1 next"),
        ("GET https://user:pw@example.com/x?y=1", "GET https://user:***@example.com/x?y=1"),
        (
            "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/key",
            "s3://AKIAIOSFODNN7EXAMPLE:***@bucket/key",
        ),
        (
            "https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIAX%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host"
            "&X-Amz-Signature=0a1b2c3d4e5f (200)",
            "https://b.s3.amazonaws.com/k.png?*** (200)",
        ),
        (
            "http://minio:9000/b/k?AWSAccessKeyId=AKIA&Signature=abc%3D&Expires=1700000000",
            "http://minio:9000/b/k?***",
        ),
        (
            "https://x.example/?aws_secret_access_key=wJalrXUtnFEMI/K7MDENG&region=eu",
            "https://x.example/?aws_secret_access_key=***&region=eu",
        ),
        (
            "kwargs {'aws_secret_access_key': 'wJalrXUtnFEMI/K7MDENG', 'region': 'eu'}",
            "kwargs {'aws_secret_access_key': '***', 'region': 'eu'}",
        ),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", "AWS_SECRET_ACCESS_KEY=***"),
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIA/2024/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=fe5f80f77d5fa3beca038a248ff027",
            "Authorization: AWS4-HMAC-SHA256 Credential=***, SignedHeaders=host, Signature=***",
        ),
    ],
)
def test_redact_secrets(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "job 0123456789abcdef0123456789abcdef succeeded in 41 ms at 12:30:01",
        "s3://in-bucket/a.jpg -> s3://out-bucket/run1/0123/0000-a.png",
        "https://cdn.example/y.jpg?w=100&h=200#top",
        "redis://127.0.0.1:6379/0 and mail to user@example.com",
        "https://host:443/path/user@domain",
        "file:///srv/ben2q/photo.jpg key=value a:b@c",
        "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709",
        "",
    ],
)
def test_redact_leaves_normal_text(text):
    assert redact(text) == text
