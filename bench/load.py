"""Load with a worker loss: 1,000 tiny-spec jobs through two workers, one SIGKILLed midway.

    .venv/bin/python bench/load.py                   # 1000 jobs of 160x120, kill at 50 %
    .venv/bin/python bench/load.py --jobs 100 --kill-at 0.3 --max-batch 2 --visibility-timeout 40

Starts its own redis-server and SeaweedFS S3 server on loopback and two real ``ben2q worker``
processes (tiny spec, CPU, a short ``BEN2Q_VISIBILITY_TIMEOUT`` that still satisfies the
worker's rule ``prefetch × hard limit + 5 s``). Submits every job at once (single-image
jobs, cross-job batched), SIGKILLs worker 1 (parent and prefork child) once ``--kill-at`` of
the jobs have ended, starts nothing else, and waits until every job has ended: the survivor
and Redis's redelivery of the dead worker's unacknowledged jobs must finish everything.

Reports: jobs lost (not ``succeeded`` at the end; must be 0), outputs duplicated (objects
beyond one under a job's output prefix; must be 0), jobs redelivered (``attempts`` >= 2),
p50/p99 of queue wait (``queue_wait_ms``: created -> first start) and of end-to-end latency
(``finished_at - created_at``), wall time and jobs/s, and each worker's prefork child RSS
(``VmRSS`` from /proc) after warm-up, once 10 % of the jobs have ended (batches have
reached full size), its peak, at the end (the killed one: just before the kill), and the medians of
its samples (every 0.5 s after the 10 % mark) over the first and last third of that span:
growth is judged from those medians (single samples swing with the allocator).

One run of ``.venv/bin/python bench/load.py`` (defaults: 1000 jobs of 160x120 from 50
distinct inputs, max batch 4, hard limit 8 s per image, visibility timeout 75 s, one torch
thread per worker) on a 2-vCPU AMD EPYC VM (``lscpu`` family 26, Zen 5) with SeaweedFS,
2026-12-02, load average 0.5 when it started (another engineer shares the machine)::

    killed w1 at 53.0 s with 502 jobs ended
    jobs_lost 0   outputs_duplicated 0   outputs_missing 0   jobs_redelivered 4
    by_worker w2 751, w1 249            wall 150.7 s, 6.63 jobs/s, submit 1.95 s
    queue_wait_s p50 50.0 p99 146.0     (all 1000 submitted at once: it is the backlog)
    end_to_end_s p50 50.7 p99 146.8
    child_rss_mib start -> at 10 % -> peak -> end (medians of the first / last third):
        w1 346 -> 336 -> 413 -> 398 (just before the kill; 389 / 390)
        w2 350 -> 394 -> 413 -> 333 (395 / 395)

The run before it (2026-11-25, moto's S3 server, an earlier 2-core EPYC VM under another
engineer's profiling runs) took 626 s (1.60 jobs/s), with the same counts: 0 lost, 0
duplicated, 4 redelivered.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import S3_ENV, RedisServer, S3Server  # noqa: E402
from stack import Worker, service_env  # noqa: E402


def synthetic(width: int, height: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = np.stack([40 + 150 * xx / width, 60 + 120 * yy / height, 90 + 0 * xx], -1)
    inside = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2
    a[inside <= 1] = (230, 200, 60)
    a += rs.normal(0, 4, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def third_median(samples: list[float], which: int) -> float | None:
    """Median of the first (0) or last (2) third of ``samples``."""
    n = len(samples) // 3
    if n == 0:
        return None
    part = samples[:n] if which == 0 else samples[-n:]
    return round(float(np.median(part)), 1)


def child_rss_mib(worker: Worker) -> float | None:
    """Resident memory of the worker's prefork child, MiB (None if it has none)."""
    for pid in worker.children():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--size", default="160x120", help="image size WxH")
    p.add_argument("--distinct", type=int, default=50, help="distinct input images")
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of jobs ended")
    p.add_argument("--visibility-timeout", type=int, default=75)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=8.0, help="hard limit per image (s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--timeout", type=float, default=3600, help="give up after (s)")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))

    os.environ.update(S3_ENV)
    tmp = Path(tempfile.mkdtemp(prefix="ben2q-load-"))
    redis = RedisServer(tmp / "redis").start()
    s3srv = S3Server(tmp / "s3").start()
    workers: list[Worker] = []
    try:
        run(args, w, h, tmp, redis, s3srv, workers)
    finally:
        for worker in workers:
            worker.kill()
        s3srv.stop()
        redis.stop()
        shutil.rmtree(tmp / "s3", ignore_errors=True)  # SeaweedFS keeps every object on disk


