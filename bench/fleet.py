"""The queue at fleet scale: N workers whose GPU is a sleep, one Redis. A benchmark.

    .venv/bin/python bench/fleet.py                          # N = 1, 2, 4, 8, 16
    .venv/bin/python bench/fleet.py --workers 1,4 --jobs 1500 --sleep-ms 60

Starts its own ``redis-server`` on loopback and, for each N, N real ``ben2q worker``
processes (Celery prefork, one child each, ``BEN2Q_MAX_BATCH``=4, one torch thread) whose
``Engine.predict`` sleeps ``--sleep-ms`` per pass of up to 4 images instead of running the
network (bench/sleep_engine). Storage is ``file://`` on /dev/shm and the images are tiny,
so what the fleet spends is the queue's own work: Redis, Celery, the job records, the
metrics. For each N:

1. **idle**: Redis commands per second with the N workers idle (their polling);
2. **submit**: one producer process submits ``--jobs`` single-image jobs (to a list no
   worker reads): submits per second, Redis commands and bytes per submit;
3. **drain**: that list becomes the workers' queue at once (RENAME); the time until every
   job finished gives jobs per second routed end to end, against the sleep's ceiling
   (N x 4 images per ``--sleep-ms``), with Redis commands, bytes (in + out) and Redis CPU
   seconds per job, and Redis's CPU use (% of one core) while it lasts;
4. **latency**: jobs submitted evenly spaced for ``--seconds``, first on a quiet fleet (one
   every ``--quiet-gap`` s), then at ``--load`` (default 0.5) x the drain's rate: each
   job's latency (``finished_at - created_at``) and its queue overhead (latency minus its
   own forward pass, ``infer_ms``), p50 and p99. At load the overhead includes waiting for
   a busy worker's pass to end.

With ``--status-redis`` the job records and metrics live in a second redis-server
(``BEN2Q_RESULT_BACKEND``): the table's Redis columns are then the broker's alone.

Ratios are against N = 1 of the same run. On a 2-vCPU machine the N workers, Redis and
this process share two cores: from some N on, the machine's CPU is the bottleneck, not
Redis; Redis's own CPU per job is what carries over to a fleet of real machines.
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
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
from PIL import Image  # noqa: E402
from servers import RedisServer  # noqa: E402
from stack import Worker, service_env, settings_of  # noqa: E402

from ben2q.client import Client  # noqa: E402
from ben2q.status import StatusStore  # noqa: E402

SLEEP_ENGINE = ROOT / "bench" / "sleep_engine"
HOLD = "fleet-hold"
MAX_BATCH = 4


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class RedisMeter:
    """Commands, network bytes and CPU seconds of the redis-server, between two reads."""

    def __init__(self, server: RedisServer, client: redis.Redis) -> None:
        self.pid = server.proc.pid
        self.client = client
        self.ticks = os.sysconf("SC_CLK_TCK")

    def commands(self) -> dict[str, int]:
        """Calls per command so far (``INFO commandstats``)."""
        stats = self.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

    def read(self) -> dict[str, float]:
        info = self.client.info("stats")
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime
        return {
            "t": time.monotonic(),
            "commands": info["total_commands_processed"],
            "bytes": info["total_net_input_bytes"] + info["total_net_output_bytes"],
            "cpu": cpu,
        }

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a}


def finished(raw: redis.Redis, prefix: str = "ben2q:metrics") -> int:
    """Jobs finished so far, from the workers' own metrics (one HGETALL)."""
    return int(sum(float(v) for v in raw.hgetall(f"{prefix}:jobs_total").values()))


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def run(
    n: int,
    args: argparse.Namespace,
    server: RedisServer,
    work: Path,
    status_server: RedisServer | None = None,
) -> dict[str, float]:
    raw = redis.Redis.from_url(server.url)
    raw.flushdb()
    meter = RedisMeter(server, raw)
    status_raw = raw
    if status_server is not None:  # job records and metrics in a Redis of their own
        status_raw = redis.Redis.from_url(status_server.url)
        status_raw.flushdb()
        status_meter = RedisMeter(status_server, status_raw)
    root = work / "files"
    shutil.rmtree(root, ignore_errors=True)
    (root / "out").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 120, 40)).save(buf, format="PNG")
    (root / "in.png").write_bytes(buf.getvalue())
    uri, out = f"file://{root}/in.png", f"file://{root}/out/"

    env = service_env(
        SimpleNamespace(url=server.url),
        SimpleNamespace(url="http://127.0.0.1:9"),
        BEN2Q_LOCAL_ROOT=str(root),
        BEN2Q_MAX_BATCH=str(MAX_BATCH),
        BEN2Q_BENCH_SLEEP_MS=str(args.sleep_ms),
        BEN2Q_VISIBILITY_TIMEOUT="3600",
        PYTHONPATH=os.pathsep.join([str(SLEEP_ENGINE), str(ROOT / "src")]),
        OMP_NUM_THREADS="1",
    )
    if status_server is not None:
        env["BEN2Q_RESULT_BACKEND"] = status_server.url
    settings = settings_of(env)
    logs = work / f"logs-{n}"
    logs.mkdir(exist_ok=True)
    workers = [Worker(env, logs / f"w{i}.log", name=f"w{i}", wait=False) for i in range(n)]
    try:
        for w in workers:
            w.wait_ready(timeout=600)
        time.sleep(2.0)  # start-up traffic settles

        a = meter.read()
        time.sleep(args.idle)
        idle = RedisMeter.delta(a, meter.read())

        # 2. submit to a list no worker reads
        hold = settings.model_copy(update={"queue": HOLD})
        a = meter.read()
        with Client(settings=hold) as client:
            for _ in range(args.jobs):
                client.submit(uri, output=out)
        submit = RedisMeter.delta(a, meter.read())

        # 3. drain: the list becomes the queue at once
        assert raw.llen(settings.queue) == 0
        base = finished(status_raw)
        calls = meter.commands()
        a = meter.read()
        if status_server is not None:
            sa = status_meter.read()
        raw.rename(HOLD, settings.queue)
        wait_until(lambda: finished(status_raw) - base >= args.jobs, 1800, "the drain")
        drain = RedisMeter.delta(a, meter.read())
        status_cpu = (
            RedisMeter.delta(sa, status_meter.read())["cpu"] if status_server is not None else 0.0
        )
        rate = args.jobs / drain["t"]
        per_job = {k: (v - calls.get(k, 0)) / args.jobs for k, v in meter.commands().items()}
        top = dict(sorted(per_job.items(), key=lambda kv: -kv[1])[:10])

        # 4. latency on a quiet fleet, then at a fraction of the drain's rate
        quiet = latency(settings, uri, out, gap=args.quiet_gap, seconds=args.seconds)
        loaded = latency(settings, uri, out, gap=1.0 / (args.load * rate), seconds=args.seconds)
    finally:
        for w in workers:
            w.stop()

    jobs = args.jobs
    print(
        f"N={n}: Redis commands per job in the drain: "
        + ", ".join(f"{k} {v:.2f}" for k, v in top.items()),
        flush=True,
    )
    return {
        "n": n,
        "idle_cmd_s": idle["commands"] / idle["t"],
        "submit_s": jobs / submit["t"],
        "submit_cmd": submit["commands"] / jobs,
        "submit_bytes": submit["bytes"] / jobs,
        "jobs_s": rate,
        "ceiling": n * MAX_BATCH / (args.sleep_ms / 1000.0),
        "cmd": drain["commands"] / jobs,
        "bytes": drain["bytes"] / jobs,
        "cpu_ms": drain["cpu"] / jobs * 1000.0,
        "cpu_pct": drain["cpu"] / drain["t"] * 100.0,
        "status_cpu_ms": status_cpu / jobs * 1000.0,
        **{f"quiet_{k}": v for k, v in quiet.items()},
        **{f"load_{k}": v for k, v in loaded.items()},
    }


