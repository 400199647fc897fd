"""The ``ben2q`` command.

``ben2q remove INPUT... [--output-dir DIR] [--refine] [--mask] [OUTPUT OPTIONS]`` removes
backgrounds locally with the engine and writes one output per input, named after it and
rendered by ``ben2q.render`` (an RGBA PNG by default; ``--bg-color``, ``--format``,
``--crop``... as for jobs). A folder among the inputs is walked (``-r``: recursively) and
mirrored into DIR, skipping images already done (``--overwrite`` redoes them);
``--watch`` then keeps processing images that appear in it until Ctrl-C or SIGTERM (the
walking, naming and watching live in ``ben2q.folders``). Every failed input gets a
one-line reason on stderr while the others still finish; the exit status is 1 if any
input failed, 2 if nothing could run (bad arguments or options, no weights), 130 if
interrupted before the end (not under ``--watch``, where stopping is how it ends).

The output options' flags (``add_output_options``) are shared by ``remove``, ``submit``
and ``bg_remove.py``; they are validated (``jobs.job_options``) before anything loads.

Job commands talk to the queue (Redis) through ``ben2q.client.Client``::

    ben2q submit INPUT... --output URI [--refine] [--mask] [OUTPUT OPTIONS]
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
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import admin, folders
from .config import Settings
from .errors import BEN2QError
from .folders import OutputPlan, Task
from .folders import output_names as output_names  # re-exported: part of the CLI's API

if TYPE_CHECKING:
    from PIL import Image

    from .client import Client
    from .engine import Engine, Prediction
    from .jobs import JobOptions, JobStatus, OutputOptions

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_UNUSABLE = 0, 1, 2
EXIT_FAILED, EXIT_TIMEOUT = 1, 3
EXIT_INTERRUPTED = 130


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Flags of the output options (``ben2q.jobs.OutputOptions``), shared by ``remove``,
    ``submit`` and ``bg_remove.py``. Every default is None: ``output_fields`` passes only
    the flags given, so the options' own defaults stay the single source of truth."""
    group = parser.add_argument_group(
        "output options", 'how each output looks (README, "Output options")'
    )
    group.add_argument(
        "--format",
        type=str.lower,
        choices=["png", "webp", "jpeg", "jpg", "auto"],
        help="png (default), webp, jpeg/jpg (needs an opaque background), auto",
    )
    group.add_argument("--quality", type=int, metavar="N", help="jpeg or lossy webp, 1-100")
    background = group.add_mutually_exclusive_group()
    background.add_argument(
        "--bg-color", metavar="COLOR", help="background colour: white, #RRGGBB, #RRGGBBAA"
    )
    background.add_argument(
        "--bg-image", metavar="URI_OR_PATH", help="background image: a path, s3://, http(s)://"
    )
    group.add_argument(
        "--alpha-only", action="store_true", default=None, help="write the matte alone (gray)"
    )
    group.add_argument(
        "--crop", action="store_true", default=None, help="trim to the subject's box"
    )
    group.add_argument(
        "--crop-margin", metavar="MARGIN", help="around the crop: 20, 20px or 5%% (with --crop)"
    )
    group.add_argument("--max-side", type=int, metavar="N", help="shrink to at most N px a side")
    group.add_argument("--scale", type=float, metavar="F", help="resize by F (at most 4)")
    group.add_argument(
        "--mask-threshold", type=int, metavar="N", help="binary matte: alpha >= N (1-255) opaque"
    )
    group.add_argument(
        "--mask-smooth",
        action="store_true",
        default=None,
        help="clear specks and fill pinholes of the matte",
    )


