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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
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

__all__ = ["Entry", "Reader", "Storage"]

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


@dataclass(frozen=True)
class Entry:
    """One object or file found by ``Storage.list``."""

    uri: str
    size: int
    modified: float
    """Epoch seconds (S3 ``LastModified``, a file's mtime)."""


class Reader:
    """An open output being streamed: ``read(n)`` until ``b""``, then ``close()``.

    ``size`` and ``content_type`` come from the store (S3's headers, a file's size and
    extension), so an answer can carry ``Content-Length`` before the first byte is read.
    """

    def __init__(
        self, read: Callable[[int], bytes], close: Callable[[], None], size: int, content_type: str
    ) -> None:
        self._read = read
        self._close = close
        self.size = size
        self.content_type = content_type

    def read(self, n: int = _CHUNK) -> bytes:
        return self._read(n)

    def close(self) -> None:
        with suppress(Exception):
            self._close()


_TYPES_BY_EXT = {".png": "image/png", ".webp": "image/webp", ".jpg": "image/jpeg"}


class Storage:
    """Reads and writes job inputs and outputs by URI; see the module docstring."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._lock = threading.Lock()
        self._client: Any = None
        self._presign_client: Any = None
        self._presign_endpoint: str | None = None

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

    def open(self, uri: str) -> Reader:
        """A streaming reader of the object or file at ``uri`` (no size limit: for answering
        outputs, which may be larger than any input, without holding them in memory)."""
        scheme = _scheme(uri, "input")
        if scheme == "s3":
            return self._s3_open(uri)
        if scheme == "file":
            return self._file_open(uri)
        raise InvalidRequest("input", f"open() supports s3:// and file:// URIs, not {scheme!r}")

    def presign(self, uri: str, expiry: int, *, endpoint_url: str | None = None) -> str:
        """A presigned GET URL of the ``s3://`` object ``uri``, valid ``expiry`` seconds.

        ``endpoint_url`` signs for the address clients use (the signature covers the host),
        when that differs from ``BEN2Q_S3_ENDPOINT_URL``; no request is sent either way.
        """
        bucket, key = _split_s3(uri, "input")
        client = self._s3() if endpoint_url in (None, self.settings.s3_endpoint_url) else None
        if client is None:
            with self._lock:
                if self._presign_client is None or self._presign_endpoint != endpoint_url:
                    self._presign_client = self._make_client(endpoint_url)
                    self._presign_endpoint = endpoint_url
                client = self._presign_client
        try:
            return client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expiry)
            )
        except NoCredentialsError as exc:
            raise StorageError(f"cannot presign {uri}: no AWS credentials found") from exc
        except BotoCoreError as exc:
            raise _s3_transport_error(uri, exc, "input") from exc

    def list(self, uri: str) -> Iterator[Entry]:
        """Every object or regular file under the location ``uri`` (recursively), for
        retention sweeps; symlinks are not followed."""
        scheme = _scheme(uri, "input")
        if scheme == "s3":
            yield from self._s3_list(uri)
        elif scheme == "file":
            yield from self._file_list(uri)
        else:
            raise InvalidRequest("input", f"list() supports s3:// and file:// URIs, not {scheme!r}")

    def delete(self, uris: Sequence[str]) -> None:
        """Delete objects or files (missing ones are no error); ``StorageError`` otherwise."""
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            scheme = _scheme(uri, "output")
            if scheme == "s3":
                bucket, key = _split_s3(uri, "output")
                by_bucket.setdefault(bucket, []).append(key)
            elif scheme == "file":
                path = self._local_path(uri, "output")
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StorageError(f"cannot delete {uri}: {exc.strerror or exc}") from exc
            else:
                raise InvalidRequest("output", f"cannot delete {scheme}:// URIs")
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 at most
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                try:
                    answer = self._s3().delete_objects(
                        Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                    )
                except ClientError as exc:
                    code, message, status = _client_error_parts(exc)
                    raise StorageError(
                        f"cannot delete in s3://{bucket}/: {code or status} {message}"
                    ) from exc
                except BotoCoreError as exc:
                    raise StorageError(f"cannot reach S3 for s3://{bucket}/: {exc}") from exc
                errors = answer.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"cannot delete s3://{bucket}/{first.get('Key')}: "
                        f"{first.get('Code')} {first.get('Message', '')}".rstrip()
                    )

    def s3_client(self) -> Any:
        """The shared boto3 S3 client (for bucket-level calls such as lifecycle rules)."""
        return self._s3()

    def close(self) -> None:
        """Release the S3 client's connections (a later call creates a new client).

        Call it when no other call on this ``Storage`` is running.
        """
        with self._lock:
            clients = (self._client, self._presign_client)
            self._client = self._presign_client = None
        for client in clients:
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

    def _make_client(self, endpoint_url: str | None = None) -> Any:
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
            # SigV4 everywhere; presigned URLs would otherwise be signed with legacy SigV2
            "signature_version": "s3v4",
        }
        endpoint_url = endpoint_url or s.s3_endpoint_url
        if endpoint_url:
            # S3-compatible stores (MinIO, SeaweedFS, Ceph): path-style addressing, only the
            # checksums the operation requires (not every store knows the newer ones).
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        return session.client("s3", endpoint_url=endpoint_url, config=Config(**options))

    def _s3_get(self, uri: str) -> dict[str, Any]:
        """``get_object`` of an input, its errors translated (the body is not read)."""
        bucket, key = _split_s3(uri, "input")
        try:
            response = self._s3().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise _s3_read_error(uri, exc) from exc
        except BotoCoreError as exc:
            raise _s3_transport_error(uri, exc, "input") from exc
        return response

    def _s3_read(self, uri: str) -> bytes:
        limit = self.settings.max_image_bytes
        response = self._s3_get(uri)
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

    def _s3_open(self, uri: str) -> Reader:
        response = self._s3_get(uri)
        body = response["Body"]

        def read(n: int) -> bytes:
            try:
                return body.read(n)
            except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                raise StorageError(f"reading {uri} failed: {exc}") from exc

        return Reader(
            read,
            body.close,
            int(response.get("ContentLength") or 0),
            response.get("ContentType") or "application/octet-stream",
        )

    def _s3_list(self, uri: str) -> Iterator[Entry]:
        rest = uri.split("://", 1)[1]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InvalidRequest("input", f"{uri} names no bucket")
        paginator = self._s3().get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents") or []:
                    yield Entry(
                        f"s3://{bucket}/{obj['Key']}",
                        int(obj.get("Size") or 0),
                        obj["LastModified"].timestamp(),
                    )
        except ClientError as exc:
            raise _s3_read_error(uri, exc) from exc
        except BotoCoreError as exc:
            raise _s3_transport_error(uri, exc, "input") from exc

    # --- file:// -----------------------------------------------------------------------

    def _file_open(self, uri: str) -> Reader:
        path = self._local_path(uri, "input")
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"no such file: {uri}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open {uri}: {exc.strerror or exc}") from exc
        try:
            info = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise NotFound(f"{uri} is not a file")
        ext = os.path.splitext(path)[1].lower()
        return Reader(
            lambda n: os.read(fd, n),
            lambda: os.close(fd),
            info.st_size,
            _TYPES_BY_EXT.get(ext, "application/octet-stream"),
        )

    def _file_list(self, uri: str) -> Iterator[Entry]:
        base = self._local_path(uri if uri.endswith("/") else uri + "/", "input")
        if not os.path.isdir(base):
            return
        for parent, dirs, files in os.walk(base):  # os.walk does not follow symlinks
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(parent, name)
                try:
                    info = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield Entry(Path(path).as_uri(), info.st_size, info.st_mtime)

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
