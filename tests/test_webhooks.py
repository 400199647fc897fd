"""Tests of ben2q.webhooks: events, Standard Webhooks signatures, and real deliveries.

Deliveries go to real HTTP servers (``http.server`` in threads) on 127.0.0.1 only; no name but
``localhost`` is ever resolved. Signatures are checked with the ``standardwebhooks`` package
*and* with our ``verify``, and once against a known answer computed with ``hmac`` here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from standardwebhooks.webhooks import Webhook

from ben2q import fetch, webhooks
from ben2q.config import Settings
from ben2q.jobs import ErrorInfo, ItemStatus, JobStatus
from ben2q.webhooks import (
    DEFAULT_RETRY_SCHEDULE,
    AttemptResult,
    WebhookVerificationError,
    build_event,
    deliver_once,
    event_type_for,
    new_message_id,
    next_delay,
    sign,
    verify,
    webhook_config,
)

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()

# --------------------------------------------------------------------------------------
# a real receiver
# --------------------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A loopback HTTP server that records every request and answers from ``plan``.

    ``plan[i]`` is the status of request ``i`` (the last one repeats). ``mode``: ``"answer"``;
    ``"sleep"`` (wait until released before answering); ``"drip"`` (start an answer, then send
    one header byte every 0.2 s). With ``verify_secret``, a request our ``verify`` rejects is
    answered 400 instead.
    """

    def __init__(
        self,
        plan: list[int],
        *,
        mode: str = "answer",
        location: str | None = None,
        verify_secret: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.plan = plan
        self.mode = mode
        self.location = location
        self.verify_secret = verify_secret
        self.requests: list[Recorded] = []
        self.verdicts: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    index = len(receiver.requests)
                    receiver.requests.append(
                        Recorded("POST", self.path, dict(self.headers.items()), body)
                    )
                status = receiver.plan[min(index, len(receiver.plan) - 1)]
                if receiver.verify_secret is not None:
                    try:
                        verify(body, self.headers, receiver.verify_secret)
                        receiver.verdicts.append("ok")
                    except WebhookVerificationError as exc:
                        receiver.verdicts.append(str(exc))
                        status = 400
                try:
                    if receiver.mode == "sleep":
                        receiver.release.wait(10)
                    if receiver.mode == "drip":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                        self.wfile.flush()
                        for _ in range(50):
                            if receiver.release.wait(0.2):
                                break
                            self.wfile.write(b"a")
                            self.wfile.flush()
                        return
                    self.send_response(status)
                    if receiver.location:
                        self.send_header("Location", receiver.location)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"no")
                except OSError:  # the client hung up (timeouts)
                    pass

            do_GET = do_POST  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(plan: list[int] | None = None, **kwargs: object) -> Receiver:
        server = Receiver(plan or [204], **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_status(state: str = "succeeded") -> JobStatus:
    return JobStatus(
        id="0123456789abcdef0123456789abcdef",
        kind="batch",
        state=state,  # type: ignore[arg-type]
        progress=1.0,
        items=[
            ItemStatus(index=0, input="s3://in/a.jpg", state="succeeded", output="s3://o/x.png"),
            ItemStatus(
                index=1,
                input="https://example.com/b\u00e9.jpg",
                state="failed",
                error=ErrorInfo(code="invalid_image", message="not an image: \u00e9\u4e2d"),
            ),
        ],
        output="s3://o/",
        created_at=1_700_000_000.5,
        finished_at=1_700_000_010.25,
    )


def deliver(url: str, body: bytes, **kwargs: object) -> AttemptResult:
    args: dict[str, object] = {
        "msg_id": "msg_test",
        "secret": SECRET,
        "attempt": 1,
        "timeout": 5.0,
        "allow_private": True,
    }
    args.update(kwargs)
    return deliver_once(url, body, **args)  # type: ignore[arg-type]


def assert_no_secret(result: AttemptResult) -> None:
    key = SECRET.removeprefix("whsec_")
    assert key not in repr(result) and key not in (result.error or "")


# --------------------------------------------------------------------------------------
# delivery
# --------------------------------------------------------------------------------------


def test_delivered_and_verifiable_by_both_libraries(receiver) -> None:
    server = receiver([204])
    status = job_status()
    body = build_event(status, event_type=event_type_for(status, True))
    msg_id = new_message_id()
    before = time.time()
    result = deliver(server.url("/hook?token=1"), body, msg_id=msg_id)

    assert result.outcome == "delivered" and result.status_code == 204 and result.error is None
    assert result.attempt == 1 and 0 < result.duration_ms < 5000
    assert before - 1 <= result.at <= time.time()
    assert len(server.requests) == 1
    seen = server.requests[0]
    assert seen.path == "/hook?token=1" and seen.body == body
    lowered = {k.lower(): v for k, v in seen.headers.items()}
    assert lowered["content-type"] == "application/json"
    assert lowered["host"] == f"127.0.0.1:{server.port}"
    assert lowered["webhook-id"] == msg_id
    assert lowered["webhook-timestamp"] == str(int(result.at))
    assert lowered["webhook-signature"].startswith("v1,")

    theirs = Webhook(SECRET).verify(seen.body, seen.headers)
    ours = verify(seen.body, seen.headers, SECRET)
    assert theirs == ours
    assert ours["type"] == "job.succeeded"
    assert JobStatus.model_validate(ours["data"]) == status
    assert_no_secret(result)


def test_host_name_is_pinned_and_sent_as_host_header(receiver) -> None:
    server = receiver([200])
    result = deliver(f"http://localhost:{server.port}/h", b"{}")
    assert result.outcome == "delivered"
    assert server.requests[0].headers["Host"] == f"localhost:{server.port}"


def test_retries_same_id_fresh_signatures_until_delivered(receiver) -> None:
    server = receiver([503, 503, 204])
    body = build_event(job_status(), event_type="job.succeeded")
    msg_id = new_message_id()
    start = datetime.now(UTC)
    results: list[AttemptResult] = []
    attempt = 0
    while (delay := next_delay(attempt, (0, 0, 0, 0, 0))) is not None:
        time.sleep(delay)
        attempt += 1
        # a later attempt, later timestamp (as hours apart in production; here seconds)
        result = deliver(
            server.url(),
            body,
            msg_id=msg_id,
            attempt=attempt,
            now=start + timedelta(seconds=attempt),
        )
        results.append(result)
        if result.outcome != "retry":
            break

    assert [r.outcome for r in results] == ["retry", "retry", "delivered"]
    assert [r.status_code for r in results] == [503, 503, 204]
    assert [r.attempt for r in results] == [1, 2, 3]
    assert results[0].error == "HTTP 503"
    assert len(server.requests) == 3
    assert {r.headers["webhook-id"] for r in server.requests} == {msg_id}
    assert {r.body for r in server.requests} == {body}
    stamps = [r.headers["webhook-timestamp"] for r in server.requests]
    assert len(set(stamps)) == 3  # signed afresh each time
    assert len({r.headers["webhook-signature"] for r in server.requests}) == 3
    for seen in server.requests:
        assert Webhook(SECRET).verify(seen.body, seen.headers)["type"] == "job.succeeded"
        assert verify(seen.body, seen.headers, SECRET)["data"]["id"] == job_status().id


def test_schedule_drives_the_waits_without_sleeping(receiver) -> None:
    server = receiver([500])
    waits: list[float] = []
    attempt = 0
    while (delay := next_delay(attempt, DEFAULT_RETRY_SCHEDULE, jitter=0)) is not None:
        waits.append(delay)
        attempt += 1
        if deliver(server.url(), b"{}", attempt=attempt).outcome != "retry":
            break
    assert waits == list(DEFAULT_RETRY_SCHEDULE)
    assert len(server.requests) == len(DEFAULT_RETRY_SCHEDULE) == 8


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(receiver, status: int) -> None:
    server = receiver([status])
    assert deliver(server.url(), b"{}").outcome == "delivered"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422])
