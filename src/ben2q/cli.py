"""The ``ben2q`` command.

``ben2q remove IMAGE... [--output-dir DIR] [--refine]`` removes backgrounds locally with the
engine and writes one RGBA PNG per input, named after it. Every failed input gets a one-line
reason on stderr while the others still finish; the exit status is 1 if any input failed
and 2 if nothing could run (bad arguments, no weights).

Job commands talk to the queue (Redis) through ``ben2q.client.Client``::

    ben2q submit INPUT... --output URI [--refine] [--mask] [--format png|webp]
                 [--wait] [--timeout S] [--json]
    ben2q status JOB_ID [--json]
    ben2q wait JOB_ID [--timeout S] [--json]
    ben2q cancel JOB_ID

One input makes a single job, several one batch job; ``submit`` prints the job id (or the
record with ``--json``). ``--broker URL`` overrides ``BEN2Q_BROKER_URL``. Exit status: 0 the
job succeeded (``submit`` without ``--wait``: it was enqueued; ``status``: it has not failed
so far; ``cancel``: the cancellation was recorded), 1 it failed, partially failed or was
cancelled (``cancel``: it had already finished), 2 an invalid request, an unknown job or no
Redis (``error: <code>: <message>`` on stderr), 3 ``--timeout`` ran out while waiting.

Configuration comes from ``BEN2Q_*`` variables through ``Settings``; flags override them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from . import admin
from .config import Settings
from .errors import BEN2QError

if TYPE_CHECKING:
    from .client import Client
    from .jobs import JobStatus

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_UNUSABLE = 0, 1, 2
EXIT_FAILED, EXIT_TIMEOUT = 1, 3


def output_names(inputs: Sequence[str], output_dir: Path) -> list[Path]:
    """One ``<stem>.png`` per input in ``output_dir``; never two alike, never an input file.

    Later duplicates get ``_1``, ``_2``... so that ``a/x.jpg`` and ``b/x.jpg`` both survive.
    """
    taken: set[Path] = set()
    for item in inputs:
        if "://" not in item:
            taken.add(Path(item).resolve())
    names: list[Path] = []
    for item in inputs:
        stem = _stem(item)
        candidate = output_dir / f"{stem}.png"
        n = 0
        while candidate.resolve() in taken:
            n += 1
            candidate = output_dir / f"{stem}_{n}.png"
        taken.add(candidate.resolve())
        names.append(candidate)
    return names


def _stem(item: str) -> str:
    if item.startswith("data:"):
        return "image"
    path = unquote(urlsplit(item).path) if "://" in item else item
    stem = Path(path).stem.strip()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return safe or "image"


def run_remove(inputs: Sequence[str], *, output_dir: Path, refine: bool, settings: Settings) -> int:
    """Remove backgrounds of ``inputs`` into ``output_dir``; returns the exit status."""
    from tqdm import tqdm

    from .engine import Engine
    from .imageio import load_image
    from .png import encode_png

    if not inputs:
        print("error: no input images given", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        engine = Engine.load(settings=settings)
    except BEN2QError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNUSABLE
    output_dir.mkdir(parents=True, exist_ok=True)
    targets = output_names(inputs, output_dir)
    failed = 0
    bar = tqdm(total=len(inputs), unit="img", disable=len(inputs) < 2, file=sys.stderr)
    for idx in engine.chunks(len(inputs)):
        loaded = []
        for i in idx:
            try:
                loaded.append((i, load_image(inputs[i], settings=settings)))
            except BEN2QError as exc:
                failed += 1
                bar.write(f"failed: {inputs[i]}: {exc.code}: {exc.message}", file=sys.stderr)
                bar.update(1)
        if not loaded:
            continue
        outputs = engine.predict([img for _, img in loaded], refine=refine)
        for (i, _), out in zip(loaded, outputs, strict=True):
            Path(targets[i]).write_bytes(encode_png(out.rgba()))
            bar.update(1)
    bar.close()
    done = len(inputs) - failed
    print(f"{done} of {len(inputs)} images written to {output_dir}", file=sys.stderr)
    return EXIT_FAILED_ITEMS if failed else EXIT_OK


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in (
            ("weights", getattr(args, "weights", None)),
            ("model_spec", getattr(args, "spec", None)),
            ("device", getattr(args, "device", None)),
            ("max_batch", getattr(args, "batch_size", None)),
        )
        if value is not None
    }
    return Settings(**overrides)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Flags that override ``BEN2Q_WEIGHTS``, ``BEN2Q_MODEL_SPEC``, ``BEN2Q_DEVICE``..."""
    parser.add_argument("--weights", help="checkpoint path (default: BEN2Q_WEIGHTS or the hub)")
    parser.add_argument("--spec", choices=["base", "tiny"], help="model variant")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass")