def output_fields(args: argparse.Namespace) -> dict[str, object]:
    """The output options the user gave, as ``OutputOptions`` fields (unset: left out)."""
    fields: dict[str, object] = {}
    for name in ("format", "quality", "crop_margin", "max_side", "scale", "mask_threshold"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if getattr(args, "bg_color", None) is not None:
        fields["background"] = args.bg_color
    if getattr(args, "bg_image", None) is not None:
        fields["background"] = background_uri(args.bg_image)
    if getattr(args, "alpha_only", None):
        fields["channels"] = "alpha"
    for name in ("crop", "mask_smooth"):
        if getattr(args, name, None):
            fields[name] = True
    return fields


def background_uri(value: str) -> str:
    """``--bg-image``: a URI as it is, a local path as an absolute ``file://`` URI."""
    if "://" in value:
        return value
    return Path(value).expanduser().resolve().as_uri()


def validated_options(fields: dict[str, object]) -> JobOptions | None:
    """``job_options(**fields)``, or None after printing ``error: invalid_request: ...``."""
    from .errors import InvalidRequest
    from .jobs import job_options

    try:
        return job_options(**fields)
    except InvalidRequest as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return None


class Remover:
    """Runs inputs through the engine and writes their rendered outputs; keeps the tally.

    One per ``ben2q remove`` run: the model and the background image are loaded once,
    however many batches (first pass, then each watched change) go through it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        settings: Settings,
        options: OutputOptions,
        background: Image.Image | None,
        refine: bool,
        plan: OutputPlan,
    ) -> None:
        self.engine, self.settings, self.options = engine, settings, options
        self.background, self.refine, self.plan = background, refine, plan
        self.written = 0
        self.failed: set[str] = set()  # sources whose last attempt failed

    def run_all(
        self,
        tasks: Sequence[Task],
        *,
        watcher: folders.FolderWatcher | None,
        stop: threading.Event,
    ) -> bool:
        """The first pass, then (with a watcher) each batch of new or changed images until
        ``stop``; True if it was cut short (a signal in the first pass, or a second one)."""
        try:
            self.run(tasks, stop=stop)
            if watcher is None or stop.is_set():
                return stop.is_set()
            where = ", ".join(str(root.given) for root in watcher.roots)
            print(f"watching {where} for new images (Ctrl-C to stop)", file=sys.stderr)
            for batch in watcher.tasks(self.plan):
                self.run(batch, stop=stop, verbose=True)
        except KeyboardInterrupt:  # a second signal: stop now (outputs are atomic)
            return True
        return False

    def run(
        self,
        tasks: Sequence[Task],
        *,
        stop: threading.Event | None = None,
        verbose: bool = False,
    ) -> None:
        """Process ``tasks`` in engine batches; a failed input prints one line and the
        others go on. Stops between batches once ``stop`` is set."""
        from tqdm import tqdm

        from .imageio import load_image

        quiet = verbose or len(tasks) < 2  # verbose: a line per output instead
        bar = tqdm(total=len(tasks), unit="img", disable=quiet, file=sys.stderr)
        for idx in self.engine.chunks(len(tasks)):
            if stop is not None and stop.is_set():
                break
            loaded = []
            for i in idx:
                try:
                    loaded.append((tasks[i], load_image(tasks[i].source, settings=self.settings)))
                except BEN2QError as exc:
                    self._failed(tasks[i], f"{exc.code}: {exc.message}", bar)
            if loaded:
                preds = self.engine.predict([image for _, image in loaded], refine=self.refine)
                for (task, _), pred in zip(loaded, preds, strict=True):
                    self._write(task, pred, bar, verbose)
            bar.update(len(idx))
        bar.close()

    def _write(self, task: Task, pred: Prediction, bar: Any, verbose: bool) -> None:
        from .folders import atomic_write
        from .render import encode_matte, render

        try:
            out = render(
                pred.rgb,
                pred.alpha,
                self.options,
                background=self.background,
                max_pixels=self.settings.max_image_pixels,
            )
            atomic_write(task.target, out.data)
            mask = self.plan.mask_of(task.target)
            if mask is not None:
                atomic_write(mask, encode_matte(out.alpha))
        except BEN2QError as exc:
            self._failed(task, f"{exc.code}: {exc.message}", bar)
            return
        except OSError as exc:
            self._failed(task, f"internal: cannot write {task.target}: {exc}", bar)
            return
        self.written += 1
        self.failed.discard(task.source)
        if verbose:
            bar.write(f"written: {task.label} -> {task.target}", file=sys.stderr)

    def _failed(self, task: Task, reason: str, bar: Any) -> None:
        self.failed.add(task.source)
        bar.write(f"failed: {task.label}: {reason}", file=sys.stderr)


def run_remove(
    inputs: Sequence[str],
    *,
    output_dir: Path,
    refine: bool,
    settings: Settings,
    options: OutputOptions | None = None,
    mask: bool = False,
    recursive: bool = False,
    overwrite: bool = False,
    watch: bool = False,
) -> int:
    """Remove backgrounds of ``inputs`` (files, URLs, directories) into ``output_dir``;
    returns the exit status (0 all written, 1 some failed, 2 nothing could run, 130
    interrupted before the end, except under ``watch`` where stopping is the way out).

    Directories are walked (``recursive``: their subdirectories too) and mirrored into
    ``output_dir``; their files whose outputs exist are skipped unless ``overwrite``.
    Files and URLs named one by one are always written, flat in ``output_dir``.
    """
    from .jobs import EXTENSIONS, job_options

    if not inputs:
        print("error: no input images given", file=sys.stderr)
        return EXIT_UNUSABLE
    options = options if options is not None else job_options()
    is_dir = [os.path.isdir(i) for i in inputs]  # never raises (a base64 input is no path)
    roots = list(
        dict.fromkeys(folders.Root.of(i) for i, d in zip(inputs, is_dir, strict=True) if d)
    )
    items = [i for i, d in zip(inputs, is_dir, strict=True) if not d]
    if any(root.path == output_dir.resolve() for root in roots):
        print("error: the output directory must not be an input folder", file=sys.stderr)
        return EXIT_UNUSABLE
    if watch and not roots:
        print("error: --watch needs a directory among the inputs", file=sys.stderr)
        return EXIT_UNUSABLE
    background = None
    if options.background_uri is not None:  # loaded once for the whole run
        from .adapter import load_background

        try:
            background = load_background(options.background_uri, settings)
        except BEN2QError as exc:
            print(f"error: {exc.code}: background: {exc.message}", file=sys.stderr)
            return EXIT_UNUSABLE
    try:  # under --watch, before the watch starts: files copied in meanwhile are walked
        engine = _engine(settings) if watch else None
    except BEN2QError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNUSABLE
    plan = folders.OutputPlan(output_dir, extension=EXTENSIONS[options.encoding], mask=mask)
    with folders.StopOnSignals() as stopper, contextlib.ExitStack() as stack:
        watcher = None
        if watch:
            watcher = folders.FolderWatcher(
                roots, recursive=recursive, exclude=output_dir.resolve(), stop=stopper.event
            )
            stack.callback(watcher.close)
        tasks, skipped = folders.first_pass(
            plan, roots, items, recursive=recursive, overwrite=overwrite, watcher=watcher
        )
        remover = None
        interrupted = False
        if tasks or watcher is not None:
            try:
                engine = engine if engine is not None else _engine(settings)
            except BEN2QError as exc:
                print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
                return EXIT_UNUSABLE
            output_dir.mkdir(parents=True, exist_ok=True)
            remover = Remover(
                engine,
                settings=settings,
                options=options,
                background=background,
                refine=refine,
                plan=plan,
            )
            interrupted = remover.run_all(tasks, watcher=watcher, stop=stopper.event)
    written, failed = (remover.written, len(remover.failed)) if remover else (0, 0)
    total = written + failed + skipped if watch else len(tasks) + skipped
    print(
        f"{written} of {total} images written to {output_dir}; "
        f"{skipped} skipped (already done), {failed} failed",
        file=sys.stderr,
    )
    if interrupted and not watch:
        print("interrupted: run the same command again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED_ITEMS if failed else EXIT_OK


def _engine(settings: Settings) -> Engine:
    from .engine import Engine

    return Engine.load(settings=settings)


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
        help="remove backgrounds of local files, folders or URLs",
        description="Remove the backgrounds of images (paths, folders or URLs) with the model "
        "on this machine and write one output per input, named after it (an RGBA PNG unless "
        "output options say otherwise). A folder's images are mirrored into the output "
        "directory, and those already done are skipped, so a rerun resumes. Exit status: 0 "
        "all written, 1 some failed (one line each), 2 nothing could run, 130 interrupted.",
    )
    remove.add_argument("images", nargs="+", metavar="INPUT", help="paths, folders or URLs")
    remove.add_argument("--output-dir", "-o", default="ben2_outputs", type=Path)
    remove.add_argument("--refine", action="store_true", help="refine foreground colours")
    remove.add_argument(
        "--mask", action="store_true", help="also write each output's matte as NAME.mask.png"
    )
    remove.add_argument(
        "-r", "--recursive", action="store_true", help="walk folders' subfolders too"
    )
    remove.add_argument(
        "--overwrite", action="store_true", help="redo a folder's images already done"
    )
    remove.add_argument(
        "--watch",
        action="store_true",
        help="after the first pass, process images that appear or change in the folders "
        "until Ctrl-C",
    )
    add_output_options(remove)
    add_engine_options(remove)

    submit = sub.add_parser(
        "submit",
        help="enqueue a job (several inputs: one batch job)",
        description="Enqueue a job on the queue (BEN2Q_BROKER_URL); prints its id, or waits "
        "for it with --wait. Exit status: 0 succeeded (or enqueued), 1 failed, 2 invalid "
        "request or no Redis, 3 --timeout ran out.",
    )
    submit.add_argument("inputs", nargs="*", metavar="INPUT", help="s3://, http(s):// or file://")
    submit.add_argument(
        "--prefix",
        metavar="LOCATION",
        help="instead of inputs: every image under s3://bucket/prefix/ or file:///dir/ "
        "(one batch job)",
    )
    submit.add_argument("--output", required=True, help="s3://bucket/prefix/ or file:///dir/")
    submit.add_argument("--refine", action="store_true", help="refine foreground colours")
    submit.add_argument("--mask", action="store_true", help="also write the grayscale mask")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    submit.add_argument("--timeout", type=float, help="seconds to wait at most (with --wait)")
    submit.add_argument("--json", action="store_true", help="print the job record as JSON")
    add_output_options(submit)
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
            if bar is None or (last.counts and last.counts.total != bar.total):
                if bar is not None:  # a prefix job's listing was recorded: its size is known
                    bar.close()
                total = last.counts.total if last.counts is not None else len(last.items)
                bar = tqdm(total=total, unit="img", desc=job_id[:8], file=sys.stderr)
            bar.n = round(last.progress * bar.total)
            bar.set_postfix_str(last.state)  # also refreshes
    finally:
        if bar is not None:
            bar.close()
    assert last is not None
    return client.get(last.id) if last.items_apart else last  # events carry a summary


def run_submit(client: Client, args: argparse.Namespace) -> int:
    options = {"refine": args.refine, "mask": args.mask, **output_fields(args)}
    from .errors import InvalidRequest

    if args.prefix is not None or not args.inputs:
        if args.inputs or args.prefix is None:
            raise InvalidRequest("inputs", "give one or more inputs, or --prefix (not both)")
        job = client.submit_prefix(args.prefix, args.output, **options)
    elif len(args.inputs) == 1:
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
        options = validated_options(output_fields(args))
        if options is None:
            return EXIT_UNUSABLE
        return run_remove(
            args.images,
            output_dir=args.output_dir,
            refine=args.refine,
            settings=settings,
            options=options,
            mask=args.mask,
            recursive=args.recursive,
            overwrite=args.overwrite,
            watch=args.watch,
        )
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