def test_other_4xx_gives_up_after_one_request(receiver, status: int) -> None:
    server = receiver([status, 204])
    result = deliver(server.url(), b"{}")
    assert (result.outcome, result.status_code, result.error) == (
        "give_up",
        status,
        f"HTTP {status}",
    )
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(receiver, status: int) -> None:
    server = receiver([status])
    result = deliver(server.url(), b"{}")
    assert (result.outcome, result.status_code) == ("retry", status)
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(receiver, status: int) -> None:
    elsewhere = receiver([204])
    server = receiver([status], location=elsewhere.url())
    result = deliver(server.url(), b"{}")
    assert result.outcome == "give_up" and result.status_code == status
    assert "redirect" in (result.error or "")
    assert len(server.requests) == 1 and elsewhere.requests == []


def test_closed_port_is_retried_with_an_error() -> None:
    result = deliver(f"http://127.0.0.1:{closed_port()}/hook", b"{}")
    assert result.outcome == "retry" and result.status_code is None
    assert result.error and "ConnectError" in result.error
    assert_no_secret(result)


def test_slow_receiver_times_out_within_the_limit(receiver) -> None:
    server = receiver([204], mode="sleep")
    started = time.monotonic()
    result = deliver(server.url(), b"{}", timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.outcome == "retry" and result.status_code is None
    assert "timed out" in (result.error or "")
    assert 0.4 < elapsed < 1.5 and 400 < result.duration_ms < 1500
    assert len(server.requests) == 1  # it was sent; the answer did not come in time


def test_dripping_receiver_is_cut_at_the_deadline(receiver) -> None:
    """One header byte every 0.2 s never trips a per-read timeout; the hard deadline must."""
    server = receiver([204], mode="drip")
    started = time.monotonic()
    result = deliver(server.url(), b"{}", timeout=1.0)
    elapsed = time.monotonic() - started
    assert result.outcome == "retry" and "timed out" in (result.error or "")
    assert 0.9 < elapsed < 2.0


def test_old_signature_is_refused_by_a_verifying_receiver(receiver) -> None:
    server = receiver([204], verify_secret=SECRET)
    body = build_event(job_status(), event_type="job.succeeded")
    good = deliver(server.url(), body)
    stale = deliver(server.url(), body, now=datetime.now(UTC) - timedelta(minutes=10))
    wrong = deliver(server.url(), body, secret=OTHER_SECRET)
    assert good.outcome == "delivered"
    assert (stale.outcome, stale.status_code) == ("give_up", 400)
    assert (wrong.outcome, wrong.status_code) == ("give_up", 400)
    assert server.verdicts[0] == "ok"
    assert "too old" in server.verdicts[1] and "No matching signature" in server.verdicts[2]


# --------------------------------------------------------------------------------------
# SSRF guard
# --------------------------------------------------------------------------------------


def test_private_address_refused_and_nothing_sent(receiver) -> None:
    server = receiver([204])
    for url in (server.url(), f"http://localhost:{server.port}/hook"):
        result = deliver(url, b"{}", allow_private=False)
        assert result.outcome == "give_up" and result.status_code is None
        assert "disallowed address" in (result.error or "")
    assert server.requests == []


def test_policy_replaces_the_address_check(receiver) -> None:
    server = receiver([204])
    seen: list[str] = []

    def loopback_only(ip: fetch.IPAddress) -> bool:
        seen.append(str(ip))
        return ip.is_loopback

    def nothing(ip: fetch.IPAddress) -> bool:
        return False

    refused = deliver(server.url(), b"{}", allow_private=True, policy=nothing)
    assert refused.outcome == "give_up" and server.requests == []
    allowed = deliver(server.url(), b"{}", allow_private=False, policy=loopback_only)
    assert allowed.outcome == "delivered" and seen == ["127.0.0.1"]
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/hook",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1:{port}/hook",
        "http:///nohost",
        "not a url",
    ],
)
def test_forbidden_urls_give_up(receiver, url: str) -> None:
    server = receiver([204])
    result = deliver(url.format(port=server.port), b"{}")
    assert result.outcome == "give_up" and result.error
    assert server.requests == []


# --------------------------------------------------------------------------------------
# HTTPS: pinned, and verified against the URL's name
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture()
def tls_receiver(receiver, localhost_cert, monkeypatch: pytest.MonkeyPatch):
    cert, key = localhost_cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # trust only the test cert
    monkeypatch.setattr(webhooks, "_ssl_context", lambda: client_ctx)
    return lambda plan=None, **kwargs: receiver(plan, tls=server_ctx, **kwargs)


def test_https_by_name_is_delivered(tls_receiver) -> None:
    server = tls_receiver([204])
    result = deliver(server.url(host="localhost"), b"{}")
    assert result.outcome == "delivered"
    assert server.requests[0].headers["Host"] == f"localhost:{server.port}"


def test_https_certificate_is_checked_against_the_name(tls_receiver) -> None:
    # The certificate names "localhost" only: by IP the handshake must fail (so verification
    # is on, and against the URL's host, not the pinned address); nothing is sent.
    server = tls_receiver([204])
    result = deliver(server.url(host="127.0.0.1"), b"{}")
    assert result.outcome == "retry" and "certificate" in (result.error or "").lower()
    assert server.requests == []


def test_https_dripping_receiver_is_cut_at_the_deadline(tls_receiver) -> None:
    server = tls_receiver([204], mode="drip")
    started = time.monotonic()
    result = deliver(server.url(host="localhost"), b"{}", timeout=0.6)
    assert result.outcome == "retry" and "timed out" in (result.error or "")
    assert 0.5 < time.monotonic() - started < 1.5


