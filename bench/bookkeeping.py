"""Redis bytes per item of a batch job's bookkeeping, by batch size: items apart vs inline.

    .venv/bin/python bench/bookkeeping.py                      # 100, 1,000, 10,000, 100,000
    .venv/bin/python bench/bookkeeping.py --sizes 100 1000 --baseline-max 1000

Starts its own redis-server on loopback and replays what the workers' ``JobRunner`` does to
a fanned-out batch job's record, with the engine left out (bookkeeping alone): the client
creates the record, then for each chunk of ``--chunk`` items the chunk's items are read,
and each pass of ``--pass-size`` items is merged as it ends (``StatusStore.merge_items``,
the items carrying the output, size, timings and worker a real item carries; a chunk's
end changes nothing more, so the runner writes nothing then). A subscriber counts the
bytes published on the job's channel (what every watcher receives); Redis's
``total_net_input_bytes`` counts the bytes written.

Two layouts, in one run, on the same server:

* ``apart``: the record as stored now (summary + item hash, saves write what changed);
* ``inline``: the record holding every item (how every job was stored before; still how
  jobs of at most ``INLINE_ITEMS`` are), forced on the same batch: the baseline. It grows
  with the square of the batch, so it runs only up to ``--baseline-max`` items.

Prints, per size and layout: bytes written and published per item, merges, seconds, and
the ratio of the inline baseline to ``apart`` where both ran.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
from servers import RedisServer  # noqa: E402

from ben2q.jobs import Box, ItemStatus, JobStatus, make_request  # noqa: E402
from ben2q.status import KEYS, StatusStore  # noqa: E402


def finished(item: ItemStatus) -> ItemStatus:
    """The item as a worker records it once done (the fields a real item carries)."""
    return item.model_copy(
        update={
            "state": "succeeded",
            "output": f"s3://catalogue/cutouts/{item.index:06d}-{item.index:06d}.png",
            "width": 1024,
            "height": 768,
            "format": "png",
            "bytes": 412_345,
            "subject": True,
            "box": Box(left=12, top=8, width=988, height=752),
            "worker": "celery@ben2q-gpu-7f9c",
            "duration_ms": 812.512,
            "batch_size": 4,
            "fetch_ms": 31.25,
            "infer_ms": 640.5,
            "store_ms": 120.75,
        }
    )


def run(store: StatusStore, raw: redis.Redis, n: int, *, inline: bool, chunk: int, size: int):
    inputs = [f"s3://catalogue/photos/{i:06d}.jpg" for i in range(n)]
    status = JobStatus.queued(make_request("batch", inputs, "s3://catalogue/cutouts/"))
    if inline:
        status.items_apart = False
    received = [0]
    stop = threading.Event()
    pubsub = raw.pubsub()
    pubsub.subscribe(KEYS.events(status.id))
    pubsub.get_message(timeout=1)

    def listen() -> None:
        while True:
            msg = pubsub.get_message(timeout=0.05)
            if msg is None:
                if stop.is_set():
                    return
                continue
            if msg["type"] == "message":
                received[0] += len(msg["data"])

    listener = threading.Thread(target=listen)
    listener.start()
    merges = 0
    t0 = time.perf_counter()
    before = int(raw.info("stats")["total_net_input_bytes"])
    store.create(status)
    running = store.get(status.id, items=False)
    running.state, running.attempts, running.started_at = "running", 1, time.time()
    store.save(running, items=[])
    for start in range(0, n, chunk):
        items = store.get_items(status.id, start, start + chunk) or []
        for p in range(0, len(items), size):
            store.merge_items(status.id, [finished(i) for i in items[p : p + size]])
            merges += 1
    written = int(raw.info("stats")["total_net_input_bytes"]) - before
    seconds = time.perf_counter() - t0
    time.sleep(0.3)  # the last messages reach the subscriber
    stop.set()
    listener.join()
    pubsub.close()
    final = store.get(status.id, items=False)
    assert final is not None and final.state == "succeeded", final and final.state
    assert final.counts is not None and final.counts.succeeded == n, final.counts
    raw.delete(KEYS.job(status.id), KEYS.items(status.id))
    return written / n, received[0] / n, merges, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000, 100_000])
    p.add_argument("--chunk", type=int, default=16, help="items per chunk (BEN2Q_BATCH_CHUNK)")
    p.add_argument("--pass-size", type=int, default=4, help="items per pass (BEN2Q_MAX_BATCH)")
    p.add_argument("--baseline-max", type=int, default=1000, help="largest inline run")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ben2q-bookkeeping-"))
    server = RedisServer(tmp / "redis").start()
    try:
        raw = redis.Redis.from_url(server.url)
        with StatusStore(server.url, ttl=3600) as store:
            print(f"chunk {args.chunk}, pass {args.pass_size}; bytes per item")
            print(
                f"{'items':>8} {'layout':>7} {'written':>9} {'published':>9} "
                f"{'total':>9} {'merges':>7} {'seconds':>8} {'inline/apart':>12}"
            )
            for n in args.sizes:
                rows = {}
                for inline in (False, True):
                    if inline and n > args.baseline_max:
                        continue
                    w, pub, merges, secs = run(
                        store, raw, n, inline=inline, chunk=args.chunk, size=args.pass_size
                    )
                    rows[inline] = w + pub
                    ratio = f"{rows[True] / rows[False]:.1f}" if inline else ""
                    print(
                        f"{n:>8} {'inline' if inline else 'apart':>7} {w:>9.0f} {pub:>9.0f} "
                        f"{w + pub:>9.0f} {merges:>7} {secs:>8.2f} {ratio:>12}",
                        flush=True,
                    )
        raw.close()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
