"""``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header) for the job-making POSTs.

A client that sends the same key (per API key: tenants never share them) with the same
request within ``BEN2Q_API_IDEMPOTENCY_TTL`` gets the same job and the same answer, so a
retry after a lost response never makes a second job, on whichever replica it lands.

Two Redis keys per idempotency key, beside the job records::

    ben2q:idem:{key id}:{sha256(key)}        the outcome: fingerprint, job id, answer (EX ttl)
    ben2q:idem:{key id}:{sha256(key)}:lock   the in-flight lock (SET NX PX, renewed)

The lock is taken before the request is processed, so two replicas receiving the same
request at once make one job: the second answers 409 ``idempotency_key_in_use``. It lives
``LOCK_MS`` and is renewed while the request runs, so a crashed replica frees it within
seconds, and a long upload or ``Prefer: wait`` keeps it. The outcome is written right after
the job is enqueued (job id and the answer as it stands), and again with the final answer
when the request waited; a request that fails before its job is enqueued (any 4xx, a 503)
stores nothing and frees the key, so the client can fix the request and retry with it.

The fingerprint is SHA-256 over the method, the path and query, the Content-Type header
and the raw body bytes, hashed as they stream in (an ASGI ``receive`` wrapper), so uploads are never
held in memory for it. A multipart retry must therefore resend the same bytes (the same
boundary), which is what a retry of one serialized request does. A replay still drains the
body (bounded) to compare fingerprints: the same key with another body is 422
``idempotency_key_mismatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response
from starlette.types import Message, Receive

from ..keys import ApiKey
from .bodies import is_json, too_large
from .problems import Problem
from .state import Services

log = logging.getLogger("ben2q.api")

HEADER = "Idempotency-Key"
MAX_LENGTH = 255
LOCK_MS = 30_000
"""Life of the in-flight lock; renewed every third of it while the request runs."""
REPLAYED = "Idempotent-Replayed"
"""Header on a replayed answer (not in the draft; tells a client it saw a stored answer)."""
KEPT_HEADERS = ("location", "preference-applied", "content-type", "x-job-id")
"""Headers of an answer that are part of what a replay repeats (not ``RateLimit``)."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def invalid_key(detail: str) -> Problem:
    return Problem(
        400,
        "idempotency_key_invalid",
        f"{HEADER}: {detail}",
        errors=[{"pointer": f"header:{HEADER}", "detail": detail}],
    )


_BARE = r"[!#-\[\]-~](?:[ !#-\[\]-~]*[!#-\[\]-~])?"
_QUOTED = r'"(?:[ !#-\[\]-~]|\\["\\])+"'
PATTERN = f"^(?:{_BARE}|{_QUOTED})$"
"""What the field may hold: a bare key of visible ASCII (no quote or backslash, no outer
spaces) or a Structured Field String (``"..."``, escaping only ``\\"`` and ``\\\\``)."""
_FIELD = re.compile(PATTERN)

PARAMETER: dict[str, Any] = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": "Makes retries safe: the same key and request within the idempotency TTL "
    "(24 h by default) give the same job and answer (draft-ietf-httpapi-idempotency-key-"
    "header). At most 255 characters as sent; a quoted form is a Structured Field String.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_LENGTH, "pattern": PATTERN},
}
"""The header in OpenAPI, exactly as ``parse_key`` accepts it."""


def parse_key(request: Request) -> str | None:
    """The request's idempotency key, or None; 400 for a malformed one.

    The draft makes the field a Structured Field String (``"..."``); bare values are
    accepted too, since most clients send them so. Anything else (empty, over 255
    characters, non-ASCII, controls, two fields) is refused rather than guessed at.
    """
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise invalid_key("send one Idempotency-Key field")
    raw = values[0].strip(" \t")
    if not raw:
        raise invalid_key("the key is empty")
    if len(raw) > MAX_LENGTH:
        raise invalid_key(f"the field is longer than {MAX_LENGTH} characters")
    if not _FIELD.match(raw):
        raise invalid_key(
            "a key is visible ASCII without '\"' or '\\', or a quoted Structured Field String"
        )
    if raw[0] == '"':
        return re.sub(r'\\(["\\])', r"\1", raw[1:-1])
    return raw


class Fingerprint:
    """Hashes a request's body as it streams by (replaces the request's ASGI receive)."""

    def __init__(self, request: Request) -> None:
        self._hash = hashlib.sha256()
        content_type = request.headers.get("content-type", "").strip()
        target = request.url.path + "?" + request.url.query  # /v1/remove takes options there
        for part in (request.method, target, content_type):
            self._hash.update(part.encode("latin-1", "replace") + b"\n")
        self._inner: Receive = request._receive
        request._receive = self.receive
        self.read = 0
        self.complete = False
        self.disconnected = False

    async def receive(self) -> Message:
        message = await self._inner()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            self.read += len(body)
            self._hash.update(body)
            if not message.get("more_body", False):
                self.complete = True
        elif message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def digest(self, limit: int) -> str:
        """The fingerprint; reads (hashes, drops) what is left of the body, up to ``limit``."""
        while not self.complete and not self.disconnected:
            await self.receive()
            if self.read > limit:
                raise too_large("the body", limit)
        if self.disconnected and not self.complete:
            raise Problem(400, "invalid_request", "the client closed before the body ended")
        return self._hash.hexdigest()


