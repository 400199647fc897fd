"""Operator commands that manage the service rather than jobs: ``ben2q keys`` and
``ben2q retention``.

``keys create NAME`` prints the new token once (only its hash is stored); ``keys list``
shows every key without secrets; ``keys revoke ID`` stops a key at once on every replica.
``retention apply`` puts S3 lifecycle rules on the API's upload and output locations;
``retention clean`` deletes what is older than the retention (see ``ben2q.retention``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .config import Settings
from .errors import BEN2QError
from .keys import ApiKey, KeyStore


def add_parsers(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, list and revoke API keys of the HTTP API",
        description="API keys live in Redis (BEN2Q_BROKER_URL, or BEN2Q_RESULT_BACKEND). "
        "A key is printed once, when it is created; only its SHA-256 is stored.",
    )
    keys.add_argument("--broker", metavar="URL", help="Redis URL (BEN2Q_BROKER_URL)")
    verbs = keys.add_subparsers(dest="verb", required=True, metavar="VERB")
    create = verbs.add_parser("create", help="create a key and print its token once")
    create.add_argument("name", help="who the key is for (shown in `keys list`)")
    create.add_argument(
        "--input-prefix",
        action="append",
        default=[],
        metavar="URI",
        help="a location inputs may come from (s3://b/p/, file:///dir/, https://host/p/); "
        "repeat for several",
    )
    create.add_argument("--no-urls", action="store_true", help="refuse public https URLs as inputs")
    create.add_argument(
        "--output-prefix",
        metavar="URI",
        help="where its outputs go (default: BEN2Q_API_OUTPUT_LOCATION/<key id>/)",
    )
    create.add_argument("--rate", type=int, metavar="N", help="requests per minute")
    create.add_argument("--images-rate", type=int, metavar="N", help="images per minute")
    create.add_argument("--max-batch", type=int, metavar="N", help="inputs per batch job")
    create.add_argument("--json", action="store_true", help="print the key record and token")
    listing = verbs.add_parser("list", help="list keys (never their tokens)")
    listing.add_argument("--json", action="store_true")
    revoke = verbs.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id", metavar="ID")

    retention = sub.add_parser(
        "retention",
        help="expire the HTTP API's uploads and outputs (BEN2Q_API_RETENTION)",
        description="Uploads and outputs made through the API are kept BEN2Q_API_RETENTION "
        "seconds. `apply` puts S3 lifecycle rules on BEN2Q_API_UPLOAD_LOCATION and "
        "BEN2Q_API_OUTPUT_LOCATION (whole days, merged with the bucket's other rules); "
        "`clean` deletes older files under file:// locations (and S3 ones with --s3).",
    )
    steps = retention.add_subparsers(dest="verb", required=True, metavar="VERB")
    steps.add_parser("apply", help="put the lifecycle rules on the S3 locations")
    sweep = steps.add_parser("clean", help="delete files older than the retention")
    sweep.add_argument(
        "--s3",
        action="store_true",
        help="sweep S3 locations too (for stores that refuse lifecycle rules)",
    )
    sweep.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="delete what is older than this instead of BEN2Q_API_RETENTION",
    )
    sweep.add_argument("--dry-run", action="store_true", help="print, delete nothing")


def _row(key: ApiKey) -> str:
    state = (
        "active"
        if key.active
        else "revoked " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.revoked_at or 0))
    )
    where = ", ".join(key.input_prefixes) or "-"
    return (
        f"{key.id}  {key.name:<20}  {state:<8}  inputs: {where}"
        f"{' + https URLs' if key.allow_urls else ''}  outputs: {key.output_prefix or 'default'}"
    )


def run_keys(args: argparse.Namespace) -> int:
    settings = Settings()
    url = args.broker or settings.status_url
    store = KeyStore(url)
    try:
        if args.verb == "create":
            for flag, value in (
                ("--rate", args.rate),
                ("--images-rate", args.images_rate),
                ("--max-batch", args.max_batch),
            ):
                if value is not None and value < 1:
                    print(f"error: invalid_request: {flag} must be at least 1", file=sys.stderr)
                    return 2
            key, token = store.create(
                args.name,
                input_prefixes=args.input_prefix,
                output_prefix=args.output_prefix,
                allow_urls=not args.no_urls,
                rate_requests=args.rate,
                rate_images=args.images_rate,
                max_batch=args.max_batch,
            )
            if args.json:
                print(json.dumps({"token": token, "key": key.model_dump(exclude={"hash"})}))
            else:
                print(token)
                print(
                    f"created key {key.id} ({key.name}); the token above is shown only once",
                    file=sys.stderr,
                )
            return 0
        if args.verb == "list":
            keys = store.list()
            if args.json:
                print(json.dumps([k.model_dump(exclude={"hash"}) for k in keys]))
            else:
                for key in keys:
                    print(_row(key))
            return 0
        if args.verb == "revoke":
            key = store.revoke(args.key_id)
            if key is None:
                print(f"error: not_found: no key {args.key_id!r}", file=sys.stderr)
                return 2
            print(f"revoked {key.id} ({key.name})")
            return 0
    except BEN2QError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: internal: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    raise AssertionError(args.verb)


def run_retention(args: argparse.Namespace) -> int:
    from . import retention
    from .storage import Storage

    settings = Settings()
    if getattr(args, "older_than", None) is not None and args.older_than < 0:
        print("error: invalid_request: --older-than must be at least 0", file=sys.stderr)
        return 2
    with Storage(settings) as storage:
        if args.verb == "apply":
            return retention.apply(settings, storage)
        return retention.clean(
            settings,
            storage,
            s3=args.s3,
            older_than=args.older_than,
            dry_run=args.dry_run,
        )
