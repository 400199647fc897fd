"""Retention of what the HTTP API stores: uploads and outputs expire after
``BEN2Q_API_RETENTION`` seconds (job records say when, as ``expires_at``).

Two mechanisms, because the two kinds of storage differ:

* ``apply`` (S3): one lifecycle rule per location (``BEN2Q_API_UPLOAD_LOCATION`` and
  ``BEN2Q_API_OUTPUT_LOCATION``) expiring objects under its prefix after
  ``ceil(retention / 1 day)`` days -- lifecycle rules count whole days. The store then
  deletes on its own, with no process of ours running. The rules are merged into the
  bucket's existing configuration (other rules are kept; ours are found by their
  ``ben2q-retention-`` IDs and replaced), so running it again changes nothing. A store
  that refuses lifecycle rules is reported as such (exit 1), with the fallback:
  ``clean --s3`` from cron.
* ``clean`` (``file://``, and S3 with ``--s3``): deletes the files under those locations
  that are older than the retention, then the directories that became empty, printing each.

Keys with their own output prefix (``ben2q keys create --output-prefix``) write outside
these locations; their data is the key owner's to expire.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from .config import Settings
from .errors import BEN2QError
from .storage import Storage

DAY = 86400
RULE_PREFIX = "ben2q-retention-"

Print = Callable[[str], None]


@dataclass(frozen=True)
class Location:
    """One configured location: what it holds, and where."""

    what: str
    """``uploads`` or ``outputs``."""
    uri: str

    @property
    def scheme(self) -> str:
        return urlsplit(self.uri).scheme.lower()

    @property
    def bucket(self) -> str:
        return urlsplit(self.uri).netloc

    @property
    def prefix(self) -> str:
        """The S3 key prefix (``''``: the whole bucket)."""
        path = urlsplit(self.uri).path.lstrip("/")
        return path if not path or path.endswith("/") else path + "/"


class RetentionError(BEN2QError):
    """Retention could not be applied (the store refused, or nothing is configured)."""

    code = "retention_failed"


def locations(settings: Settings) -> list[Location]:
    found = []
    for what, uri in (
        ("uploads", settings.api_upload_location),
        ("outputs", settings.api_output_location),
    ):
        if uri:
            found.append(Location(what, uri))
    return found


def expiration_days(seconds: int) -> int:
    """Lifecycle rules count whole days: the retention rounded up (at least 1)."""
    return max(1, math.ceil(seconds / DAY))


def rule_id(prefix: str) -> str:
    """A stable rule ID per prefix (IDs are at most 255 characters; prefixes may be longer)."""
    return RULE_PREFIX + hashlib.sha256(prefix.encode()).hexdigest()[:16]


def rule(prefix: str, days: int) -> dict:
    return {
        "ID": rule_id(prefix),
        "Filter": {"Prefix": prefix},
        "Status": "Enabled",
        "Expiration": {"Days": days},
    }


def merge_rules(existing: list[dict], ours: list[dict]) -> list[dict]:
    """``existing`` with ours replacing any rule of the same ID (others kept, in order)."""
    ids = {r["ID"] for r in ours}
    return [r for r in existing if r.get("ID") not in ids] + ours


def _error(exc: ClientError) -> tuple[str, str]:
    error = exc.response.get("Error", {}) or {}
    return str(error.get("Code", "")), str(error.get("Message", ""))


def apply(settings: Settings, storage: Storage, say: Print = print) -> int:
    """Put the lifecycle rules on the S3 locations; 0 when every bucket holds them."""
    found = [loc for loc in locations(settings) if loc.scheme == "s3"]
    if not found:
        say(
            "nothing to apply: neither BEN2Q_API_UPLOAD_LOCATION nor "
            "BEN2Q_API_OUTPUT_LOCATION is an s3:// location (file:// ones: `ben2q retention "
            "clean`)"
        )
        return 0
    days = expiration_days(settings.api_retention)
    by_bucket: dict[str, list[Location]] = {}
    for loc in found:
        by_bucket.setdefault(loc.bucket, []).append(loc)
    client = storage.s3_client()
    failed = 0
    for bucket, locs in by_bucket.items():
        ours = [rule(loc.prefix, days) for loc in locs]
        try:
            try:
                existing = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
            except ClientError as exc:
                if _error(exc)[0] != "NoSuchLifecycleConfiguration":
                    raise
                existing = []
            if all(any(_same(r, k) for k in existing) for r in ours):
                for loc in locs:
                    say(f"{loc.what}: s3://{bucket}/{loc.prefix}: unchanged ({days} d)")
                continue
            merged = merge_rules(existing, ours)
            client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": merged}
            )
            kept = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        except ClientError as exc:
            code, message = _error(exc)
            unsupported = code in ("NotImplemented", "MalformedXML", "InvalidRequest", "501")
            why = "the store does not support lifecycle rules" if unsupported else "refused"
            say(
                f"error: s3://{bucket}: lifecycle rules not applied, {why} ({code}: {message}); "
                f"objects there will not expire by themselves: run `ben2q retention clean "
                f"--s3` periodically instead"
            )
            failed += 1
            continue
        except BotoCoreError as exc:
            say(f"error: s3://{bucket}: cannot reach S3: {exc}")
            failed += 1
            continue
        missing = [r["ID"] for r in ours if not any(_same(r, k) for k in kept)]
        if missing:
            say(
                f"error: s3://{bucket}: the store accepted the lifecycle rules but does not "
                f"keep them ({', '.join(missing)} missing when read back); run `ben2q "
                f"retention clean --s3` periodically instead"
            )
            failed += 1
            continue
        for loc in locs:
            whole = " (the whole bucket)" if not loc.prefix else ""
            say(
                f"{loc.what}: s3://{bucket}/{loc.prefix}{whole}: objects expire after "
                f"{days} d (rule {rule_id(loc.prefix)})"
            )
    return 1 if failed else 0


def _same(ours: dict, theirs: dict) -> bool:
    """Whether a rule read back is ours (stores may answer ``Prefix`` the old way)."""
    prefix = (theirs.get("Filter") or {}).get("Prefix", theirs.get("Prefix"))
    return (
        theirs.get("ID") == ours["ID"]
        and theirs.get("Status") == "Enabled"
        and (theirs.get("Expiration") or {}).get("Days") == ours["Expiration"]["Days"]
        and (prefix or "") == ours["Filter"]["Prefix"]
    )


def clean(
    settings: Settings,
    storage: Storage,
    *,
    s3: bool = False,
    older_than: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
    say: Print = print,
) -> int:
    """Delete files (and S3 objects with ``s3``) older than the retention under the
    locations, then empty directories; print each. 0 when all went well."""
    age = settings.api_retention if older_than is None else older_than
    cutoff = (time.time() if now is None else now) - age
    verb = "would remove" if dry_run else "removed"
    files = dirs = size = 0
    failed = False
    for loc in locations(settings):
        if loc.scheme == "s3" and not s3:
            say(
                f"{loc.what}: {loc.uri}: skipped (S3 expires it by lifecycle rules, see "
                f"`ben2q retention apply`; --s3 sweeps it here too)"
            )
            continue
        if loc.scheme not in ("s3", "file"):
            say(f"{loc.what}: {loc.uri}: skipped (not s3:// or file://)")
            continue
        try:
            old = [e for e in storage.list(loc.uri) if e.modified < cutoff]
            emptied: set[str] = set()
            for entry in old:
                if not dry_run:
                    storage.delete([entry.uri])
                say(f"{verb} {entry.uri}")
                files += 1
                size += entry.size
                if loc.scheme == "file":
                    emptied.add(os.path.dirname(_path(entry.uri)))
            if loc.scheme == "file" and not dry_run:
                for path in _remove_empty_dirs(_path(loc.uri), emptied, cutoff):
                    say(f"removed directory {path}")
                    dirs += 1
        except BEN2QError as exc:
            say(f"error: {loc.what}: {loc.uri}: {exc.code}: {exc.message}")
            failed = True
    say(f"{verb} {files} file(s), {size} bytes, and {dirs} empty directory(ies)")
    return 1 if failed else 0


def _path(uri: str) -> str:
    return unquote(urlsplit(uri).path)


def _remove_empty_dirs(base: str, emptied: set[str], cutoff: float) -> list[str]:
    """Empty directories under ``base`` (never ``base``): ones this sweep emptied, or
    ones untouched since ``cutoff`` -- not a fresh one an upload is about to fill."""
    removed: list[str] = []
    base = os.path.realpath(base)
    if not os.path.isdir(base):
        return removed
    for parent, _dirs, _files in os.walk(base, topdown=False):
        if parent == base:
            continue
        try:
            if os.listdir(parent):
                continue
            ours = parent in emptied or any(p.startswith(parent + os.sep) for p in emptied)
            if not ours and os.lstat(parent).st_mtime >= cutoff:
                continue
            os.rmdir(parent)
        except OSError:
            continue  # filled meanwhile, or gone: leave it
        removed.append(parent)
    return removed
