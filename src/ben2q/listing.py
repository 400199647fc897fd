"""A batch job's items from a prefix: the images under a location, in listing order.

``Storage.list`` pages through S3 (``ListObjectsV2``, 1,000 keys a page) or walks a folder
(sorted, symlinks not followed), recursively. Kept: names ending in an image extension
(``jobs.IMAGE_EXTENSIONS``), not under the job's own output location (a job writing into
its input prefix must not take earlier outputs as inputs), and valid as job inputs (the
rules every input meets, so each chunk passes the worker's re-check). Each file's content
is checked when its item is read: one that is not an image fails alone.
"""

from __future__ import annotations

import logging

from .errors import InvalidRequest, NotFound
from .jobs import IMAGE_EXTENSIONS, validate_input
from .storage import Storage

log = logging.getLogger(__name__)


def list_images(
    storage: Storage, prefix: str, *, output: str, limit: int, local_root: str | None = None
) -> list[str]:
    """The URIs of the images under ``prefix``; ``NotFound`` if there are none,
    ``InvalidRequest`` (field ``prefix``) if there are more than ``limit``."""
    found: list[str] = []
    skipped = 0
    for entry in storage.list(prefix):
        uri = entry.uri
        if uri.startswith(output) or not uri.lower().endswith(IMAGE_EXTENSIONS):
            skipped += 1
            continue
        try:
            validate_input(uri, "prefix", local_root=local_root)
        except InvalidRequest:
            skipped += 1
            continue
        found.append(uri)
        if len(found) > limit:
            raise InvalidRequest(
                "prefix", f"more than {limit} images under {prefix} (the batch limit)"
            )
    if not found:
        raise NotFound(f"no images under {prefix} ({skipped} other objects)")
    log.info("listed %d images under %s (%d other objects skipped)", len(found), prefix, skipped)
    return found