def run(args, w: int, h: int, tmp: Path, redis, s3srv, workers: list[Worker]) -> None:
    s3 = s3srv.client()
    s3srv.create_bucket("load-in")
    s3srv.create_bucket("load-out")
    uris = []
    for i in range(args.distinct):
        buf = io.BytesIO()
        synthetic(w, h, i).save(buf, format="PNG")
        s3.put_object(Bucket="load-in", Key=f"img/{i}.png", Body=buf.getvalue())
        uris.append(f"s3://load-in/img/{i}.png")

    env = service_env(
        redis,
        s3srv,
        BEN2Q_VISIBILITY_TIMEOUT=str(args.visibility_timeout),
        BEN2Q_MAX_BATCH=str(args.max_batch),
        BEN2Q_JOB_TIME_LIMIT=str(args.time_limit),
        BEN2Q_JOB_SOFT_TIME_LIMIT=str(args.time_limit * 0.8),
        BEN2Q_WEBHOOK_TIMEOUT="1",
        OMP_NUM_THREADS=str(args.threads),  # two workers share the machine's cores
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("BEN2Q_")})
    from ben2q.client import Client
    from ben2q.config import Settings
    from ben2q.status import KEYS, decode

    workers += [Worker(env, tmp / f"w{i}.log", name=f"w{i}", wait=False) for i in (1, 2)]
    for worker in workers:
        worker.wait_ready()
    rss_start = {worker.name: child_rss_mib(worker) for worker in workers}
    rss_end: dict[str, float | None] = {}
    rss_warm: dict[str, float | None] = {}  # after 10 % of the jobs: batches at full size
    rss_peak: dict[str, float] = {}
    rss_samples: dict[str, list[float]] = {worker.name: [] for worker in workers}  # after 10 %

    client = Client(settings=Settings())
    t0 = time.monotonic()
    ids = [client.submit(uris[i % len(uris)], output="s3://load-out/").id for i in range(args.jobs)]
    submit_s = time.monotonic() - t0
    keys = [KEYS.job(i) for i in ids]
    killed_at = None
    statuses = []
    while True:
        raw = client.store.redis.mget(keys)
        statuses = [decode(r) for r in raw if r is not None]
        ended = sum(1 for s in statuses if s.done)
        for worker in workers[1 if killed_at is not None else 0 :]:
            rss = child_rss_mib(worker)
            if rss is not None:
                rss_peak[worker.name] = max(rss_peak.get(worker.name, 0.0), rss)
                if rss_warm:
                    rss_samples[worker.name].append(rss)
        if not rss_warm and ended >= 0.1 * args.jobs:
            rss_warm = {worker.name: child_rss_mib(worker) for worker in workers}
        if killed_at is None and ended >= args.kill_at * args.jobs:
            rss_end["w1"] = child_rss_mib(workers[0])
            workers[0].kill()
            killed_at = time.monotonic() - t0
            print(f"killed w1 at {killed_at:.1f} s with {ended} jobs ended", flush=True)
        if ended == args.jobs or time.monotonic() - t0 > args.timeout:
            break
        time.sleep(0.5)
    wall = time.monotonic() - t0
    rss_end["w2"] = child_rss_mib(workers[1])

    by_id = {s.id: s for s in statuses}
    lost = [i for i in ids if i not in by_id or by_id[i].state != "succeeded"]
    objects: Counter[str] = Counter()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="load-out"):
        for obj in page.get("Contents", []):
            objects[obj["Key"].split("/", 1)[0]] += 1
    duplicated = sum(max(0, objects[i] - 1) for i in ids)
    missing = sum(1 for i in ids if objects[i] == 0)
    done = [s for s in statuses if s.state == "succeeded"]
    waits = [s.queue_wait_ms / 1000 for s in done if s.queue_wait_ms is not None]
    e2e = [s.finished_at - s.created_at for s in done if s.finished_at]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "jobs": args.jobs,
        "image": f"{w}x{h}",
        "visibility_timeout_s": args.visibility_timeout,
        "max_batch": args.max_batch,
        "hard_limit_per_image_s": args.time_limit,
        "torch_threads_per_worker": args.threads,
        "submit_s": round(submit_s, 2),
        "killed_w1_at_s": None if killed_at is None else round(killed_at, 1),
        "wall_s": round(wall, 1),
        "jobs_per_s": round(len(done) / wall, 2),
        "jobs_lost": len(lost),
        "outputs_duplicated": duplicated,
        "outputs_missing": missing,
        "jobs_redelivered": sum(1 for s in done if s.attempts >= 2),
        "by_worker": dict(Counter(s.worker.split("@")[0] for s in done)),
        "queue_wait_s": {"p50": round(pct(waits, 50), 2), "p99": round(pct(waits, 99), 2)},
        "end_to_end_s": {"p50": round(pct(e2e, 50), 2), "p99": round(pct(e2e, 99), 2)},
        "child_rss_mib": {
            name: {
                "start": None if rss_start[name] is None else round(rss_start[name], 1),
                "at_10pct": None if rss_warm.get(name) is None else round(rss_warm[name], 1),
                "peak": round(rss_peak.get(name, float("nan")), 1),
                # medians of the samples (every 0.5 s) in the first and the last third of
                # its run after the 10 % mark: steady growth shows here, allocator noise not
                "median_first_third": third_median(rss_samples[name], 0),
                "median_last_third": third_median(rss_samples[name], 2),
                "end": None if rss_end.get(name) is None else round(rss_end[name], 1),
            }
            for name in rss_start
        },
    }
    print(json.dumps(report, indent=2))
    if lost:
        print("lost:", [(i, by_id[i].state if i in by_id else None) for i in lost[:20]])


if __name__ == "__main__":
    main()