def latency(settings, uri: str, out: str, *, gap: float, seconds: float) -> dict[str, float]:
    """Jobs submitted every ``gap`` seconds for ``seconds``: the rate achieved, and each
    job's latency (``finished_at - created_at``) and overhead (latency minus its own
    forward pass), p50 and p99 in ms."""
    store = StatusStore(settings.status_url, ttl=3600)
    ids: list[str] = []
    with Client(settings=settings) as client:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            delay = start + len(ids) * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ids.append(client.submit(uri, output=out).id)
        sent = len(ids) / (time.monotonic() - start)
    deadline = time.monotonic() + 600
    latencies, overheads = [], []
    for job_id in ids:
        while (status := store.get(job_id)) is None or not status.done:
            if time.monotonic() > deadline:
                raise TimeoutError("the latency phase's jobs")
            time.sleep(0.05)
        assert status.state == "succeeded", status.error
        took = status.finished_at - status.created_at
        latencies.append(took)
        overheads.append(took - (status.items[0].infer_ms or 0.0) / 1000.0)
    return {
        "rate": sent,
        "lat50": pct(latencies, 0.5) * 1000,
        "lat99": pct(latencies, 0.99) * 1000,
        "ovh50": pct(overheads, 0.5) * 1000,
        "ovh99": pct(overheads, 0.99) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8,16", help="N values (comma list)")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs of the drain phase")
    parser.add_argument("--sleep-ms", type=float, default=60.0, help="one pass of 4 images")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the drain rate")
    parser.add_argument("--seconds", type=float, default=10.0, help="each latency phase")
    parser.add_argument("--quiet-gap", type=float, default=0.25, help="s between quiet jobs")
    parser.add_argument("--idle", type=float, default=5.0, help="length of the idle reading")
    parser.add_argument(
        "--status-redis",
        action="store_true",
        help="job records and metrics in a second redis-server (BEN2Q_RESULT_BACKEND); the "
        "table's Redis columns are then the broker's, the status Redis's CPU is printed",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(
        f"CPU: {model}, {os.cpu_count()} CPUs; sleep {args.sleep_ms:g} ms per pass of "
        f"{MAX_BATCH}; {args.jobs} jobs per drain",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="ben2q-fleet-", dir="/dev/shm"))
    server = RedisServer(work / "redis").start()
    status_server = RedisServer(work / "status").start() if args.status_redis else None
    rows = []
    try:
        for n in [int(x) for x in args.workers.split(",")]:
            row = run(n, args, server, work, status_server)
            rows.append(row)
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    finally:
        server.stop()
        if status_server is not None:
            status_server.stop()
        shutil.rmtree(work, ignore_errors=True)

    one = rows[0]
    print()
    print(
        "| N | jobs/s | x N=1 | of ceiling | Redis cmd/job | bytes/job | Redis CPU ms/job "
        "| Redis CPU % | idle cmd/s | quiet: overhead p50 / p99 ms "
        "| at load (jobs/s): latency p50 / p99, overhead p50 / p99 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['n']:.0f} | {r['jobs_s']:.0f} | {r['jobs_s'] / one['jobs_s']:.2f} "
            f"| {r['jobs_s'] / r['ceiling']:.2f} | {r['cmd']:.1f} | {r['bytes']:,.0f} "
            f"| {r['cpu_ms']:.3f} | {r['cpu_pct']:.0f} | {r['idle_cmd_s']:.0f} "
            f"| {r['quiet_ovh50']:.0f} / {r['quiet_ovh99']:.0f} "
            f"| ({r['load_rate']:.0f}) {r['load_lat50']:.0f} / {r['load_lat99']:.0f}, "
            f"{r['load_ovh50']:.0f} / {r['load_ovh99']:.0f} |"
        )
    if args.status_redis:
        print(
            "\nstatus Redis CPU ms/job: "
            + ", ".join(f"N={r['n']:.0f} {r['status_cpu_ms']:.3f}" for r in rows)
        )
    print(
        f"\nsubmit (one producer): {one['submit_s']:.0f} jobs/s, "
        f"{one['submit_cmd']:.1f} Redis commands and {one['submit_bytes']:,.0f} bytes per job"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