@dataclass(frozen=True)
class Stored:
    """The outcome of an earlier request with the same key."""

    fingerprint: str
    job_id: str
    status: int | None = None
    body: bytes | None = None
    headers: Mapping[str, str] | None = None

    def response(self) -> Response | None:
        """The stored answer, again (None when only the job was stored: re-make it)."""
        if self.status is None or self.body is None:
            return None
        headers = {**(self.headers or {}), REPLAYED: "true"}
        media_type = headers.pop("content-type", "application/json")
        return Response(self.body, status_code=self.status, headers=headers, media_type=media_type)

    def dumps(self) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                "job_id": self.job_id,
                "status": self.status,
                "body": None if self.body is None else self.body.decode("latin-1"),
                "headers": dict(self.headers or {}),
            }
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> Stored:
        doc: dict[str, Any] = json.loads(raw)
        body = doc.get("body")
        return cls(
            fingerprint=doc["fingerprint"],
            job_id=doc["job_id"],
            status=doc.get("status"),
            body=None if body is None else body.encode("latin-1"),
            headers=doc.get("headers") or {},
        )


class Claim:
    """This request's hold on an idempotency key: ``stored`` (a replay) or the right to
    make the job, then ``save`` its outcome."""

    def __init__(self, svc: Services, key: ApiKey, value: str, request: Request) -> None:
        digest = hashlib.sha256(value.encode("ascii")).hexdigest()
        self.svc = svc
        self.name = f"{svc.keys.names.prefix}:idem:{key.id}:{digest}"
        self.lock = self.name + ":lock"
        self.token = secrets.token_hex(16)
        self.fingerprint = Fingerprint(request)
        self.limit = body_limit(svc, request)
        self.stored: Stored | None = None

    async def acquire(self) -> None:
        got = await self.svc.redis.set(self.lock, self.token, nx=True, px=LOCK_MS)
        if not got:
            raise Problem(
                409,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still being processed; retry later",
                headers={"Retry-After": "1"},
            )

    async def renew(self) -> None:
        """Keep the lock while the request runs (it ends with the request's task)."""
        while True:
            await asyncio.sleep(LOCK_MS / 3000)
            try:
                await self.svc.redis.eval(_RENEW, 1, self.lock, self.token, LOCK_MS)
            except Exception:  # noqa: BLE001 - a missed renewal only shortens the lock
                log.warning("could not renew the idempotency lock %s", self.lock, exc_info=True)

    async def release(self) -> None:
        await self.svc.redis.eval(_RELEASE, 1, self.lock, self.token)

    async def load(self) -> None:
        """Find an earlier outcome; compare fingerprints (422 when the body differs)."""
        raw = await self.svc.redis.get(self.name)
        if raw is None:
            return
        stored = Stored.loads(raw)
        if await self.fingerprint.digest(self.limit) != stored.fingerprint:
            raise Problem(
                422,
                "idempotency_key_mismatch",
                "this Idempotency-Key was used with another request (method, path, "
                "content type or body); use a new key for a new request",
            )
        self.stored = stored

    async def save(self, job_id: str, response: Response | None = None) -> None:
        """Remember the job (and the answer, if it can be repeated byte for byte)."""
        headers = None
        if response is not None:
            headers = {k: v for k, v in response.headers.items() if k in KEPT_HEADERS}
        stored = Stored(
            fingerprint=await self.fingerprint.digest(self.limit),
            job_id=job_id,
            status=None if response is None else response.status_code,
            body=None if response is None else bytes(response.body),
            headers=headers,
        )
        await self.svc.redis.set(
            self.name, stored.dumps(), ex=self.svc.settings.api_idempotency_ttl
        )


def body_limit(svc: Services, request: Request) -> int:
    """Bytes a replay drains at most to compare fingerprints (what processing allows)."""
    settings = svc.settings
    if is_json(request):
        return settings.api_max_json_bytes
    return settings.max_image_bytes * settings.api_max_upload_files + 1024 * 1024


@contextlib.asynccontextmanager
async def claim(request: Request, svc: Services, key: ApiKey) -> AsyncIterator[Claim | None]:
    """Hold the request's ``Idempotency-Key`` (None when it sent none) for the block.

    Inside, ``claim.stored`` is an earlier outcome to answer again; otherwise make the job
    and ``save`` it. The lock is released when the block ends, however it ends.
    """
    value = parse_key(request)
    if value is None:
        yield None
        return
    held = Claim(svc, key, value, request)
    await held.acquire()
    renewal = asyncio.create_task(held.renew())
    try:
        await held.load()
        yield held
    finally:
        renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewal
        try:
            await asyncio.shield(held.release())
        except Exception:  # noqa: BLE001 - the lock then expires on its own
            log.warning("could not release the idempotency lock %s", held.lock, exc_info=True)