# --------------------------------------------------------------------------------------
# signing and verifying
# --------------------------------------------------------------------------------------


def test_sign_known_answer() -> None:
    """The Standard Webhooks reference vector, and the same HMAC computed by hand here."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    when = datetime.fromtimestamp(1614265330, UTC)
    headers = sign(body, msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp=when, secret=secret)
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "content-type": "application/json",
    }
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330." + body, hashlib.sha256)
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac.digest()).decode()


def test_sign_converts_other_time_zones_and_refuses_naive() -> None:
    plus2 = datetime(2024, 5, 1, 14, 0, 0, 900_000, tzinfo=timezone(timedelta(hours=2)))
    headers = sign(b"{}", msg_id="m", timestamp=plus2, secret=SECRET)
    assert headers["webhook-timestamp"] == str(int(plus2.timestamp()))  # 12:00 UTC, floored
    assert Webhook(SECRET).sign("m", plus2.astimezone(UTC), "{}") == headers["webhook-signature"]
    with pytest.raises(ValueError, match="timezone-aware"):
        sign(b"{}", msg_id="m", timestamp=datetime(2024, 5, 1), secret=SECRET)


@pytest.mark.parametrize("msg_id", ["", "has space", "line\r\nX-Evil: 1", "\u00e9", "x" * 257])
def test_sign_refuses_bad_message_ids(msg_id: str) -> None:
    with pytest.raises(ValueError, match="webhook-id"):
        sign(b"{}", msg_id=msg_id, timestamp=datetime.now(UTC), secret=SECRET)


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_a", "whsec_!!!!"])
def test_bad_secrets_are_value_errors_without_the_secret(secret: str) -> None:
    with pytest.raises(ValueError) as info:
        sign(b"{}", msg_id="m", timestamp=datetime.now(UTC), secret=secret)
    assert not isinstance(info.value, WebhookVerificationError)
    assert secret.removeprefix("whsec_") in ("", "a", "!!!!")  # and not echoed:
    assert "!!!!" not in str(info.value)
    with pytest.raises(ValueError) as info:
        verify(b"{}", {}, secret)
    assert not isinstance(info.value, WebhookVerificationError)


def fresh(body: bytes, secret: str = SECRET, when: datetime | None = None) -> dict[str, str]:
    return sign(body, msg_id="msg_1", timestamp=when or datetime.now(UTC), secret=secret)


def test_verify_accepts_any_header_case_and_str_bodies() -> None:
    body = b'{"type":"job.progress","data":{}}'
    headers = {k.title(): v for k, v in fresh(body).items()}
    assert "Webhook-Id" in headers
    assert verify(body, headers, SECRET)["type"] == "job.progress"
    assert verify(body.decode(), headers, SECRET)["type"] == "job.progress"


def test_verify_rejects_forgeries() -> None:
    body = b'{"type":"job.succeeded","data":{"id":"a"}}'
    headers = fresh(body)
    now = datetime.now(UTC)
    cases: list[tuple[bytes, dict[str, str], str]] = [
        (body.replace(b'"a"', b'"b"'), headers, "No matching signature"),  # tampered body
        (body, fresh(body, OTHER_SECRET), "No matching signature"),  # wrong secret
        (body, fresh(body, when=now - timedelta(minutes=6)), "too old"),
        (body, fresh(body, when=now + timedelta(minutes=6)), "too new"),
        (body, {**headers, "webhook-id": "msg_2"}, "No matching signature"),  # replayed as new
        (body, {**headers, "webhook-timestamp": "1"}, "too old"),
        (body, {**headers, "webhook-timestamp": "soon"}, "Invalid Signature Headers"),
        (body, {**headers, "webhook-signature": "garbage"}, "malformed"),
        (body, {**headers, "webhook-signature": "v1,***"}, "No matching signature"),
        (body, {**headers, "webhook-signature": "v2," + headers["webhook-signature"][3:]}, "No"),
        (body, {k: v for k, v in headers.items() if k != "webhook-signature"}, "Missing"),
        (b"\xff\xfe", fresh(b"{}"), "not UTF-8"),
    ]
    for data, hdrs, reason in cases:
        with pytest.raises(WebhookVerificationError, match=reason) as info:
            verify(data, hdrs, SECRET)
        assert info.value.code == "invalid_signature"
        assert isinstance(info.value, ValueError)


def test_verify_wants_a_json_object() -> None:
    for body in (b"[1, 2]", b"not json"):
        with pytest.raises(WebhookVerificationError, match="JSON"):
            verify(body, fresh(body), SECRET)


# --------------------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------------------


def test_build_event_is_compact_stable_ascii() -> None:
    status = job_status()
    now = datetime(2024, 5, 1, 12, 0, 0, 123_456, tzinfo=UTC)
    body = build_event(status, event_type="job.partial", now=now)
    assert body == build_event(status, event_type="job.partial", now=now)
    assert body.isascii() and b"\\u00e9" in body
    assert body.startswith(b'{"type":"job.partial","timestamp":"2024-05-01T12:00:00.123Z","data":{')
    assert b", " not in body and b'": ' not in body
    event = json.loads(body)
    assert list(event) == ["type", "timestamp", "data"]
    assert list(event["data"]) == list(JobStatus.model_fields)
    assert JobStatus.model_validate(event["data"]) == status
    assert event["data"]["items"][1]["error"]["message"] == "not an image: \u00e9\u4e2d"


def test_build_event_default_time_and_checks() -> None:
    event = json.loads(build_event(job_status(), event_type="job.progress"))
    stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    assert event["timestamp"].endswith("Z")
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 5
    with pytest.raises(ValueError, match="unknown event type"):
        build_event(job_status(), event_type="job.done")
    with pytest.raises(ValueError, match="timezone-aware"):
        build_event(job_status(), event_type="job.progress", now=datetime(2024, 1, 1))


def test_event_type_for() -> None:
    for state in ("succeeded", "partial", "failed", "cancelled"):
        assert event_type_for(job_status(state), True) == f"job.{state}"
        assert event_type_for(job_status(state), False) == "job.progress"
    assert event_type_for(job_status("running"), False) == "job.progress"
    for state in ("queued", "running"):
        with pytest.raises(ValueError, match="not finished"):
            event_type_for(job_status(state), True)


def test_message_ids_are_unique_and_signable() -> None:
    ids = {new_message_id() for _ in range(100)}
    assert len(ids) == 100
    for msg_id in list(ids)[:3]:
        assert sign(b"{}", msg_id=msg_id, timestamp=datetime.now(UTC), secret=SECRET)


# --------------------------------------------------------------------------------------
# retry schedule
# --------------------------------------------------------------------------------------


class Extreme:
    """An rng that always draws the top (or bottom) of the range."""

    def __init__(self, top: bool) -> None:
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


def test_next_delay_follows_the_default_schedule_within_jitter() -> None:
    assert DEFAULT_RETRY_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    rng = random.Random(7)
    for attempt, base in enumerate(DEFAULT_RETRY_SCHEDULE):
        delays = [next_delay(attempt, DEFAULT_RETRY_SCHEDULE, rng=rng) for _ in range(200)]
        assert all(d is not None and 0.9 * base <= d <= 1.1 * base for d in delays)
        if base:
            assert len(set(delays)) > 100  # actually jittered
    assert next_delay(8, DEFAULT_RETRY_SCHEDULE) is None
    assert next_delay(100, DEFAULT_RETRY_SCHEDULE) is None
    assert next_delay(2, DEFAULT_RETRY_SCHEDULE, rng=Extreme(True)) == pytest.approx(330)
    assert next_delay(2, DEFAULT_RETRY_SCHEDULE, rng=Extreme(False)) == pytest.approx(270)
    assert next_delay(1, DEFAULT_RETRY_SCHEDULE, jitter=0.5, rng=Extreme(True)) == 7.5
    assert next_delay(3) == pytest.approx(1800, rel=0.1)  # the default schedule


def test_next_delay_custom_schedule_and_checks() -> None:
    schedule = [1, 2.5]
    assert next_delay(0, schedule, jitter=0) == 1
    assert next_delay(1, schedule, jitter=0) == 2.5
    assert next_delay(2, schedule, jitter=0) is None
    for bad in ({"attempt": -1}, {"jitter": 1.5}, {"jitter": -0.1}):
        with pytest.raises(ValueError):
            next_delay(**{"attempt": 0, "schedule": schedule, **bad})  # type: ignore[arg-type]
    for schedule_bad in ([], [1, -2], [float("nan")]):
        with pytest.raises(ValueError):
            next_delay(0, schedule_bad)


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


def test_webhook_config_from_settings_hides_the_secret() -> None:
    settings = Settings(
        webhook_secret=SECRET,
        webhook_timeout=3.0,
        webhook_retry_schedule=[0, 1, 2],
        allow_private_urls=True,
    )
    config = webhook_config(settings)
    assert config.secret == SECRET
    assert (config.timeout, config.schedule, config.allow_private) == (3.0, (0, 1, 2), True)
    assert SECRET not in repr(config) and "secret" not in repr(config)


def test_webhook_config_defaults_for_missing_fields() -> None:
    config = webhook_config(SimpleNamespace())
    assert config.secret is None and config.timeout == 10.0 and not config.allow_private
    assert config.schedule == DEFAULT_RETRY_SCHEDULE
    assert webhook_config(Settings()).schedule == DEFAULT_RETRY_SCHEDULE
    with pytest.raises(ValueError):
        webhook_config(SimpleNamespace(webhook_retry_schedule=[]))


def test_deliver_once_argument_checks() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        deliver("http://127.0.0.1:9/", b"{}", attempt=0)
    with pytest.raises(ValueError, match="UTF-8"):
        deliver("http://127.0.0.1:9/", b"\xff")
    with pytest.raises(ValueError, match="secret"):
        deliver("http://127.0.0.1:9/", b"{}", secret="whsec_!!!!")
