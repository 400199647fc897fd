"""The one error tree of ben2q. Every error carries a stable ``code`` string.

Codes are part of the public contract: job records, CLI messages and webhooks carry them,
so they never change once released. Lower libraries' errors (Pillow, httpx, boto3, torch)
are translated into these at one boundary each, with ``raise ... from exc``.

::

    BEN2QError                      code "internal"
    ├── InvalidImage (ValueError)   code "invalid_image"    undecodable, empty, wrong kind
    │   └── ImageTooLarge           code "image_too_large"  over the byte or pixel limit
    ├── InvalidRequest (ValueError) code "invalid_request"  a request field is wrong (.field)
    ├── FetchError                  code "fetch_failed"     base of URL fetching errors
    │   ├── ForbiddenURL            code "forbidden_url"    scheme, host or address refused
    │   └── FetchFailed             code "fetch_failed"     network error, HTTP error, timeout
    ├── WeightsUnavailable          code "weights_unavailable"  no checkpoint to load
    ├── DeviceUnavailable           code "device_unavailable"   the device cannot run the model
    ├── NotFound                    code "not_found"        no such input object, file or job
    ├── StorageError                code "storage_error"    reading an input failed (retryable)
    │   └── UploadFailed            code "upload_failed"    writing an output failed
    ├── JobTimeout                  code "timeout"          over the job's time limit
    └── BatchFailed                 code "partial"          some items of a batch failed

A bad item in a batch fails alone: the batch call processes every good item, then raises
``BatchFailed`` whose ``results`` hold the outputs and, in the bad items' places, their errors.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BEN2QError",
    "InvalidImage",
    "ImageTooLarge",
    "InvalidRequest",
    "FetchError",
    "ForbiddenURL",
    "FetchFailed",
    "WeightsUnavailable",
    "DeviceUnavailable",
    "BatchFailed",
    "NotFound",
    "StorageError",
    "UploadFailed",
    "JobTimeout",
    "ERROR_CODES",
]


class BEN2QError(Exception):
    """Base of every error raised by ben2q on purpose."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The JSON form used in job records: ``{"code", "message"}``."""
        return {"code": self.code, "message": self.message}


class InvalidImage(BEN2QError, ValueError):
    """The input is not an image we can decode (empty, truncated, not an image)."""

    code = "invalid_image"


class ImageTooLarge(InvalidImage):
    """The input is over a configured limit on bytes or pixels (decompression bombs too)."""

    code = "image_too_large"


class InvalidRequest(BEN2QError, ValueError):
    """A request is malformed; ``field`` names the offending field."""

    code = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class FetchError(BEN2QError):
    """Base of the errors of fetching an input by URL."""

    code = "fetch_failed"


class ForbiddenURL(FetchError):
    """The URL's scheme, host or resolved address is not allowed (SSRF guard)."""

    code = "forbidden_url"


class FetchFailed(FetchError):
    """The fetch failed: network error, HTTP error status, body too slow.

    ``transient`` is true where trying again later may succeed (connection errors, HTTP 5xx,
    408, 429); the job service retries those with backoff.
    """

    code = "fetch_failed"

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class WeightsUnavailable(BEN2QError):
    """No model checkpoint could be found or loaded."""

    code = "weights_unavailable"


class DeviceUnavailable(BEN2QError):
    """The model's device cannot run it: missing or unusable at load, out of memory at the
    warm-up forward, or failing later (a CUDA error). A worker that meets it stops taking
    jobs; the jobs it holds go back to the queue."""

    code = "device_unavailable"


class NotFound(BEN2QError):
    """An input object or file does not exist, or a job id is unknown."""

    code = "not_found"


class StorageError(BEN2QError):
    """Storage could not be reached or answered with a server error; worth retrying."""

    code = "storage_error"


class UploadFailed(StorageError):
    """An output could not be written (after the storage client's own retries)."""

    code = "upload_failed"


class JobTimeout(BEN2QError):
    """The job ran over its time limit."""

    code = "timeout"


class BatchFailed(BEN2QError):
    """Some items of a batch failed; the others' results are in ``results``.

    ``results[i]`` is the item's output, or its error (a ``BEN2QError``) if it failed;
    ``errors`` maps the failed indices to their errors.
    """

    code = "partial"

    def __init__(self, results: list[Any], errors: dict[int, BEN2QError]) -> None:
        detail = "; ".join(f"item {i}: {e.code}: {e.message}" for i, e in errors.items())
        super().__init__(f"{len(errors)} of {len(results)} items failed ({detail})")
        self.results = results
        self.errors = errors


ERROR_CODES: frozenset[str] = frozenset(
    cls.code
    for cls in (
        BEN2QError,
        InvalidImage,
        ImageTooLarge,
        InvalidRequest,
        ForbiddenURL,
        FetchFailed,
        WeightsUnavailable,
        DeviceUnavailable,
        BatchFailed,
        NotFound,
        StorageError,
        UploadFailed,
        JobTimeout,
    )
)
