"""API keys, their scopes and their rate limits: what the HTTP API and ``ben2q keys`` share.

A key is a bearer token ``b2q_<id>_<secret>``. Only its SHA-256 is stored (the secret has
256 random bits, so a slow password hash would add nothing but latency); the id in the
token finds the record in one read, and the digest is compared in constant time. A key is
looked up on every request, never cached, so a revoked key stops working at once on every
API replica.

Layout in Redis (beside the job records)::

    ben2q:apikey:{id}                  the ApiKey JSON (no TTL; revoked keys stay listed)
    ben2q:apikeys                      set of key ids
    ben2q:tenant:{id}:jobs             sorted set of the key's job ids by creation time
    ben2q:rate:{id}:{limit}:{window}   fixed-window counters (EX one window)

Scopes (I/O-free): a key reads inputs under its ``input_prefixes`` (any scheme; ``file://``
only this way) or, when ``allow_urls``, public ``https`` URLs; it writes outputs under its
output prefix only. Paths are compared after decoding, and anything that could step out
of a prefix is refused outright: ``..`` or ``.`` segments, empty segments, backslashes and
percent-encoded ``/``, ``\\`` or ``.``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
from pydantic import BaseModel, Field

from .errors import BEN2QError, InvalidRequest

__all__ = [
    "ApiKey",
    "ScopeError",
    "new_token",
    "parse_token",
    "token_hash",
    "KeyStore",
    "AsyncKeyStore",
    "RateLimit",
    "RateDecision",
    "check_input",
    "resolve_output",
    "under_prefix",
]

TOKEN_PREFIX = "b2q_"
_TOKEN = re.compile(r"^b2q_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.=+@-]{1,200}$")
_ENCODED = re.compile(r"%(2f|5c|2e)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ScopeError(BEN2QError):
    """A request reaches outside its key's scope (an input or output location); ``field``
    names where. HTTP 403."""

    code = "forbidden"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ApiKey(BaseModel):
    """One API key (a tenant): what it may read and write, and its limits."""

    id: str = Field(pattern=r"^[0-9a-f]{16}$")
    name: str
    hash: str
    """SHA-256 (hex) of the whole token."""
    input_prefixes: list[str] = []
    """Locations inputs may come from (``s3://b/p/``, ``file:///dir/``, ``https://host/p/``)."""
    allow_urls: bool = True
    """Inputs may also be public ``https`` URLs (through the SSRF guard)."""
    output_prefix: str | None = None
    """Where this key's outputs land; None: ``BEN2Q_API_OUTPUT_LOCATION`` + ``<id>/``."""
    rate_requests: int | None = Field(None, ge=1)
    """Requests per minute; None: ``BEN2Q_API_RATE_REQUESTS``."""
    rate_images: int | None = Field(None, ge=1)
    """Images submitted per minute (a batch counts its images); None: the default."""
    max_batch: int | None = Field(None, ge=1)
    """Inputs of one batch job at most; None: ``BEN2Q_MAX_BATCH_ITEMS``."""
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


# --- tokens ----------------------------------------------------------------------------


def new_token() -> tuple[str, str]:
    """A fresh ``(key id, token)``."""
    key_id = secrets.token_hex(8)
    return key_id, f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def parse_token(token: str) -> str | None:
    """The key id in a well-formed token, or None."""
    match = _TOKEN.match(token)
    return match.group(1) if match else None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def matches(key: ApiKey, token: str) -> bool:
    return hmac.compare_digest(key.hash, token_hash(token))


# --- scopes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    scheme: str
    host: str
    segments: tuple[str, ...]
    directory: bool


def _location(uri: str, field: str) -> _Location:
    """Split a URI for prefix comparison; ``ScopeError`` for anything that could escape."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise InvalidRequest(field, f"malformed URI: {exc}") from exc
    if _CONTROL.search(uri):
        raise InvalidRequest(field, "control characters are not allowed in a URI")
    scheme = parts.scheme.lower()
    if scheme in ("s3", "file") and ("?" in uri or "#" in uri):
        # storage takes everything after the bucket as the key (and refuses both in file://
        # paths), so a '?' or '#' would hide part of the key from the comparison below
        raise ScopeError(field, "'?' and '#' are not allowed in s3:// and file:// locations")
    raw = parts.path
    if "\\" in raw or _ENCODED.search(raw):
        raise ScopeError(field, "encoded '/', '\\' or '.' is not allowed in a location")
    if scheme == "s3":
        # storage reads s3 keys literally (no percent-decoding) and the bucket is the whole
        # netloc: compare exactly what it will read
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ScopeError(field, "an s3:// location names a bucket only (no user or port)")
        path = raw
    else:
        path = unquote(raw)
    segments = tuple(path.split("/")[1:]) if path.startswith("/") else tuple(path.split("/"))
    directory = path.endswith("/") or not path
    if directory:
        segments = segments[:-1] if segments and segments[-1] == "" else segments
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ScopeError(field, "empty, '.' and '..' path segments are not allowed")
    if scheme == "s3":
        host = parts.netloc
    else:
        try:
            port = parts.port
        except ValueError as exc:
            raise InvalidRequest(field, f"malformed URI: {exc}") from exc
        host = (parts.hostname or "").lower()
        if port is not None:
            host = f"{host}:{port}"
    return _Location(scheme, host, segments, directory)


def under_prefix(uri: str, prefix: str, field: str = "input") -> bool:
    """Whether ``uri`` lies under the location ``prefix`` (compared segment by segment)."""
    where = _location(uri, field)
    base = _location(prefix if prefix.endswith("/") else prefix + "/", "prefix")
    return (
        where.scheme == base.scheme
        and where.host == base.host
        and where.segments[: len(base.segments)] == base.segments
        and (len(where.segments) > len(base.segments) or where.directory)
    )


def check_input(key: ApiKey, uri: str, field: str) -> str:
    """``uri`` if ``key`` may read it; ``ScopeError`` naming ``field`` otherwise.

    The address check of an https URL (DNS, private ranges) is the fetcher's, at submit
    and again at the worker; this only decides whether the key may name the location.
    """
    if not isinstance(uri, str):
        raise InvalidRequest(field, "must be a string URI")
    where = _location(uri, field)  # malformed or smuggling URIs fail here, prefixes or not
    for prefix in key.input_prefixes:
        if under_prefix(uri, prefix, field):
            return uri
    if where.scheme == "https" and key.allow_urls:
        return uri
    allowed = ", ".join(key.input_prefixes) or "no prefixes"
    urls = "public https URLs" if key.allow_urls else "no URLs"
    raise ScopeError(field, f"this key may read {allowed} and {urls}")


def key_output_prefix(key: ApiKey, default_location: str | None) -> str:
    """The key's output prefix (ends with '/'); ``InvalidRequest`` when none is configured."""
    if key.output_prefix:
        return key.output_prefix if key.output_prefix.endswith("/") else key.output_prefix + "/"
    if not default_location:
        raise InvalidRequest(
            "output", "this key has no output prefix and BEN2Q_API_OUTPUT_LOCATION is unset"
        )
    base = default_location if default_location.endswith("/") else default_location + "/"
    return f"{base}{key.id}/"


def resolve_output(key: ApiKey, output: str | None, default_location: str | None) -> str:
    """Where a request's outputs go: the key's prefix, plus the request's sub-path.

    ``output`` may be a relative sub-path (``catalog/2026``) or a full URI under the key's
    prefix; anything else (``..``, encoded slashes, another bucket or scheme, a ``file://``
    path outside the prefix) is a ``ScopeError`` naming ``output``.
    """
    base = key_output_prefix(key, default_location)
    if output is None or output in ("", "/"):
        return base
    if not isinstance(output, str) or len(output) > 1024:
        raise InvalidRequest("output", "must be a sub-path or a URI of at most 1024 characters")
    if "://" in output:
        if not under_prefix(output if output.endswith("/") else output + "/", base, "output"):
            raise ScopeError("output", f"outputs of this key must lie under {base}")
        return output if output.endswith("/") else output + "/"
    if "\\" in output or "%" in output:
        raise ScopeError("output", "'%' and '\\' are not allowed in an output sub-path")
    segments = output.strip("/").split("/")
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.match(segment):
            raise ScopeError(
                "output",
                "an output sub-path is '/'-separated segments of letters, digits and "
                "'_.=+@-' (no '.' or '..')",
            )
    return base + "/".join(segments) + "/"


# --- rate limits -----------------------------------------------------------------------

WINDOW = 60
"""Seconds of one rate-limit window (limits are per minute)."""

_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if used + cost > limit then return {0, used} end
used = redis.call('INCRBY', KEYS[1], cost)
if used == cost then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, used}
"""
"""Take ``cost`` units if they fit under ``limit`` in this window; nothing taken otherwise."""

_AUTHENTICATE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {0} end
local key = cjson.decode(raw)
if key.hash ~= ARGV[1] or (key.revoked_at ~= nil and key.revoked_at ~= cjson.null) then
  return {0}
end
local quota = tonumber(ARGV[2])
if key.rate_requests ~= nil and key.rate_requests ~= cjson.null then
  quota = tonumber(key.rate_requests)
end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local ok = 0
if used + 1 <= quota then
  used = redis.call('INCRBY', KEYS[2], 1)
  if used == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
  ok = 1
end
return {1, raw, ok, used, quota}
"""
"""Find an active key by its id and token hash, and take one request from its limit, in one
round trip. Only a key that matches takes a unit: a wrong token never spends a tenant's
requests. (The hashes compared are SHA-256 digests of secrets, so the comparison's timing
tells nothing useful.)"""


