"""The I/O layer of jobs: read inputs and write outputs by URI (``s3://``, ``http(s)://``,
``file://``).

Why this module: it is the one boundary where boto3's and the operating system's errors
become ben2q's error codes (``raise ... from exc``, so the original stays as ``__cause__``).
Everything above it (the worker, the task layer) deals only in :mod:`ben2q.errors`, and the
code decides what happens next: ``NotFound``, ``ImageTooLarge`` and ``InvalidRequest`` fail
an item for good; ``StorageError`` (and its ``UploadFailed``) is worth retrying.

Retry policy, in two layers: inside, boto3's *standard* retry mode retries connection
errors, throttling and 5xx answers ``Settings.s3_max_attempts`` times in all, with jittered
exponential backoff; what still fails surfaces as ``StorageError``/``UploadFailed``, and the
task layer retries those with its own, longer backoff (``retry_backoff_max``), up to
``job_max_attempts`` deliveries. Nothing here sleeps on its own.

Error mapping (reads name the field ``input``, writes ``output``)::

    s3 read   NoSuchKey, NoSuchBucket, 404                 -> NotFound
              403 (AccessDenied, InvalidObjectState ...)    -> NotFound ("access denied")
              ContentLength or body over max_image_bytes    -> ImageTooLarge (body not read)
              connection errors, timeouts, throttling, 5xx,
              other answers, no credentials                 -> StorageError
              bad URI, bucket name refused by botocore,
              400 naming the request as invalid (Invalid-
              Request, InvalidArgument, InvalidURI, Invalid-
              BucketName, KeyTooLongError)                  -> InvalidRequest
    s3 write  the same 400s as reads                        -> InvalidRequest("output")
              anything else (incl. NoSuchBucket, 403)       -> UploadFailed
    http(s)   read: fetch.fetch_bytes's errors unchanged (ForbiddenURL, FetchFailed,
              ImageTooLarge); write                         -> InvalidRequest("output")
    file      no local root, outside the root (after
              resolving symlinks), query/fragment, no name  -> InvalidRequest
              read: missing, not a regular file             -> NotFound
              read: over max_image_bytes                    -> ImageTooLarge
              read: other OS errors, root not a directory   -> StorageError
              write: OS errors, root not a directory        -> UploadFailed
    other schemes                                           -> InvalidRequest

A 403 is ``NotFound`` on purpose: S3 answers 403 rather than 404 for a missing key when the
caller lacks ``s3:ListBucket``, so the two cannot be told apart from outside, and neither
gets better by retrying. Nor does a 400 that calls the request itself invalid: S3-compatible
stores refuse keys AWS takes (SeaweedFS: a NUL, ``.`` or ``..`` segments, ``\\`` taken as
``/``), and sending the same key again gets the same answer. Other 400s (``RequestTimeout``,
``ExpiredToken``) stay retryable.

URIs: ``s3://bucket/key`` takes the key literally (as the AWS CLI does: no percent-decoding,
``?`` and ``#`` are part of the key). ``file:///abs/path`` (or ``file://localhost/...``) is
percent-decoded (``a%20b.png`` is ``a b.png``) and must lie inside ``Settings.local_root``;
both are resolved with ``os.path.realpath``, so a symlink inside the root that points out of
it is refused. The final open uses ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a FIFO cannot hang
a read); a local user racing to swap *directories* for symlinks while a call runs is outside
this guard's scope -- it protects against what URIs can name. ``file://`` writes are atomic:
a temporary file in the target's directory, fsynced, then ``os.replace`` -- a crash leaves
either the old output or the new one, never half of one. ``content_type`` and ``metadata``
are stored on S3 objects only.

A :class:`Storage` is safe to share between threads: its one S3 client (boto3 clients are
thread-safe) is created lazily under a lock; file and HTTP calls share no state.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any
from urllib.parse import unquote, urlsplit

import urllib3.exceptions
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
)

from ben2q.config import Settings, get_settings
from ben2q.errors import (
    ImageTooLarge,
    InvalidRequest,
    NotFound,
    StorageError,
    UploadFailed,
)
from ben2q.fetch import fetch_bytes

__all__ = ["Storage"]

_CHUNK = 1024 * 1024
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion", "404"})
_DENIED_CODES = frozenset({"AccessDenied", "Forbidden", "AllAccessDisabled", "403"})
# 400 answers about the request itself: sending it again gets the same answer
_INVALID_CODES = frozenset(
    {"InvalidRequest", "InvalidArgument", "InvalidURI", "InvalidBucketName", "KeyTooLongError"}
)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class Storage:
    """Reads and writes job inputs and outputs by URI; see the module docstring."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._lock = threading.Lock()
        self._client: Any = None

    # --- public API --------------------------------------------------------------------

    def read(self, uri: str) -> bytes:
        """The bytes at ``uri`` (at most ``max_image_bytes`` of them)."""
        scheme = _scheme(uri, "input")
        if scheme == "s3":
            return self._s3_read(uri)
        if scheme in ("http", "https"):
            return fetch_bytes(uri, settings=self.settings)
        if scheme == "file":
            return self._file_read(uri)
        raise InvalidRequest(
            "input", f"unsupported URI scheme {scheme!r}; use s3://, http(s):// or file://"
        )

    def write(
        self,
        uri: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data`` at ``uri``, replacing what was there (atomically for files)."""
        scheme = _scheme(uri, "output")
        if scheme == "s3":
            self._s3_write(uri, data, content_type, metadata)
        elif scheme == "file":
            self._file_write(uri, data)
        elif scheme in ("http", "https"):
            raise InvalidRequest(
                "output", "writing over http(s) is not supported; use s3:// or file://"
            )
        else:
            raise InvalidRequest(
                "output", f"unsupported URI scheme {scheme!r}; use s3:// or file://"
            )

    def exists(self, uri: str) -> bool:
        """Whether ``uri`` names an existing object or regular file.

        S3: a 404 or a 403 is ``False`` (S3 itself does not distinguish them without
        ``s3:ListBucket``); unreachable storage raises ``StorageError``. http(s) is not
        supported (``InvalidRequest``).
        """
        scheme = _scheme(uri, "input")
        if scheme == "s3":
            return self._s3_exists(uri)
        if scheme == "file":
            path = self._local_path(uri, "input")
            return os.path.isfile(path)
        raise InvalidRequest("input", f"exists() supports s3:// and file:// URIs, not {scheme!r}")

    def close(self) -> None:
        """Release the S3 client's connections (a later call creates a new client).

        Call it when no other call on this ``Storage`` is running.
        """
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with suppress(Exception):
                client.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- S3 ----------------------------------------------------------------------------

    def warm(self) -> None:
        """Build the S3 client now (botocore loads its service model, a few hundred ms),
        so that a worker's first job does not pay for it. No request is sent."""
        self._s3()

    def _s3(self) -> Any:
        """The shared S3 client, created on first use (under the lock)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
                client = self._client
        return client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        s = self.settings
        session = boto3.session.Session()  # credentials and region: boto3's standard chain
        options: dict[str, Any] = {
            "region_name": session.region_name or "us-east-1",
            # total_max_attempts counts the first try too (botocore's max_attempts does not)
            "retries": {"mode": "standard", "total_max_attempts": s.s3_max_attempts},
            "connect_timeout": 5,
            "read_timeout": 30,
            "max_pool_connections": max(10, s.io_threads * 2),
            "user_agent_extra": "ben2q",
        }
        if s.s3_endpoint_url:
            # S3-compatible stores (MinIO, SeaweedFS, Ceph): path-style addressing, only the
            # checksums the operation requires (not every store knows the newer ones).
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        return session.client("s3", endpoint_url=s.s3_endpoint_url, config=Config(**options))

    def _s3_read(self, uri: str) -> bytes:
        bucket, key = _split_s3(uri, "input")
        limit = self.settings.max_image_bytes
        try:
            response = self._s3().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise _s3_read_error(uri, exc) from exc
        except BotoCoreError as exc:
            raise _s3_transport_error(uri, exc, "input") from exc
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if length is not None and length > limit:
                raise ImageTooLarge(f"{uri} is {length} bytes, over the limit of {limit} bytes")
            return _read_bounded(body.read, limit, uri)
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(f"reading {uri} failed: {exc}") from exc
        finally:
            with suppress(Exception):
                body.close()

    def _s3_write(
        self, uri: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None
    ) -> None:
        bucket, key = _split_s3(uri, "output")
        if key.endswith("/"):
            raise InvalidRequest("output", f"{uri} names a prefix, not an object")
        args: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Body": bytes(data),
            "ContentType": content_type,
        }
        if metadata:
            args["Metadata"] = dict(metadata)
        try:
            self._s3().put_object(**args)
        except ClientError as exc:
            code, message, status = _client_error_parts(exc)
            if code in _INVALID_CODES:
                detail = f"{code}: {message}" if message else code
                raise InvalidRequest(
                    "output", f"{uri}: the store refused the request ({detail})"
                ) from exc
            if code == "NoSuchBucket":
                reason = f"no such bucket {bucket!r}"
            else:
                reason = f"{code or status}: {message}" if message else str(code or status)
            raise UploadFailed(f"cannot write {uri}: {reason}") from exc
        except NoCredentialsError as exc:
            raise UploadFailed(f"cannot write {uri}: no AWS credentials found") from exc
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise UploadFailed(f"cannot write {uri}: {exc}") from exc

    def _s3_exists(self, uri: str) -> bool:
        bucket, key = _split_s3(uri, "input")
        try:
            self._s3().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code, _message, status = _client_error_parts(exc)
            if status in (403, 404) or code in _NOT_FOUND_CODES or code in _DENIED_CODES:
                return False
            raise _s3_read_error(uri, exc) from exc
        except BotoCoreError as exc:
            raise _s3_transport_error(uri, exc, "input") from exc
        return True

    # --- file:// -----------------------------------------------------------------------

    def _root(self, field: str) -> str:
        root = self.settings.local_root
        if root is None:
            raise InvalidRequest(field, "file:// needs BEN2Q_LOCAL_ROOT (Settings.local_root)")
        return os.path.realpath(os.fspath(root))

    def _local_path(self, uri: str, field: str) -> str:
        """The resolved (symlink-free) path of a ``file://`` URI, checked to be in the root."""
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidRequest(field, f"file:// URIs name no host, got {parts.netloc!r}")
        if parts.query or parts.fragment or uri.endswith(("?", "#")):
            raise InvalidRequest(
                field, "file:// URIs take no query or fragment (percent-encode '?' and '#')"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidRequest(field, "file:// URIs need an absolute path")
        if "\x00" in path:
            raise InvalidRequest(field, "file:// path contains a NUL character")
        root = self._root(field)
        resolved = os.path.realpath(path)
        if not _inside(resolved, root):
            raise InvalidRequest(field, f"{uri} is outside the local root {root}")
        return resolved

    def _file_read(self, uri: str) -> bytes:
        path = self._local_path(uri, "input")
        root = self._root("input")
        if not os.path.isdir(root):
            raise StorageError(f"the local root {root} is not a directory (not mounted?)")
        limit = self.settings.max_image_bytes
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"no such file: {uri}") from exc
        except NotADirectoryError as exc:
            raise NotFound(f"no such file: {uri}") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidRequest("input", f"{uri} changed into a symlink") from exc
            raise StorageError(f"cannot open {uri}: {exc.strerror or exc}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotFound(f"{uri} is not a file")
            if info.st_size > limit:
                raise ImageTooLarge(
                    f"{uri} is {info.st_size} bytes, over the limit of {limit} bytes"
                )
            return _read_bounded(lambda n: os.read(fd, n), limit, uri)
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    def _file_write(self, uri: str, data: bytes) -> None:
        if urlsplit(uri).path.endswith("/"):
            raise InvalidRequest("output", f"{uri} names a directory; a file name is needed")
        path = self._local_path(uri, "output")
        root = self._root("output")
        if path == root:
            raise InvalidRequest("output", f"{uri} names the local root; a file name is needed")
        if not os.path.isdir(root):
            raise UploadFailed(f"cannot write {uri}: the local root {root} is not a directory")
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise UploadFailed(f"cannot write {uri}: {exc.strerror or exc}") from exc
        if not _inside(os.path.realpath(parent), root):  # a symlink appeared meanwhile
            raise InvalidRequest("output", f"{uri} is outside the local root {root}")
        name = os.path.basename(path)
        tmp = os.path.join(parent, f".{name[:200]}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666
            )
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise UploadFailed(f"cannot write {uri}: {exc.strerror or exc}") from exc
        _fsync_dir(parent)


# --- helpers -------------------------------------------------------------------------------


def _scheme(uri: object, field: str) -> str:
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidRequest(field, "must be a non-empty string URI")
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as exc:
        raise InvalidRequest(field, f"malformed URI: {exc}") from exc
    if not scheme:
        raise InvalidRequest(field, f"{uri!r} has no scheme; use s3://, http(s):// or file://")
    return scheme


def _split_s3(uri: str, field: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key is taken literally."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InvalidRequest(field, f"{uri} names no bucket")
    if not key:
        raise InvalidRequest(field, f"{uri} names no object key")
    return bucket, key


def _client_error_parts(exc: ClientError) -> tuple[str, str, int | None]:
    error = exc.response.get("Error", {}) or {}
    status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
    return str(error.get("Code", "") or ""), str(error.get("Message", "") or ""), status


def _s3_read_error(uri: str, exc: ClientError) -> Exception:
    code, message, status = _client_error_parts(exc)
    detail = f"{code or status}" + (f": {message}" if message else "")
    if status == 404 or code in _NOT_FOUND_CODES:
        if code == "NoSuchBucket":
            return NotFound(f"no such bucket for {uri}")
        return NotFound(f"no such object: {uri}")
    if status == 403 or code in _DENIED_CODES:
        return NotFound(f"access denied to {uri} ({detail})")
    if code in _INVALID_CODES:
        return InvalidRequest("input", f"{uri}: the store refused the request ({detail})")
    # Throttling, 5xx (after boto3's own retries) and anything unexpected: retryable.
    return StorageError(f"reading {uri} failed ({detail})")


def _s3_transport_error(uri: str, exc: BotoCoreError, field: str) -> Exception:
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(field, f"{uri}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"cannot read {uri}: no AWS credentials found")
    return StorageError(f"cannot reach S3 for {uri}: {exc}")


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives, or mixing absolute and relative
        return False


def _read_bounded(read: Callable[[int], bytes], limit: int, what: str) -> bytes:
    """Read to the end, but never more than ``limit + 1`` bytes: over ``limit`` is an error."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise ImageTooLarge(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: not every platform allows it)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
