"""A batch job over the fleet: 1 vs 2 workers, and single jobs' latency beside it.

    .venv/bin/python bench/fanout.py                        # 1,000 images of 160x120
    .venv/bin/python bench/fanout.py --images 200 --singles 20

Starts its own redis-server and SeaweedFS S3 server on loopback and real ``ben2q worker``
processes (tiny spec, CPU, one torch thread each, chunks of ``BEN2Q_BATCH_CHUNK``=16):

1. **idle**: with one worker, ``--singles`` single-image jobs one after another on an idle
   queue: their latency (``finished_at - created_at``), p50/p99;
2. **one worker**: one ``--images`` batch job, wall time from submit to its final record;
3. **two workers**: the same batch job alone (its chunks spread over both);
4. **beside**: the same batch job again on both workers, and meanwhile single jobs sent
   one every ``--gap`` seconds (each waited for before the next): their latency beside
   the batch, and the batch's time with them.

Prints the scaling efficiency (speed-up / workers, from 2 and 3) and the single jobs'
p50/p99 beside the batch against the idle ones. Two workers with one thread each on a
2-vCPU machine do not share a core with each other, but they share the two cores with
Redis, SeaweedFS and this process (which submits and polls); the efficiency is that of the
whole machine.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from load import synthetic  # noqa: E402  (bench/load.py: the same test photos)
from servers import S3_ENV, RedisServer, S3Server  # noqa: E402
from stack import Worker, service_env  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def singles(client, uri: str, n: int, out: str) -> list[float]:
    """Latency (s) of ``n`` single jobs, sent one after another, each waited for."""
    latencies = []
    for _ in range(n):
        status = client.wait(client.submit(uri, output=out), timeout=600)
        assert status.state == "succeeded", status.error
        latencies.append(status.finished_at - status.created_at)
    return latencies


def batch(client, uris: list[str], out: str) -> tuple[float, dict[str, int]]:
    t0 = time.monotonic()
    status = client.wait(client.submit_batch(uris, output=out), timeout=3600)
    wall = time.monotonic() - t0
    assert status.state == "succeeded", (status.state, status.error)
    workers: dict[str, int] = {}
    for item in status.items:
        workers[item.worker or "?"] = workers.get(item.worker or "?", 0) + 1
    return wall, workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", default="160x120", help="image size WxH")
    p.add_argument("--singles", type=int, default=40, help="single jobs per latency run")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--gap", type=float, default=1.0, help="seconds between single jobs (4)")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))

    os.environ.update(S3_ENV)
    tmp = Path(tempfile.mkdtemp(prefix="ben2q-fanout-"))
    redis = RedisServer(tmp / "redis").start()
    s3srv = S3Server(tmp / "s3").start()
    workers: list[Worker] = []
    try:
        s3 = s3srv.client()
        s3srv.create_bucket("fan-in")
        s3srv.create_bucket("fan-out")
        uris = []
        for i in range(20):
            buf = io.BytesIO()
            synthetic(w, h, i).save(buf, format="PNG")
            s3.put_object(Bucket="fan-in", Key=f"img/{i}.png", Body=buf.getvalue())
            uris.append(f"s3://fan-in/img/{i}.png")
        env = service_env(
            redis,
            s3srv,
            BEN2Q_MAX_BATCH=str(args.max_batch),
            BEN2Q_BATCH_CHUNK="16",
            BEN2Q_VISIBILITY_TIMEOUT="600",
            BEN2Q_JOB_TIME_LIMIT="30",
            BEN2Q_JOB_SOFT_TIME_LIMIT="25",
            BEN2Q_WEBHOOK_TIMEOUT="1",
            OMP_NUM_THREADS="1",
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith("BEN2Q_")})
        from ben2q.client import Client
        from ben2q.config import Settings

        client = Client(settings=Settings())
        batch_uris = [uris[i % len(uris)] for i in range(args.images)]
        workers.append(Worker(env, tmp / "w1.log", name="w1"))
        singles(client, uris[0], 3, "s3://fan-out/warm/")  # first passes at this size
        idle = singles(client, uris[0], args.singles, "s3://fan-out/idle/")
        print(f"idle single jobs: p50 {pct(idle, 0.5):.3f} s, p99 {pct(idle, 0.99):.3f} s")
        one, by_one = batch(client, batch_uris, "s3://fan-out/one/")
        print(f"1 worker:  {args.images} images in {one:.1f} s ({args.images / one:.1f}/s)")
        workers.append(Worker(env, tmp / "w2.log", name="w2"))
        singles(client, uris[0], 3, "s3://fan-out/warm/")
        two, by_two = batch(client, batch_uris, "s3://fan-out/two/")
        print(f"2 workers: {args.images} images in {two:.1f} s ({args.images / two:.1f}/s)")
        print(f"  items by worker: {by_two}")
        speedup = one / two
        print(f"speed-up {speedup:.2f}, scaling efficiency {speedup / 2:.2f}")
        beside: list[float] = []
        done = threading.Event()

        def run_singles() -> None:
            time.sleep(2.0)  # the batch's chunks are on the queue and running
            while not done.is_set():
                beside.extend(singles(client, uris[1], 1, "s3://fan-out/beside/"))
                done.wait(args.gap)

        thread = threading.Thread(target=run_singles)
        thread.start()
        with_singles, _ = batch(client, batch_uris, "s3://fan-out/beside-batch/")
        done.set()
        thread.join()
        print(f"2 workers with single jobs beside: the batch in {with_singles:.1f} s")
        if beside:
            print(
                f"single jobs beside the batch ({len(beside)}): p50 {pct(beside, 0.5):.3f} s, "
                f"p99 {pct(beside, 0.99):.3f} s; idle p50 {pct(idle, 0.5):.3f} s "
                f"(ratio p50 {pct(beside, 0.5) / pct(idle, 0.5):.1f}, "
                f"p99 {pct(beside, 0.99) / pct(idle, 0.99):.1f}); "
                f"mean {statistics.mean(beside):.3f} s"
            )
        client.close()
    finally:
        for worker in workers:
            worker.kill()
        s3srv.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