@dataclass(frozen=True)
class RateLimit:
    """One per-key limit: ``quota`` units per ``WINDOW`` seconds, named for the headers."""

    name: str
    quota: int


@dataclass(frozen=True)
class RateDecision:
    """The outcome of taking units from a limit, and what the headers say about it."""

    limit: RateLimit
    allowed: bool
    remaining: int
    reset: int
    """Seconds until the window ends."""

    def policy_item(self) -> str:
        return f'"{self.limit.name}";q={self.limit.quota};w={WINDOW}'

    def item(self) -> str:
        return f'"{self.limit.name}";r={self.remaining};t={self.reset}'


def _window(now: float) -> tuple[int, int]:
    index = int(now // WINDOW)
    return index, max(1, math.ceil((index + 1) * WINDOW - now))


# --- stores ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyNames:
    prefix: str = "ben2q"

    def key(self, key_id: str) -> str:
        return f"{self.prefix}:apikey:{key_id}"

    @property
    def all(self) -> str:
        return f"{self.prefix}:apikeys"

    def jobs(self, key_id: str) -> str:
        return f"{self.prefix}:tenant:{key_id}:jobs"

    def rate(self, key_id: str, limit: str, window: int) -> str:
        return f"{self.prefix}:rate:{key_id}:{limit}:{window}"


NAMES = KeyNames()


class KeyStore:
    """Create, list and revoke keys (sync: the ``ben2q keys`` command)."""

    def __init__(self, redis_url: str, *, names: KeyNames = NAMES) -> None:
        self.names = names
        self.redis: redis.Redis = redis.Redis.from_url(redis_url, socket_connect_timeout=5)

    @classmethod
    def on(cls, client: redis.Redis, *, names: KeyNames = NAMES) -> KeyStore:
        """A store over an existing connection (a worker's status store's)."""
        store = cls.__new__(cls)
        store.names, store.redis = names, client
        return store

    def create(
        self,
        name: str,
        *,
        input_prefixes: Sequence[str] = (),
        output_prefix: str | None = None,
        allow_urls: bool = True,
        rate_requests: int | None = None,
        rate_images: int | None = None,
        max_batch: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its token (the only time the token exists outside the caller)."""
        for i, prefix in enumerate(input_prefixes):
            _check_prefix(prefix, f"input_prefixes[{i}]", ("s3", "file", "http", "https"))
        if output_prefix is not None:
            _check_prefix(output_prefix, "output_prefix", ("s3", "file"))
        key_id, token = new_token()
        key = ApiKey(
            id=key_id,
            name=name,
            hash=token_hash(token),
            input_prefixes=[_slash(p) for p in input_prefixes],
            allow_urls=allow_urls,
            output_prefix=None if output_prefix is None else _slash(output_prefix),
            rate_requests=rate_requests,
            rate_images=rate_images,
            max_batch=max_batch,
            created_at=time.time(),
        )
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.names.key(key_id), key.model_dump_json())
            pipe.sadd(self.names.all, key_id)
            pipe.execute()
        return key, token

    def get(self, key_id: str) -> ApiKey | None:
        raw = self.redis.get(self.names.key(key_id))
        return None if raw is None else ApiKey.model_validate_json(raw)

    def list(self) -> list[ApiKey]:
        ids = sorted(i.decode() for i in self.redis.smembers(self.names.all))
        raws = self.redis.mget([self.names.key(i) for i in ids]) if ids else []
        keys = [ApiKey.model_validate_json(r) for r in raws if r is not None]
        return sorted(keys, key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key for good (its record stays, marked); None if there is no such key."""
        key = self.get(key_id)
        if key is None:
            return None
        if key.revoked_at is None:
            key.revoked_at = time.time()
            self.redis.set(self.names.key(key_id), key.model_dump_json())
        return key

    def close(self) -> None:
        self.redis.close()


class AsyncKeyStore:
    """Authentication, job indexes and rate limits for the HTTP API (``redis.asyncio``)."""

    def __init__(self, client: aredis.Redis, *, names: KeyNames = NAMES) -> None:
        self.names = names
        self.redis = client
        self._take = client.register_script(_TAKE)
        self._authenticate = client.register_script(_AUTHENTICATE)

    async def authenticate(self, token: str) -> ApiKey | None:
        """The active key of ``token``, or None (malformed, unknown, wrong or revoked)."""
        key_id = parse_token(token)
        if key_id is None:
            return None
        raw = await self.redis.get(self.names.key(key_id))
        if raw is None:
            return None
        key = ApiKey.model_validate_json(raw)
        if not matches(key, token) or not key.active:
            return None
        return key

    async def authenticate_request(
        self, token: str, default_quota: int, *, now: float | None = None
    ) -> tuple[ApiKey, RateDecision] | None:
        """``authenticate`` and one unit of the key's request limit, in one round trip."""
        key_id = parse_token(token)
        if key_id is None:
            return None
        index, reset = _window(time.time() if now is None else now)
        reply = await self._authenticate(
            keys=[self.names.key(key_id), self.names.rate(key_id, "requests", index)],
            args=[token_hash(token), default_quota, WINDOW + 1],
        )
        if not reply or not reply[0]:
            return None
        _, raw, ok, used, quota = reply
        key = ApiKey.model_validate_json(raw)
        limit = RateLimit("requests", int(quota))
        remaining = max(0, int(quota) - int(used))
        return key, RateDecision(limit=limit, allowed=bool(ok), remaining=remaining, reset=reset)

    async def take(
        self, key_id: str, limit: RateLimit, cost: int = 1, *, now: float | None = None
    ) -> RateDecision:
        """Take ``cost`` units from ``limit`` in the current window (atomically)."""
        index, reset = _window(time.time() if now is None else now)
        ok, used = await self._take(
            keys=[self.names.rate(key_id, limit.name, index)],
            args=[cost, limit.quota, WINDOW + 1],
        )
        remaining = max(0, limit.quota - int(used))
        return RateDecision(limit=limit, allowed=bool(ok), remaining=remaining, reset=reset)

    async def add_job(self, key_id: str, job_id: str, created_at: float, ttl: int) -> None:
        """Index a job under its key (newest first listing); drop entries past the TTL."""
        name = self.names.jobs(key_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(name, {job_id: created_at})
            pipe.zremrangebyscore(name, "-inf", created_at - ttl)
            pipe.expire(name, ttl)
            await pipe.execute()

    async def job_page(
        self, key_id: str, *, before: tuple[float, str] | None, count: int
    ) -> list[tuple[str, float]]:
        """Up to ``count`` (job id, created_at) of the key, newest first, strictly older
        than the cursor ``before`` = (created_at, job id)."""
        name = self.names.jobs(key_id)
        top: Any = "+inf" if before is None else before[0]
        rows = await self.redis.zrevrangebyscore(
            name, top, "-inf", start=0, num=count + 64, withscores=True
        )
        out: list[tuple[str, float]] = []
        for raw_id, score in rows:
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if before is not None and (score, job_id) >= before:
                continue
            out.append((job_id, score))
            if len(out) == count:
                break
        return out

    async def forget_jobs(self, key_id: str, job_ids: Sequence[str]) -> None:
        """Drop expired jobs from the key's index."""
        if job_ids:
            await self.redis.zrem(self.names.jobs(key_id), *job_ids)


def _slash(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def _check_prefix(uri: str, field: str, schemes: tuple[str, ...]) -> None:
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in schemes:
        raise InvalidRequest(field, f"{uri!r}: use one of {', '.join(s + '://' for s in schemes)}")
    _location(_slash(uri), field)
    if scheme != "file" and not urlsplit(uri).hostname:
        raise InvalidRequest(field, f"{uri!r} names no bucket or host")
