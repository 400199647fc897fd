"""Signed webhook events (Standard Webhooks) and their delivery logic, without Celery.

Events
------
A job's webhook receives JSON events ``{"type", "timestamp", "data"}``: ``type`` is one of
``job.succeeded``, ``job.partial``, ``job.failed``, ``job.cancelled`` (the final event) or
``job.progress``; ``timestamp`` is ISO-8601 UTC; ``data`` is the job's ``JobStatus`` record.
Bodies are compact, pure-ASCII JSON (see :func:`build_event`).

Every request carries the three Standard Webhooks headers (https://www.standardwebhooks.com/),
made by the ``standardwebhooks`` package, never by hand:

* ``webhook-id``: the message id, **the same on every attempt of one event**, so a receiver
  that saw an event already (its 2xx got lost, say) recognises the retry and drops it;
* ``webhook-timestamp``: integer Unix seconds of *this* attempt;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with
  the secret (``whsec_`` + base64, ``Settings.webhook_secret``). Each attempt is signed
  afresh, so a retry hours later still passes the receiver's 5-minute freshness check.

Delivery contract
-----------------
Build an event's body once (:func:`build_event`) and pick its id once (:func:`new_message_id`);
every attempt then sends those same bytes with that same id (:func:`deliver_once`). Attempts
are numbered from 1; ``schedule[n - 1]`` is the wait before attempt ``n``, so the default
:data:`DEFAULT_RETRY_SCHEDULE` is the spec's: immediately, 5 s, 5 min, 30 min, 2 h, 5 h,
10 h, 10 h -- eight attempts over about 27 hours. :func:`next_delay` gives the (jittered) wait
before the next attempt, or ``None`` when the schedule is used up.

Each attempt is classified:

* ``delivered``: a 2xx answer;
* ``retry``: worth trying again later -- connection refused or reset, a name that does not
  resolve, a timeout (``timeout`` bounds the whole attempt, hard), HTTP 408, 429 and 5xx;
* ``give_up``: retrying cannot help -- any other 4xx, any 3xx (redirects are never followed: a
  receiver that moved must be re-registered, and following would let it point us anywhere),
  and a URL the SSRF guard refuses (scheme, credentials, a disallowed address).

The caller stops at ``delivered`` or ``give_up``, and at ``retry`` once :func:`next_delay`
returns ``None``.

The request goes through the same SSRF guard as :mod:`ben2q.fetch`: the host is resolved once,
every address is checked (``allow_private`` / ``policy``), and the connection goes to the
checked IP itself with the original ``Host`` header and TLS SNI name. The answer's body is
never read, and neither it nor the secret ever appears in an error, a log or a repr.

Receiving
---------
A receiver checks the signature on the raw body, *before* parsing it, and de-duplicates on
``webhook-id``::

    from ben2q.webhooks import WebhookVerificationError, verify

    SECRET = "whsec_..."  # the sender's BEN2Q_WEBHOOK_SECRET

    def handle(raw_body: bytes, headers: Mapping[str, str]) -> int:
        # raw_body: the bytes as received; headers: any mapping, names in any case
        try:
            event = verify(raw_body, headers, SECRET)
        except WebhookVerificationError:
            return 400  # forged, altered, stale (over 5 minutes) or malformed: drop it
        msg_id = {name.lower(): value for name, value in headers.items()}["webhook-id"]
        if seen_before(msg_id):  # a retry of an event already handled
            return 204
        if event["type"] == "job.succeeded":
            outputs = [item["output"] for item in event["data"]["items"]]
            ...
        return 204  # any 2xx ends the retries: answer quickly, do slow work afterwards

Any Standard Webhooks library verifies these requests too (``standardwebhooks.Webhook``).
"""

from __future__ import annotations

import json
import math
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as _PackageVerificationError

from ben2q.errors import FetchFailed, ForbiddenURL
from ben2q.fetch import (
    AddressPolicy,
    _parse_url,
    _ssl_context,
    _Target,
    _validate,
    resolve_and_check,
)
from ben2q.jobs import JobStatus

__all__ = [
    "DEFAULT_RETRY_SCHEDULE",
    "EVENT_TYPES",
    "AttemptResult",
    "WebhookConfig",
    "WebhookVerificationError",
    "build_event",
    "deliver_once",
    "event_type_for",
    "new_message_id",
    "next_delay",
    "sign",
    "verify",
    "webhook_config",
]

DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
"""Seconds before attempt n (``[n - 1]``): immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
10 h -- the Standard Webhooks schedule."""

EVENT_TYPES: frozenset[str] = frozenset(
    {"job.succeeded", "job.partial", "job.failed", "job.cancelled", "job.progress"}
)

Outcome = Literal["delivered", "retry", "give_up"]

_FINAL_TYPES = {
    "succeeded": "job.succeeded",
    "partial": "job.partial",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
_RETRY_STATUSES = frozenset({408, 429})
_USER_AGENT = "ben2q-webhook"
_MSG_ID = re.compile(r"^[!-~]{1,256}$")  # visible ASCII: no spaces, no CR/LF in a header


class WebhookVerificationError(ValueError):
    """A webhook request is not authentic: bad or missing signature headers, a signature that
    does not match the body, or a timestamp over 5 minutes away from now (replay guard)."""

    code = "invalid_signature"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The same ``{"code", "message"}`` form as ``BEN2QError``."""
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt did; the job record keeps these (``WebhookAttempt``).

    ``at`` is the attempt's start (Unix seconds, also its signature's timestamp);
    ``status_code`` is the HTTP answer (``None`` without one); ``error`` says why it was not
    delivered (never containing the response body or the secret).
    """

    attempt: int
    at: float
    status_code: int | None
    error: str | None
    duration_ms: float
    outcome: Outcome


@dataclass(frozen=True)
class WebhookConfig:
    """The webhook settings in one place, with the secret hidden from ``repr``."""

    secret: str | None = field(repr=False)
    timeout: float
    schedule: tuple[float, ...]
    allow_private: bool


def webhook_config(settings: Any = None) -> WebhookConfig:
    """Read the webhook settings from a ``Settings`` (default: the process-wide one).

    Missing attributes fall back to the defaults, so any object with some of the fields works.
    """
    if settings is None:
        from ben2q.config import get_settings

        settings = get_settings()
    secret = getattr(settings, "webhook_secret", None)
    if secret is not None and hasattr(secret, "get_secret_value"):  # pydantic SecretStr
        secret = secret.get_secret_value()
    schedule = tuple(
        float(s) for s in getattr(settings, "webhook_retry_schedule", DEFAULT_RETRY_SCHEDULE)
    )
    _check_schedule(schedule)
    timeout = float(getattr(settings, "webhook_timeout", 10.0))
    if not timeout > 0:
        raise ValueError(f"webhook_timeout must be positive, got {timeout}")
    return WebhookConfig(
        secret=secret or None,
        timeout=timeout,
        schedule=schedule,
        allow_private=bool(getattr(settings, "allow_private_urls", False)),
    )


# --- events ------------------------------------------------------------------------------


def new_message_id() -> str:
    """A fresh ``webhook-id`` for one event; keep it for all of that event's attempts."""
    return f"msg_{uuid.uuid4().hex}"


def event_type_for(status: JobStatus, final: bool) -> str:
    """The event type of ``status``: ``job.<state>`` for the final event, else ``job.progress``.

    A final event of a job that has not finished is a bug of the caller: ``ValueError``.
    """
    if not final:
        return "job.progress"
    try:
        return _FINAL_TYPES[status.state]
    except KeyError:
        raise ValueError(f"job {status.id} is {status.state!r}, not finished") from None


def build_event(status: JobStatus, *, event_type: str, now: datetime | None = None) -> bytes:
    """The JSON body of one event, built once and sent unchanged on every attempt.

    Compact, keys in a fixed order (``type``, ``timestamp``, ``data`` in ``JobStatus``'s
    field order) and pure ASCII, so the signed bytes never depend on an encoder's whims.
    ``now`` (timezone-aware, default: the current time) is the event's ``timestamp``.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}; one of {sorted(EVENT_TYPES)}")
    when = _utc(now) if now is not None else datetime.now(UTC)
    payload = {
        "type": event_type,
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        # pydantic's JSON mode (non-finite floats become null), then our own encoding
        "data": json.loads(status.model_dump_json()),
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# --- signing -----------------------------------------------------------------------------


def sign(body: bytes, *, msg_id: str, timestamp: datetime, secret: str) -> dict[str, str]:
    """The headers of one attempt: ``webhook-id``, ``webhook-timestamp`` (integer seconds),
    ``webhook-signature`` and ``content-type``.

    ``timestamp`` must be timezone-aware (it is converted to UTC here: the package would read
    any datetime's wall clock as UTC). Raises ``ValueError`` for an invalid secret, message id
    or a body that is not UTF-8.
    """
    _check_msg_id(msg_id)
    seconds = math.floor(_utc(timestamp).timestamp())
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the webhook body is not UTF-8") from None
    signature = _webhook(secret).sign(msg_id, datetime.fromtimestamp(seconds, UTC), text)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def verify(body: bytes | str, headers: Mapping[str, str], secret: str) -> dict:
    """For receivers: check a request's signature and freshness; return the parsed event.

    Header names are matched in any case. Raises :class:`WebhookVerificationError` for a
    missing or malformed header, a signature that does not match, a timestamp more than
    5 minutes in the past or future, or a body that is not a JSON object; a plain
    ``ValueError`` for an invalid *secret* (the receiver's configuration error, not the
    sender's: answer it with a 5xx so the sender retries once it is fixed).
    """
    webhook = _webhook(secret)
    lowered = {str(name).lower(): value for name, value in headers.items()}
    try:
        payload = webhook.verify(body, lowered)
    except Exception as exc:  # the package lets ValueError, binascii.Error... through too
        raise WebhookVerificationError(f"webhook verification failed: {_reason(exc)}") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("webhook body is not a JSON object")
    return payload


def _reason(exc: Exception) -> str:
    """A short, safe reason (the package's own messages; never any header or body text)."""
    if isinstance(exc, _PackageVerificationError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return "body is not UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return "body is not JSON"
    return "malformed signature header"


def _webhook(secret: str) -> Webhook:
    if not isinstance(secret, str) or not secret:
        raise ValueError("the webhook secret is empty")
    try:
        return Webhook(secret)
    except Exception:  # binascii.Error, EmptyWebhookSecretError: the message could hold it
        raise ValueError("the webhook secret is not 'whsec_' + base64") from None


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("webhook timestamps must be timezone-aware datetimes")
    return when.astimezone(UTC)


def _check_msg_id(msg_id: str) -> None:
    if not isinstance(msg_id, str) or not _MSG_ID.match(msg_id):
        raise ValueError("a webhook-id is 1 to 256 visible ASCII characters")


def _check_schedule(schedule: Sequence[float]) -> None:
    if not schedule:
        raise ValueError("the retry schedule needs at least one entry")
    if any(not (s >= 0 and math.isfinite(s)) for s in schedule):
        raise ValueError(f"retry delays must be finite and non-negative, got {list(schedule)}")


# --- retry schedule ----------------------------------------------------------------------


class _Uniform(Protocol):
    def uniform(self, a: float, b: float, /) -> float: ...


def next_delay(
    attempt: int,
    schedule: Sequence[float] = DEFAULT_RETRY_SCHEDULE,
    *,
    jitter: float = 0.1,
    rng: _Uniform = random,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or ``None`` if there is none.

    ``attempt`` is the number of the attempt that just failed (attempts count from 1; pass 0
    for the wait before the first). The wait is ``schedule[attempt]`` scaled by a random
    factor in ``[1 - jitter, 1 + jitter]``, so many events failing together (a receiver's
    outage) do not all come back in the same second.
    """
    if attempt < 0:
        raise ValueError(f"attempt numbers start at 1 (0: before the first), got {attempt}")
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter is a fraction in [0, 1), got {jitter}")
    _check_schedule(schedule)
    if attempt >= len(schedule):
        return None
    base = float(schedule[attempt])
    return max(0.0, base * (1.0 + rng.uniform(-jitter, jitter))) if jitter else base


# --- delivery ----------------------------------------------------------------------------


def deliver_once(
    url: str,
    body: bytes,
    *,
    msg_id: str,
    secret: str,
    attempt: int,
    timeout: float,
    allow_private: bool,
    policy: AddressPolicy | None = None,
    now: datetime | None = None,
) -> AttemptResult:
    """POST one signed attempt of an event to ``url`` and classify the outcome.

    Signs afresh (``now``, default the current time, is the signature's timestamp) with the
    event's fixed ``msg_id``. ``timeout`` bounds the whole attempt: resolving, connecting,
    sending and waiting for the answer's headers. ``policy`` replaces the address check as in
    :func:`ben2q.fetch.fetch_bytes`. Network failures are results, not exceptions; only
    invalid arguments (secret, ``msg_id``, a non-UTF-8 body) raise ``ValueError``.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    when = _utc(now) if now is not None else datetime.now(UTC)
    headers = sign(body, msg_id=msg_id, timestamp=when, secret=secret)
    started = time.monotonic()

    def result(outcome: Outcome, status: int | None, error: str | None) -> AttemptResult:
        elapsed = (time.monotonic() - started) * 1000.0
        return AttemptResult(attempt, when.timestamp(), status, error, elapsed, outcome)

    try:
        status = _post(url, body, headers, timeout, allow_private, policy)
    except ForbiddenURL as exc:
        return result("give_up", None, str(exc))
    except httpx.InvalidURL as exc:
        return result("give_up", None, f"malformed URL: {exc}")
    except FetchFailed as exc:  # the name did not resolve (in time)
        return result("retry", None, str(exc))
    except _Expired:
        return result("retry", None, f"timed out (the attempt's limit is {timeout:g} s)")
    except httpx.TimeoutException as exc:
        detail = type(exc).__name__
        return result("retry", None, f"timed out ({detail}; the limit is {timeout:g} s)")
    except httpx.HTTPError as exc:
        return result("retry", None, f"{type(exc).__name__}: {exc}")
    except OSError as exc:  # anything the transport did not wrap
        return result("retry", None, f"{type(exc).__name__}: {exc}")
    if 200 <= status < 300:
        return result("delivered", status, None)
    if status in _RETRY_STATUSES or 500 <= status < 600:
        return result("retry", status, f"HTTP {status}")
    if 300 <= status < 400:
        return result("give_up", status, f"HTTP {status}: redirects are not followed")
    return result("give_up", status, f"HTTP {status}")


class _Expired(Exception):
    """The attempt's hard deadline passed (the watchdog cut the connection)."""


def _post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
    allow_private: bool,
    policy: AddressPolicy | None,
) -> int:
    """POST on the pinned, checked addresses (tried in order while connecting fails); return
    the status code. Raises ForbiddenURL, FetchFailed, _Expired or httpx errors."""
    deadline = time.monotonic() + timeout
    target = _validate(_parse_url(url))
    addresses = resolve_and_check(
        target.host, target.port, allow_private=allow_private, policy=policy, timeout=timeout
    )
    for index, ip in enumerate(addresses):
        try:
            return _post_pinned(target, ip, body, headers, deadline)
        except httpx.ConnectError:
            if index == len(addresses) - 1:
                raise
    raise AssertionError("unreachable: resolve_and_check returns at least one address")


def _post_pinned(
    target: _Target, ip: str, body: bytes, headers: dict[str, str], deadline: float
) -> int:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Expired()
    request_headers = {
        **headers,
        "Host": target.host_header,
        "User-Agent": _USER_AGENT,
        "Accept-Encoding": "identity",
    }
    with (
        _Watchdog(left) as watchdog,
        httpx.Client(
            verify=_ssl_context(), trust_env=False, follow_redirects=False, timeout=left
        ) as client,
    ):
        extensions: dict[str, Any] = {"trace": watchdog.trace}
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
        request = client.build_request(
            "POST",
            target.pinned_url(ip),
            content=body,
            headers=request_headers,
            extensions=extensions,
        )
        try:
            response = client.send(request, stream=True)  # the body is never read
        except (httpx.HTTPError, OSError):
            if watchdog.expired:
                raise _Expired() from None
            raise
        response.close()
        return response.status_code


class _Watchdog:
    """Shuts the attempt's socket down when its time is up.

    httpx's timeouts bound each socket operation, not the request: a receiver that answers
    one byte every few seconds would hold a worker for hours. The socket comes from httpcore's
    ``trace`` events (the connected, then the TLS stream); shutting it down wakes the blocked
    read, which fails, and the attempt reports a timeout.
    """

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.expired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        stream = info.get("return_value")
        if not event.endswith(".complete") or not hasattr(stream, "get_extra_info"):
            return
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sock = sock
                if self.expired:
                    self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass
