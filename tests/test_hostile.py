"""Hostile inputs, each with its stable code, through the library and through the queue.

The corpus is ``tests/hostile/corpus.py`` (built in code; its docstring says what each field
means). Every case runs

* through the **library**, with the workers' limits: ``load_image``, and
  ``BEN2BackgroundRemoverAdapter(device="cpu", model_spec="tiny").remove_background_batch``
  -- one call per settings group (private URLs allowed for the loopback test server;
  refused for the guarded cases; an injected address policy for the redirects), with good
  images among the cases, so a bad item must fail alone there too. Cases marked
  ``library_model=False`` (colour-mode conversions, hostile names) are only decoded there;
* through the **queue**: two real workers share the module (tiny model, SeaweedFS S3, real
  Redis). ``main`` allows private URLs (the test servers are on loopback) and has a 2 s
  ``BEN2Q_FETCH_TIMEOUT``; ``guarded`` has ``BEN2Q_ALLOW_PRIVATE_URLS=false`` and its own
  queue. Each bad input shares a batch job with good ones (``[bad, bad, good, bad, bad,
  good]``; the good ones are success cases where the group has some). All jobs are
  submitted at once, in a background thread that starts with the module, so the queue
  works while the library tests run. Each case then checks its item's code (or output),
  its good siblings' outputs, that the job was delivered once to the right worker, and
  that its output prefix holds exactly the expected objects. Cases the client refuses
  (``submit_field``) are checked at submit -- nothing enqueued, no record created -- and
  then sent as raw Celery messages that bypass the client: the worker's re-check
  (``ben2q.admission``) refuses each such job whole with ``invalid_request``, opening
  nothing (``worker_code`` is what the per-item guards below it say;
  ``tests/test_storage.py`` and ``tests/test_fetch.py`` test those directly). Module-wide:
  the output bucket, the input bucket and the local root hold nothing unexpected, and
  both workers still run the same child process and serve a later job.

The only network traffic is to loopback: private, link-local and metadata addresses are
checked by unit tests of the address guard with the connecting function disabled.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from celery import Celery
from hostile.corpus import (
    CASES,
    FETCH_TIMEOUT,
    GOOD_KEY,
    GUARD_ONLY,
    INPUT_BUCKET,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    OUTPUT_BUCKET,
    REDIRECTS,
    Case,
    build_local_tree,
    check_good,
    good_png,
)
from hostile.httpd import HostileServer
from PIL import Image
from stack import Worker, service_env, settings_of

from ben2q import fetch, imageio
from ben2q.adapter import BEN2BackgroundRemoverAdapter
from ben2q.broker import TASK_BATCH, celery_config
from ben2q.client import Client
from ben2q.config import Settings
from ben2q.errors import BEN2QError, ForbiddenURL, InvalidRequest
from ben2q.fetch import address_allowed, fetch_bytes, resolve_and_check
from ben2q.imageio import load_image
from ben2q.jobs import JobRequest, JobStatus, new_job_id
from ben2q.status import StatusStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's corrupt-EXIF notes

LIBRARY_SETTINGS = Settings(
    model_spec="tiny",
    device="cpu",
    max_image_bytes=MAX_IMAGE_BYTES,
    max_image_pixels=MAX_IMAGE_PIXELS,
    allow_private_urls=True,
    fetch_timeout=FETCH_TIMEOUT,
    fetch_connect_timeout=2.0,
)
GUARDED_SETTINGS = LIBRARY_SETTINGS.model_copy(update={"allow_private_urls": False})
LIBRARY_CASES = [c for c in CASES if c.in_library]
QUEUE_CASES = [c for c in CASES if c.in_queue]
WORKER_NAMES = {"main": "hostile", "guarded": "guarded"}
QUEUES = {"main": "hostile", "guarded": "hostile-guarded"}


def _ids(case: Case) -> str:
    return case.name


def test_the_corpus_is_complete() -> None:
    """The issue's list: at least 30 cases, each kind present, every code exercised."""
    assert len(QUEUE_CASES) >= 30 and len(LIBRARY_CASES) >= 30
    names = {c.name for c in CASES}
    for required in (
        "zero_bytes", "truncated_png", "truncated_jpeg", "text_named_png",
        "decompression_bomb", "huge_declared_png", "one_by_one", "one_by_100000",
        "w100000_by_one", "cmyk_tiff", "grey_16bit", "palette_transparency", "la",
        "animated_gif", "animated_webp", "exif_jpeg_orientation_6", "scheme_ftp",
        "s3_missing_key", "loopback_127_0_0_1", "loopback_ipv6", "loopback_localhost",
        "redirect_allowed_to_ipv6", "http_body_streamed_over_limit", "http_slow_drip",
        "file_dotdot", "name_dotdot_url", "name_encoded_dotdot_key", "name_nul_key",
        "name_unicode_key", "output_dotdot_file",
    ):  # fmt: skip
        assert required in names, required
    codes = {c.expected_code for c in CASES} | {c.worker_code for c in CASES if c.at_submit}
    assert codes >= {
        None, "invalid_image", "image_too_large", "forbidden_url", "fetch_failed",
        "not_found", "invalid_request",
    }  # fmt: skip


# --------------------------------------------------------------------------------------
# Shared fixtures: the loopback server, the local tree, the template context
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    srv = HostileServer(REDIRECTS, streamed_bytes=MAX_IMAGE_BYTES + 256 * 1024)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("hostile-fs")
    return base, build_local_tree(base)


@pytest.fixture(scope="module")
def ctx(server: HostileServer, local: tuple[Path, Path]) -> dict[str, object]:
    base, root = local
    ctx: dict[str, object] = {
        "port": server.port,
        "port6": server.port6,
        "wrapped_port": server.port + 65536,
        "root": root,
        "base": base,
        "good_b64": base64.b64encode(good_png()).decode(),
    }
    server.put("/files/good.png", good_png())
    for case in CASES:
        if case.uri_kind == "http" and (body := case.make()) is not None:
            server.put(_raw_path(case.uri(ctx)), body)
        elif case.uri_kind == "guarded":
            # A guard that let the URL through would fetch a good image: the case would
            # then visibly succeed instead of failing quietly for another reason.
            server.put(_raw_path(case.uri(ctx)), good_png())
    return ctx


def _raw_path(url: str) -> str:
    """The request target the server will see for ``url`` (httpx normalizes dot segments)."""
    try:
        return httpx.URL(url).raw_path.decode("ascii")
    except httpx.InvalidURL:
        return "/unreachable"


def _refused_target_hits(case: Case, ctx: dict[str, object], server: HostileServer) -> list:
    """Requests that reached what ``case`` must never reach (the server logs every request
    with its Host header, which carries the URL's host and port as written)."""
    if case.uri_kind == "guarded":  # each guarded case has a path of its own
        return [r for r in server.requests if r[0] == _raw_path(case.uri(ctx))]
    if case.target.startswith("/redirect/"):
        location = REDIRECTS[case.target.removeprefix("/redirect/")].format_map(ctx)
    elif case.uri_kind == "uri":
        location = case.uri(ctx)
    else:
        return []
    try:
        url = httpx.URL(location)
    except httpx.InvalidURL:
        return []
    if url.scheme not in ("http", "https") or not url.host:
        return []
    leak = (url.raw_path.decode(), url.netloc.decode())
    return [r for r in server.requests if r == leak]


def assert_outcome(result: object, code: str | None, check: Any, *, mode: str) -> None:
    """``result`` is the expected error, or an image that passes ``check``."""
    if code is None:
        assert isinstance(result, Image.Image), f"expected success, got {result!r}"
        assert result.mode == mode
        if check is not None:
            check(result)
    else:
        assert isinstance(result, BEN2QError), f"expected {code}, got {result!r}"
        assert result.code == code, f"expected {code}, got {result.code}: {result.message}"


# --------------------------------------------------------------------------------------
# The queue run: planned, then executed in a background thread that starts with the module,
# so the workers load and process while the library tests use the other core.
# --------------------------------------------------------------------------------------


def child_pids(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (the prefork pool of a worker), from /proc."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def list_keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(obj["Key"] for obj in page.get("Contents", []))
    return keys


def walk(base: Path) -> set[str]:
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(base):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            found.add(os.path.relpath(os.path.join(dirpath, name), base))
    return found


@dataclass
class PlannedJob:
    label: str
    worker: str  # "main" or "guarded"
    raw: bool  # sent as a raw Celery message, bypassing the client
    inputs: list[str]
    slots: list[Case | None]  # None: the plain good image
    output: str
    job_id: str = ""
    status: JobStatus | None = None


@dataclass
class QueueRun:
    jobs: list[PlannedJob]
    by_case: dict[str, tuple[PlannedJob, int]]
    submit_fields: dict[str, tuple[str, str]]
    records_before_submit: int
    records_after_submit: int
    out_keys: set[str]
    in_keys_before: set[str]
    in_keys_after: set[str]
    files_before: set[str]
    files_after: set[str]
    pids_before: dict[str, set[int]]
    pids_after: dict[str, set[int]]
    sentinels: dict[str, JobStatus]
    alive: dict[str, bool]
    s3: Any
    root: Path
    base: Path
    logs: Path
    hostile_ids: list[str]
    seconds: float


def _is_good(slot: Case | None) -> bool:
    return slot is None or slot.worker_expected is None


def _plan(ctx: dict[str, object], root: Path) -> list[PlannedJob]:
    """Batch jobs of at most four bad inputs and two good ones, ``[bad, bad, good, bad, ...]``.

    The good inputs are the group's success cases where there are some (a success case is a
    good sibling whose output is checked anyway), else the plain good image. Output cases
    run alone (their hostile part is the output, shared by the whole job). Jobs are grouped
    by worker, by path (client or raw message) and by output kind (S3 or the local root).
    """
    good = f"s3://{INPUT_BUCKET}/{GOOD_KEY}"
    groups: dict[tuple[str, bool, str], list[Case]] = {}
    jobs: list[PlannedJob] = []
    for case in QUEUE_CASES:
        if case.uri_kind == "output":
            output = case.target.format_map(ctx)
            jobs.append(PlannedJob(f"j{len(jobs):02d}", "main", True, [good], [case], output))
        else:
            groups.setdefault((case.worker, case.at_submit, case.output_kind), []).append(case)
    for (worker, raw, output_kind), cases in groups.items():
        bad = [c for c in cases if c.worker_expected is not None]
        wins = [c for c in cases if c.worker_expected is None]
        for k in range(max(-(-len(bad) // 4), -(-len(wins) // 2))):
            fails, goods = bad[4 * k : 4 * k + 4], wins[2 * k : 2 * k + 2]
            siblings: list[Case | None] = list(goods) or [None]
            slots: list[Case | None] = []
            for i in range(max(-(-len(fails) // 2), len(siblings))):
                slots += fails[2 * i : 2 * i + 2] + siblings[i : i + 1]
            label = f"j{len(jobs):02d}"
            if output_kind == "file":
                output = f"file://{root}/out/{label}/"
            else:
                output = f"s3://{OUTPUT_BUCKET}/{worker}/{label}/"
            inputs = [good if c is None else c.uri(ctx) for c in slots]
            jobs.append(PlannedJob(label, worker, raw, inputs, slots, output))
    return jobs


def _upload(s3: Any) -> None:
    s3.put_object(Bucket=INPUT_BUCKET, Key=GOOD_KEY, Body=good_png())
    for case in QUEUE_CASES:
        if case.uri_kind == "s3":
            s3.put_object(Bucket=INPUT_BUCKET, Key=case.key, Body=case.make())
        elif case.uri_kind == "uri" and case.target.startswith(f"s3://{INPUT_BUCKET}/"):
            if case.worker_expected is None:  # a key a raw message may name: it exists
                key = case.target.split("/", 3)[3]
                s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=good_png())


def _submit_refusals(
    clients: dict[str, Client], ctx: dict[str, object]
) -> dict[str, tuple[str, str]]:
    """Each case the client must refuse, as a batch ``[bad, good]`` and as a single job:
    the field each ``InvalidRequest`` names (``(accepted)`` if it was not refused)."""
    good = f"s3://{INPUT_BUCKET}/{GOOD_KEY}"
    fields: dict[str, tuple[str, str]] = {}
    for case in QUEUE_CASES:
        if not case.at_submit:
            continue
        client = clients[case.worker]
        if case.uri_kind == "output":
            batch_args: tuple[list[str], str] = ([good], case.target.format_map(ctx))
            single_args: tuple[str, str] = (good, case.target.format_map(ctx))
        else:
            batch_args = ([case.uri(ctx), good], f"s3://{OUTPUT_BUCKET}/refused/")
            single_args = (case.uri(ctx), f"s3://{OUTPUT_BUCKET}/refused/")
        got = []
        for submit, args in ((client.submit_batch, batch_args), (client.submit, single_args)):
            try:
                submit(args[0], output=args[1])  # type: ignore[operator]
            except InvalidRequest as exc:
                got.append(exc.field)
            else:
                got.append("(accepted)")
        fields[case.name] = (got[0], got[1])
    return fields


def _send_raw(app: Celery, store: StatusStore, job: PlannedJob) -> str:
    """Enqueue a record exactly as a careless or hostile producer could: no validation."""
    request = JobRequest(
        id=new_job_id(),
        kind="batch",
        inputs=job.inputs,
        output=job.output,
        submitted_at=time.time(),
    )
    store.create(JobStatus.queued(request))
    app.send_task(
        TASK_BATCH,
        kwargs={"request": request.model_dump(mode="json")},
        task_id=request.id,
        queue=QUEUES[job.worker],
        ignore_result=True,
    )
    return request.id


HOSTILE_JOB_IDS = ["../../escaped", "x/../../../escaped", ".."]


def _send_hostile_ids(settings: Settings, root: Path) -> list[str]:
    """Raw messages whose *job id* would move the output keys (the id is part of every key):
    the worker must drop them unrun. Sent as plain dicts -- ``JobRequest`` refuses them."""
    app = Celery("hostile-ids", set_as_current=False)
    app.conf.update(celery_config(settings))
    try:
        for n, job_id in enumerate(HOSTILE_JOB_IDS):
            request = {
                "id": job_id,
                "kind": "batch",
                "inputs": [f"s3://{INPUT_BUCKET}/{GOOD_KEY}"],
                "output": f"file://{root}/out/ids{n}/"
                if n % 2 == 0
                else f"s3://{OUTPUT_BUCKET}/ids/",
                "submitted_at": time.time(),
            }
            app.send_task(
                TASK_BATCH,
                kwargs={"request": request},
                task_id=new_job_id(),
                queue=QUEUES["main"],
                ignore_result=True,
            )
    finally:
        app.close()
    return HOSTILE_JOB_IDS


def _count_records(store: StatusStore) -> int:
    return sum(1 for _ in store.redis.scan_iter(match="ben2q:job:*", count=1000))


def run_queue(
    envs: dict[str, dict[str, str]], logs: Path, s3: Any, ctx: dict[str, object]
) -> tuple[QueueRun, dict[str, Worker]]:
    """Start both workers, run every queue case, and record what happened."""
    started = time.monotonic()
    base, root = Path(str(ctx["base"])), Path(str(ctx["root"]))
    running: dict[str, Worker] = {}
    errors: list[BaseException] = []

    def start(kind: str) -> None:
        try:
            running[kind] = Worker(envs[kind], logs / f"{kind}.log", name=WORKER_NAMES[kind])
        except BaseException as exc:
            errors.append(exc)

    starters = [threading.Thread(target=start, args=(kind,)) for kind in envs]
    for t in starters:
        t.start()
    try:
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        _upload(s3)
        jobs = _plan(ctx, root)
        for t in starters:
            t.join()
        if errors:
            for worker in running.values():
                worker.stop()
            raise errors[0]
        settings = {kind: settings_of(env) for kind, env in envs.items()}
        with (
            Client(settings=settings["main"]) as main,
            Client(settings=settings["guarded"]) as guarded,
        ):
            clients = {"main": main, "guarded": guarded}
            store = main.store
            pids_before = {k: child_pids(w.proc.pid) for k, w in running.items()}
            in_keys_before = list_keys(s3, INPUT_BUCKET)
            files_before = walk(base)
            assert list_keys(s3, OUTPUT_BUCKET) == set()
            records_before = _count_records(store)
            fields = _submit_refusals(clients, ctx)
            records_after = _count_records(store)
            app = Celery("hostile-raw", set_as_current=False)
            app.conf.update(celery_config(settings["main"]))
            try:
                for job in jobs:
                    if job.raw:
                        job.job_id = _send_raw(app, store, job)
                    else:
                        job.job_id = (
                            clients[job.worker].submit_batch(job.inputs, output=job.output).id
                        )
            finally:
                app.close()
            hostile_ids = _send_hostile_ids(settings["main"], root)
            for job in jobs:
                job.status = clients[job.worker].wait(job.job_id, timeout=300)
            good = f"s3://{INPUT_BUCKET}/{GOOD_KEY}"
            sentinels = {  # each worker serves a later good job
                kind: client.wait(
                    client.submit(good, output=f"s3://{OUTPUT_BUCKET}/later/{kind}/"), timeout=120
                )
                for kind, client in clients.items()
            }
            pids_after = {k: child_pids(w.proc.pid) for k, w in running.items()}
        run = QueueRun(
            jobs=jobs,
            by_case={
                case.name: (job, i)
                for job in jobs
                for i, case in enumerate(job.slots)
                if case is not None
            },
            submit_fields=fields,
            records_before_submit=records_before,
            records_after_submit=records_after,
            out_keys=list_keys(s3, OUTPUT_BUCKET),
            in_keys_before=in_keys_before,
            in_keys_after=list_keys(s3, INPUT_BUCKET),
            files_before=files_before,
            files_after=walk(base),
            pids_before=pids_before,
            pids_after=pids_after,
            sentinels=sentinels,
            alive={k: w.proc.poll() is None for k, w in running.items()},
            s3=s3,
            root=root,
            base=base,
            logs=logs,
            hostile_ids=hostile_ids,
            seconds=time.monotonic() - started,
        )
        return run, running
    except BaseException:  # whatever failed, no worker outlives the module
        for t in starters:
            t.join()
        for worker in running.values():
            worker.stop()
        raise


class Background:
    """``run_queue`` in a thread; ``result()`` joins it and re-raises what it raised."""

    def __init__(self, *args: Any) -> None:
        self.value: tuple[QueueRun, dict[str, Worker]] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=args, daemon=True)
        self.thread.start()

    def _run(self, *args: Any) -> None:
        try:
            self.value = run_queue(*args)
        except BaseException as exc:
            self.error = exc

    def result(self) -> QueueRun:
        self.thread.join(600)
        if self.error is not None:
            raise self.error
        assert self.value is not None, "the queue run did not finish in 600 s"
        return self.value[0]

    def stop(self) -> None:
        self.thread.join(600)
        stoppers = [
            threading.Thread(target=worker.stop)
            for worker in (self.value[1] if self.value else {}).values()
        ]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


@pytest.fixture(scope="module", autouse=True)
def queue_background(
    request: pytest.FixtureRequest, ctx, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background | None]:
    """Starts the queue run with the module -- if any selected test needs it."""
    selected = [i for i in request.session.items if i.module is request.module]
    if not any("queue_run" in getattr(i, "fixturenames", ()) for i in selected):
        yield None
        return
    redis_server = request.getfixturevalue("redis_server")
    s3_server = request.getfixturevalue("s3_server")
    main = service_env(
        redis_server,
        s3_server,
        BEN2Q_QUEUE=QUEUES["main"],
        BEN2Q_WEBHOOK_QUEUE="hostile-webhooks",
        BEN2Q_LOCAL_ROOT=str(ctx["root"]),
        BEN2Q_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        BEN2Q_MAX_IMAGE_PIXELS=str(MAX_IMAGE_PIXELS),
        BEN2Q_FETCH_TIMEOUT=str(FETCH_TIMEOUT),
        BEN2Q_ALLOW_PRIVATE_URLS="true",
        OMP_NUM_THREADS="1",  # one core each for the worker and the library tests meanwhile
    )
    guarded = {
        **main,
        "BEN2Q_QUEUE": QUEUES["guarded"],
        "BEN2Q_WEBHOOK_QUEUE": "hostile-guarded-webhooks",
        "BEN2Q_ALLOW_PRIVATE_URLS": "false",
    }
    envs = {"main": main, "guarded": guarded}
    handle = Background(envs, tmp_path_factory.mktemp("hostile-logs"), s3_server.client(), ctx)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def queue_run(queue_background: Background | None) -> QueueRun:
    assert queue_background is not None
    return queue_background.result()


# --------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------


def _policy(name: str) -> fetch.AddressPolicy:
    """``only-127.0.0.1``: 127.0.0.1 plays an allowed public host, everything else is
    refused; ``first-hop-only``: the first resolution is allowed, no later one."""
    calls: list[str] = []

    def policy(ip: fetch.IPAddress) -> bool:
        calls.append(str(ip))
        return str(ip) == "127.0.0.1" if name == "only-127.0.0.1" else len(calls) == 1

    return policy


@pytest.fixture(scope="module")
def policy_fetch(ctx: dict[str, object]):
    """``fetch_bytes`` with each redirect case's policy (chosen by the URL), fresh per call."""
    policies = {
        f"http://127.0.0.1:{ctx['port']}{c.target}": c.policy
        for c in CASES
        if c.uri_kind == "redirect"
    }

    def patched(url: str, *, settings: Settings | None = None, policy: Any = None) -> bytes:
        return fetch_bytes(url, settings=settings, policy=_policy(policies[url]))  # type: ignore[arg-type]

    return patched


def library_source(case: Case, ctx: dict[str, object]) -> tuple[object, str]:
    """What the library is given for ``case``, and which settings (adapter) apply."""
    if case.uri_kind == "s3":
        return case.make(), "main"
    if case.uri_kind == "guarded":
        return case.uri(ctx), "guarded"
    if case.uri_kind == "redirect":
        return f"http://127.0.0.1:{ctx['port']}{case.target}", "redirect"
    return case.uri(ctx), "main"


def in_library_batch(case: Case) -> bool:
    """Whether the case also runs through the model in the library (``library_model``)."""
    return case.library_model


@dataclass
class LibraryRun:
    results: dict[str, object] = field(default_factory=dict)
    goods: dict[str, list[object]] = field(default_factory=dict)  # per settings group
    group: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


GOOD_EVERY = 12


@pytest.fixture(scope="module")
def library_run(ctx, policy_fetch, queue_background) -> Iterator[LibraryRun]:
    """Every library case through one ``remove_background_batch`` call per settings group,
    a good image every few items: ``[good, c1, ..., c12, good, c13, ...]``."""
    started = time.monotonic()
    threads = torch.get_num_threads()
    if queue_background is not None:  # the main worker has the other core (one thread)
        torch.set_num_threads(1)
    main = BEN2BackgroundRemoverAdapter(device="cpu", model_spec="tiny", settings=LIBRARY_SETTINGS)
    guarded = BEN2BackgroundRemoverAdapter(
        device="cpu", model_spec="tiny", settings=GUARDED_SETTINGS
    )
    good = Image.open(io.BytesIO(good_png()))
    groups: dict[str, list[tuple[Case, object]]] = {"main": [], "guarded": [], "redirect": []}
    for case in LIBRARY_CASES:
        if in_library_batch(case):
            source, group = library_source(case, ctx)
            groups[group].append((case, source))
    run = LibraryRun()
    original = imageio.fetch_bytes
    for group, members in groups.items():
        batch: list[object] = []
        slots: list[Case | None] = []
        for i, (case, source) in enumerate(members):
            if i % GOOD_EVERY == 0:
                batch.append(good)
                slots.append(None)
            batch.append(source)
            slots.append(case)
        batch.append(good)
        slots.append(None)
        adapter = guarded if group == "guarded" else main
        if group == "redirect":
            imageio.fetch_bytes = policy_fetch
        try:
            results = adapter.remove_background_batch(batch, errors="return")  # type: ignore[arg-type]
        finally:
            imageio.fetch_bytes = original
        assert len(results) == len(batch)
        run.goods[group] = [r for r, slot in zip(results, slots, strict=True) if slot is None]
        for result, case in zip(results, slots, strict=True):
            if case is not None:
                run.results[case.name] = result
                run.group[case.name] = group
    torch.set_num_threads(threads)
    run.seconds = time.monotonic() - started
    yield run


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=_ids)
def test_library(case: Case, library_run: LibraryRun, ctx, server, policy_fetch, monkeypatch):
    if in_library_batch(case):
        # In a batch with good images: its own code (or output), and the good ones intact.
        result = library_run.results[case.name]
        assert_outcome(result, case.library_expected, case.library_checker, mode="RGBA")
        goods = library_run.goods[library_run.group[case.name]]
        assert len(goods) >= 2
        for good in goods:
            assert_outcome(good, None, check_good, mode="RGBA")
    # load_image directly: the same outcome.
    source, group = library_source(case, ctx)
    settings = GUARDED_SETTINGS if group == "guarded" else LIBRARY_SETTINGS
    if group == "redirect":
        monkeypatch.setattr(imageio, "fetch_bytes", policy_fetch)
    try:
        direct: object = load_image(source, settings=settings)  # type: ignore[arg-type]
    except BEN2QError as exc:
        direct = exc
    assert_outcome(direct, case.library_expected, case.library_checker, mode="RGB")
    assert _refused_target_hits(case, ctx, server) == []


# --------------------------------------------------------------------------------------
# The queue's results
# --------------------------------------------------------------------------------------


def read_output(run: QueueRun, uri: str) -> Image.Image:
    if uri.startswith("s3://"):
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        data = run.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        assert uri.startswith(f"file://{run.root}/out/"), uri
        data = Path(uri.removeprefix("file://")).read_bytes()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def item_result(run: QueueRun, job: PlannedJob, index: int) -> object:
    """The item as a library-like outcome: its output image, or a ``BEN2QError``."""
    assert job.status is not None
    item = job.status.items[index]
    if item.state == "succeeded":
        assert item.output is not None and item.error is None
        return read_output(run, item.output)
    assert item.state == "failed" and item.output is None and item.error is not None
    err = BEN2QError(item.error.message)
    err.code = item.error.code
    return err


def expected_outputs(job: PlannedJob) -> set[str]:
    """What the job must have written: ``<output><job id>/NNNN-<stem>.png`` per success
    (nothing for a raw message: the worker's re-check refuses it whole)."""
    outputs: set[str] = set()
    if job.raw:
        return outputs
    for index, case in enumerate(job.slots):
        code = None if case is None else case.worker_expected
        if code is None:
            stem = "good" if case is None else case.stem
            outputs.add(f"{job.output}{job.job_id}/{index:04d}-{stem}.png")
    return outputs


def written(run: QueueRun, job: PlannedJob) -> set[str]:
    """What is really under the job's output prefix (S3 listing or the directory)."""
    if job.output.startswith("s3://"):
        bucket, prefix = job.output.removeprefix("s3://").split("/", 1)
        return {f"s3://{bucket}/{key}" for key in list_keys(run.s3, bucket, prefix)}
    directory = Path(job.output.removeprefix("file://"))
    if not directory.exists():
        return set()
    return {f"file://{p}" for p in directory.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------
# The queue, case by case
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", QUEUE_CASES, ids=_ids)
def test_queue(case: Case, queue_run: QueueRun, ctx, server) -> None:
    job, index = queue_run.by_case[case.name]
    status = job.status
    assert status is not None and status.done, status
    if case.at_submit:
        expected = ("output", "output") if case.submit_field == "output" else ("inputs[0]", "input")
        assert queue_run.submit_fields[case.name] == expected
        assert job.raw  # what reached the worker came through a raw message
    if job.raw:
        # the worker's re-check (ben2q.admission) refuses the raw message whole, by the
        # client's own rule: every item fails, good siblings too, and nothing is opened
        assert status.state == "failed" and status.error is not None
        assert status.error.code == "invalid_request", status.error
        assert status.error.message.startswith(("inputs[", "output: ")), status.error.message
        for i in range(len(job.slots)):
            assert_outcome(item_result(queue_run, job, i), "invalid_request", None, mode="RGBA")
    else:
        # its own code, or its output
        assert_outcome(
            item_result(queue_run, job, index), case.worker_expected, case.check, mode="RGBA"
        )
        if case.worker_expected is None:
            stem = f"{index:04d}-{case.stem}.png"
            assert status.items[index].output == f"{job.output}{job.job_id}/{stem}"
        if case.message:  # refused before anything was opened, and why
            assert case.message in status.items[index].error.message  # type: ignore[union-attr]
        # its good batch siblings succeeded (an output case is alone: the output is the
        # hostile part); every bad input shares its job with at least one good one
        siblings = [i for i, slot in enumerate(job.slots) if i != index and _is_good(slot)]
        assert siblings or case.uri_kind == "output" or case.worker_expected is None
        for i in siblings:
            slot = job.slots[i]
            check = check_good if slot is None else slot.check
            assert_outcome(item_result(queue_run, job, i), None, check, mode="RGBA")
    # delivered once, to the right worker: no crash, no redelivery
    assert status.attempts == 1
    assert status.worker is not None and status.worker.startswith(WORKER_NAMES[case.worker] + "@")
    # exactly the expected objects under the job's output prefix, nothing for failed items
    assert written(queue_run, job) == expected_outputs(job)
    assert _refused_target_hits(case, ctx, server) == []


def test_queue_wrote_nothing_anywhere_else(queue_run: QueueRun) -> None:
    expected = set().union(*(expected_outputs(j) for j in queue_run.jobs))
    expected |= {s.items[0].output for s in queue_run.sentinels.values()}  # type: ignore[misc]
    s3_expected = {
        uri.removeprefix(f"s3://{OUTPUT_BUCKET}/") for uri in expected if uri.startswith("s3://")
    }
    assert queue_run.out_keys == s3_expected
    assert queue_run.in_keys_after == queue_run.in_keys_before  # inputs are never written
    file_expected = {
        os.path.relpath(uri.removeprefix("file://"), queue_run.base)
        for uri in expected
        if uri.startswith("file://")
    }
    assert queue_run.files_after - queue_run.files_before == file_expected
    assert queue_run.files_before <= queue_run.files_after  # nothing deleted either
    assert not (queue_run.base / "escape").exists()


def test_refusals_at_submit_create_nothing(queue_run: QueueRun) -> None:
    refused = [c for c in QUEUE_CASES if c.at_submit]
    assert len(refused) >= 10
    assert queue_run.records_after_submit == queue_run.records_before_submit


def test_workers_survived_every_case(queue_run: QueueRun) -> None:
    assert queue_run.alive == {"main": True, "guarded": True}
    for kind in ("main", "guarded"):
        assert len(queue_run.pids_before[kind]) == 1, queue_run.pids_before
        assert queue_run.pids_after[kind] == queue_run.pids_before[kind]  # the same child
        sentinel = queue_run.sentinels[kind]
        assert sentinel.state == "succeeded" and sentinel.attempts == 1
        assert read_output(queue_run, sentinel.items[0].output).mode == "RGBA"  # type: ignore[arg-type]


def test_raw_messages_with_a_traversing_job_id_are_dropped(queue_run: QueueRun) -> None:
    """The job id is part of every output key: a raw message whose id is not one safe path
    segment is refused by the worker, unrun (the module-wide listing shows nothing written)."""
    log = (queue_run.logs / "main.log").read_text(errors="replace")
    assert log.count("dropping a malformed job message") == len(queue_run.hostile_ids)
    assert not any(p.startswith(("escaped", "out/ids")) for p in queue_run.files_after)


def test_no_secret_reaches_the_worker_logs(queue_run: QueueRun) -> None:
    """``user:secret@`` URLs were refused; the password is in no log line."""
    for name in ("main.log", "guarded.log"):
        text = (queue_run.logs / name).read_text(errors="replace")
        assert "secret@" not in text and ":secret" not in text


def test_the_bad_items_never_cost_a_retry(queue_run: QueueRun) -> None:
    """Bad images, refused URLs and missing inputs fail at once: no job waited for a retry."""
    for job in queue_run.jobs:
        assert job.status is not None and job.status.attempts == 1
        assert job.status.state in ("succeeded", "partial", "failed")


# --------------------------------------------------------------------------------------
# Private, link-local and metadata addresses: the guard only, never a connection
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any attempt to connect fail the test loudly (and record it)."""
    attempts: list[str] = []

    def refuse(target: Any, *args: Any, **kwargs: Any) -> bytes:
        attempts.append(str(target.url))
        raise AssertionError(f"the guard let a connection to {target.url} through")

    monkeypatch.setattr(fetch, "_fetch_hop", refuse)
    return attempts


@pytest.mark.parametrize("address", GUARD_ONLY)
def test_guard_refuses_private_and_metadata_addresses(address: str, no_connections) -> None:
    assert address_allowed(address, allow_private=False) is False
    with pytest.raises(ForbiddenURL):  # an IP literal resolves without any query
        resolve_and_check(address, 80, allow_private=False)
    literal = f"[{address}]" if ":" in address else address
    for url in (f"http://{literal}/latest/meta-data/", f"https://{literal}:8443/x.png"):
        with pytest.raises(ForbiddenURL):
            fetch_bytes(url, settings=GUARDED_SETTINGS)
    assert no_connections == []


def test_guard_refuses_a_name_with_any_private_answer(monkeypatch, no_connections) -> None:
    """A name whose resolution mixes a public and a metadata address is refused outright."""
    answers = [
        (2, 1, 6, "", ("93.184.216.34", 80)),
        (2, 1, 6, "", ("169.254.169.254", 80)),
    ]
    # the resolver of ben2q.fetch only: the socket module stays untouched for other threads
    monkeypatch.setattr(fetch, "_getaddrinfo", lambda host, port, timeout: answers)
    with pytest.raises(ForbiddenURL, match="169.254.169.254"):
        fetch_bytes("http://metadata.example/latest/", settings=GUARDED_SETTINGS)
    assert no_connections == []


def test_guard_allows_public_addresses_without_connecting(monkeypatch) -> None:
    """The counter-check: a public address passes the guard and reaches the (stubbed) hop."""
    reached: list[str] = []
    monkeypatch.setattr(
        fetch, "_fetch_hop", lambda target, addresses, *a: reached.extend(addresses) or b"ok"
    )
    assert fetch_bytes("http://93.184.216.34/x.png", settings=GUARDED_SETTINGS) == b"ok"
    assert reached == ["93.184.216.34"]


def test_summary_of_outcomes(library_run: LibraryRun, queue_run: QueueRun) -> None:
    """Print the corpus table (case, expected, library, queue) -- ``pytest -s`` shows it."""

    def outcome(result: object) -> str:
        return "ok" if isinstance(result, Image.Image) else getattr(result, "code", "?")

    lines = [f"{'case':36} {'expected':16} {'library':16} queue (worker)"]
    for case in CASES:
        if case.name in library_run.results:
            lib = outcome(library_run.results[case.name])
        else:
            lib = "decoded only" if case.in_library else "n/a"
        if case.in_queue:
            job, index = queue_run.by_case[case.name]
            queue = outcome(item_result(queue_run, job, index))
            if case.at_submit:
                queue = f"refused at submit; raw: {queue}"
        else:
            queue = "n/a (library only)"
        lines.append(f"{case.name:36} {case.expected_code or 'ok':16} {lib:16} {queue}")
    lines.append(f"library {library_run.seconds:.1f} s, queue {queue_run.seconds:.1f} s")
    assert len(lines) == len(CASES) + 2
    print("\n" + "\n".join(lines))