DESCRIPTION = "Remove image backgrounds with BEN2, on this machine or through a job queue."
EPILOG = """\
try it on one machine:
  ben2q remove photo.jpg -o out/          remove backgrounds here, no queue
  ben2q up --root DIR                     start Redis and a worker, files under DIR
  ben2q submit file://DIR/photo.jpg --output file://DIR/out/ --wait

Settings come from BEN2Q_* environment variables (README, "Configuration"); flags
override them. Each command has its own --help.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ben2q",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    remove = sub.add_parser(
        "remove",
        help="remove backgrounds of local files or URLs",
        description="Remove the backgrounds of images (paths or URLs) with the model on this "
        "machine and write one RGBA PNG per input, named after it. Exit status: 0 all "
        "written, 1 some failed (one line each), 2 nothing could run.",
    )
    remove.add_argument("images", nargs="+", help="paths or URLs")
    remove.add_argument("--output-dir", "-o", default="ben2_outputs", type=Path)
    remove.add_argument("--refine", action="store_true", help="refine foreground colours")
    add_engine_options(remove)

    submit = sub.add_parser(
        "submit",
        help="enqueue a job (several inputs: one batch job)",
        description="Enqueue a job on the queue (BEN2Q_BROKER_URL); prints its id, or waits "
        "for it with --wait. Exit status: 0 succeeded (or enqueued), 1 failed, 2 invalid "
        "request or no Redis, 3 --timeout ran out.",
    )
    submit.add_argument("inputs", nargs="+", metavar="INPUT", help="s3://, http(s):// or file://")
    submit.add_argument("--output", required=True, help="s3://bucket/prefix/ or file:///dir/")
    submit.add_argument("--refine", action="store_true", help="refine foreground colours")
    submit.add_argument("--mask", action="store_true", help="also write the grayscale mask")
    submit.add_argument("--format", default="png", metavar="{png,webp}", help="output format")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    submit.add_argument("--timeout", type=float, help="seconds to wait at most (with --wait)")
    submit.add_argument("--json", action="store_true", help="print the job record as JSON")
    status = sub.add_parser("status", help="show a job's record")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print the full record as JSON")
    wait = sub.add_parser("wait", help="wait for a job to finish, with a progress bar")
    wait.add_argument("job_id", metavar="JOB_ID")
    wait.add_argument("--timeout", type=float, help="seconds to wait at most")
    wait.add_argument("--json", action="store_true", help="print the final record as JSON")
    cancel = sub.add_parser("cancel", help="cancel a queued job or stop a running one")
    cancel.add_argument("job_id", metavar="JOB_ID")
    for command in (submit, status, wait, cancel):
        command.add_argument("--broker", metavar="URL", help="Redis URL (BEN2Q_BROKER_URL)")

    worker = sub.add_parser(
        "worker",
        help="run a worker (other options pass through to `celery worker`)",
        description="Run a ben2q worker; unknown options (--hostname, --loglevel...) go to "
        "`celery worker`.",
    )
    pin = worker.add_mutually_exclusive_group()
    pin.add_argument("--gpu", type=int, metavar="N", help="pin this worker to GPU N")
    pin.add_argument("--gpus", metavar="all|0,1", help="supervise one worker per GPU")
    worker.add_argument("--queues", "-Q", help="queues to consume (default BEN2Q_QUEUE)")
    worker.add_argument("--quiet", action="store_true", help="no start-up banner")
    up = sub.add_parser(
        "up",
        help="run Redis and a worker on this machine with file:// storage",
        description="Start a private Redis and one worker, with file:// inputs and outputs "
        "under --root; prints how to submit once the model is ready, and stops both on "
        "Ctrl-C. Exits non-zero with the reason if the worker cannot run jobs.",
    )
    up.add_argument("--root", type=Path, default=Path("."), help="local root (default .)")
    up.add_argument("--port", type=int, default=0, help="Redis port (default: a free one)")
    flower = sub.add_parser(
        "flower", help="Flower monitoring on the broker (basic auth: BEN2Q_FLOWER_BASIC_AUTH)"
    )
    flower.add_argument("--port", type=int, default=5555)
    exporter = sub.add_parser("exporter", help="Prometheus metrics of the service")
    exporter.add_argument("--port", type=int, default=9808)
    exporter.add_argument("--addr", default="0.0.0.0")
    health = sub.add_parser(
        "health",
        help="probe the workers of this machine (for Docker and Kubernetes health checks)",
        description="Check the workers that keep their health files in BEN2Q_HEALTH_DIR, "
        "without asking the broker: alive (their main loop beat within --max-age seconds) "
        "or, with --ready, also holding a warm model. Exit status 0 healthy, 1 not.",
    )
    target = health.add_mutually_exclusive_group(required=True)
    target.add_argument("--worker", action="store_true", help="probe workers")
    health.add_argument("--ready", action="store_true", help="readiness: a warm model too")
    health.add_argument("--name", metavar="NODE", help="one worker (e.g. gpu0@host); default all")
    health.add_argument("--max-age", type=float, help="seconds (BEN2Q_HEARTBEAT_MAX_AGE)")
    health.add_argument("--dir", type=Path, help="health directory (BEN2Q_HEALTH_DIR)")
    api = sub.add_parser(
        "api",
        help="serve the HTTP API (FastAPI on uvicorn)",
        description="Serve the HTTP API; configure it with BEN2Q_API_* (see config/api.env).",
    )
    api.add_argument("--host", help="address to listen on (BEN2Q_API_HOST)")
    api.add_argument("--port", type=int, help="port (BEN2Q_API_PORT)")
    api.add_argument("--workers", type=int, help="uvicorn processes (BEN2Q_API_WORKERS)")
    api.add_argument("--access-log", action="store_true", help="log every request")
    admin.add_parsers(sub)
    return parser


def run_health(args: argparse.Namespace) -> int:
    """``ben2q health --worker [--ready]``: one line per worker, exit status 0 or 1."""
    from .health import check_workers

    settings = Settings()
    verdict = check_workers(
        args.dir or settings.health_dir,
        name=args.name,
        ready=args.ready,
        max_age=args.max_age if args.max_age is not None else settings.heartbeat_max_age,
    )
    for line in verdict.lines:
        print(line)
    return EXIT_OK if verdict.ok else EXIT_FAILED


# --- job commands ----------------------------------------------------------------------


def format_status(status: JobStatus) -> str:
    """A short human summary: state, progress, each item's output or error."""
    lines = [f"{status.id}  {status.kind}  {status.state}  {status.progress:.0%}"]
    if status.error is not None:
        lines.append(f"  error: {status.error.code}: {status.error.message}")
    for item in status.items:
        if item.error is not None:
            detail = f"{item.error.code}: {item.error.message}"
        else:
            detail = item.output or item.input
        lines.append(f"  [{item.index}] {item.state:<9} {detail}")
    return "\n".join(lines)


def _print_status(status: JobStatus, as_json: bool) -> None:
    print(status.model_dump_json() if as_json else format_status(status))


def _final_exit(status: JobStatus) -> int:
    return EXIT_OK if status.state == "succeeded" else EXIT_FAILED


def follow(client: Client, job_id: str, timeout: float | None) -> JobStatus:
    """Wait for the job's terminal record, drawing a progress bar on stderr."""
    from tqdm import tqdm

    bar = None
    last = None
    try:
        for last in client.events(job_id, timeout=timeout):
            if bar is None:
                total = len(last.items)
                bar = tqdm(total=total, unit="img", desc=job_id[:8], file=sys.stderr)
            bar.n = round(last.progress * bar.total)
            bar.set_postfix_str(last.state)  # also refreshes
    finally:
        if bar is not None:
            bar.close()
    assert last is not None
    return last


def run_submit(client: Client, args: argparse.Namespace) -> int:
    options = {"refine": args.refine, "format": args.format, "mask": args.mask}
    if len(args.inputs) == 1:
        job = client.submit(args.inputs[0], args.output, **options)
    else:
        job = client.submit_batch(args.inputs, args.output, **options)
    if not args.wait:
        print(client.get(job).model_dump_json() if args.json else job.id)
        return EXIT_OK
    print(job.id, file=sys.stderr)
    final = follow(client, job.id, args.timeout)
    _print_status(final, args.json)
    return _final_exit(final)


def run_status(client: Client, args: argparse.Namespace) -> int:
    status = client.get(args.job_id)
    _print_status(status, args.json)
    return EXIT_FAILED if status.done and status.state != "succeeded" else EXIT_OK


def run_wait(client: Client, args: argparse.Namespace) -> int:
    final = follow(client, args.job_id, args.timeout)
    _print_status(final, args.json)
    return _final_exit(final)


def run_cancel(client: Client, args: argparse.Namespace) -> int:
    status = client.cancel(args.job_id)
    if status.state == "cancelled":
        print(f"{status.id}: cancelled")
        return EXIT_OK
    if not status.done:
        print(f"{status.id}: cancel requested; the {status.state} job stops at its next item")
        return EXIT_OK
    print(f"{status.id}: already {status.state}, not cancelled")
    return EXIT_FAILED


JOB_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": run_submit,
    "status": run_status,
    "wait": run_wait,
    "cancel": run_cancel,
}


def run_job_command(args: argparse.Namespace) -> int:
    """Run a job subcommand; every expected failure becomes one line and an exit status."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from .client import Client

    try:
        client = Client(args.broker, settings=Settings())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        with client:
            return JOB_COMMANDS[args.command](client, args)
    except BEN2QError as exc:  # InvalidRequest, NotFound
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNUSABLE
    except (RedisConnectionError, RedisTimeoutError, OperationalError) as exc:
        print(f"error: internal: cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except TimeoutError as exc:  # the builtin one, from --timeout
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "exporter":
        from .metrics import main as exporter_main

        return exporter_main(["--port", str(args.port), "--addr", args.addr, *extra])
    if args.command in ("worker", "up", "flower"):
        from . import serve

        if args.command == "flower":
            return serve.run_flower(extra, port=args.port)
        if args.command == "up":
            return serve.run_up(root=args.root, port=args.port, passthrough=extra)
        if args.gpus:
            return serve.run_gpus(args.gpus, extra, queues=args.queues)
        return serve.run_worker(extra, queues=args.queues, gpu=args.gpu, quiet=args.quiet)
    if extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "health":
        return run_health(args)
    if args.command == "keys":
        return admin.run_keys(args)
    if args.command == "retention":
        return admin.run_retention(args)
    if args.command == "api":
        from .api.serve import run_api

        return run_api(
            Settings(),
            host=args.host,
            port=args.port,
            workers=args.workers,
            access_log=args.access_log,
        )
    if args.command == "remove":
        try:
            settings = _settings(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
        return run_remove(
            args.images, output_dir=args.output_dir, refine=args.refine, settings=settings
        )
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
