"""Queue benchmark: end-to-end latency and one worker's throughput, against the engine alone.

    .venv/bin/python bench/service.py                  # tiny spec, 200 jobs
    .venv/bin/python bench/service.py --jobs 50 --latency-jobs 10

Starts its own redis-server and S3 server (SeaweedFS) on loopback and real ``ben2q worker``
processes (tiny spec, CPU). Reports, in one run:
- latency of lone single-image jobs (submit -> final status seen by the producer), p50/p99,
  and the same minus the engine time of that job (its worker's ``infer_ms``): the queue's
  overhead, split into queue wait, read + decode, encode + write and the rest;
- jobs/s for N single-image jobs submitted at once, with cross-job batching
  (``BEN2Q_MAX_BATCH=4``) and without it (``=1``), and for one batch job of N inputs;
- the baseline: a direct engine loop (one ``Engine.predict`` per image) over the same
  images, measured again right before each throughput run, and the ratios queue/baseline.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
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


def synthetic(width: int, height: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = np.stack([40 + 150 * xx / width, 60 + 120 * yy / height, 90 + 0 * xx], -1)
    inside = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2
    a[inside <= 1] = (230, 200, 60)
    a += rs.normal(0, 4, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def s3_and_codec_floor(s3, input_uri: str, output_uri: str, *, settings, rounds: int = 15):
    """p50 ms of what a lone job does besides the queue, run alone: S3 GET of its input,
    decode, PNG encode of its output's pixels and S3 PUT of the encoded bytes."""
    from ben2q.imageio import decode_image
    from ben2q.png import encode_png

    def split(uri: str) -> tuple[str, str]:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return bucket, key

    (ib, ik), (ob, ok) = split(input_uri), split(output_uri)
    pixels = np.asarray(Image.open(io.BytesIO(s3.get_object(Bucket=ob, Key=ok)["Body"].read())))
    times: dict[str, list[float]] = {k: [] for k in ("get", "decode", "encode", "put")}
    for _ in range(rounds):
        for name in times:
            time.sleep(0.3)  # as idle as a producer and a worker are between lone jobs
            t = time.perf_counter()
            if name == "get":
                data = s3.get_object(Bucket=ib, Key=ik)["Body"].read()
            elif name == "decode":
                decode_image(data, settings=settings)
            elif name == "encode":
                out = encode_png(pixels)
            else:
                s3.put_object(Bucket=ob, Key=ok + ".floor", Body=out, ContentType="image/png")
            times[name].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def start_worker(env: dict[str, str], log: Path, name: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ben2q.cli", "worker", "--hostname", f"{name}@%h"],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if " ready." in text and "BEN2 tiny ready" in text:
            return proc
        if proc.poll() is not None:
            sys.exit(f"worker died:\n{text[-2000:]}")
        time.sleep(0.1)
    sys.exit("worker did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--latency-jobs", type=int, default=30)
    p.add_argument("--size", default="640x480", help="image size WxH")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))

    os.environ.update(S3_ENV)
    tmp = Path(tempfile.mkdtemp(prefix="ben2q-bench-"))
    redis = RedisServer(tmp / "redis").start()
    s3srv = S3Server(tmp / "s3").start()
    s3 = s3srv.client()
    s3srv.create_bucket("bench-in")  # and its first volume: not part of any measure
    s3srv.create_bucket("bench-out")
    images = [synthetic(w, h, seed) for seed in range(args.jobs)]
    uris = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        s3.put_object(Bucket="bench-in", Key=f"img/{i}.png", Body=buf.getvalue())
        uris.append(f"s3://bench-in/img/{i}.png")

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
    base_env.update(
        {
            "BEN2Q_BROKER_URL": redis.url,
            "BEN2Q_S3_ENDPOINT_URL": s3srv.url,
            "BEN2Q_MODEL_SPEC": "tiny",
            "BEN2Q_DEVICE": "cpu",
        }
    )
    os.environ.update({k: v for k, v in base_env.items() if k.startswith("BEN2Q_")})

    import torch

    from ben2q.client import Client
    from ben2q.config import Settings
    from ben2q.engine import Engine

    # --- baseline: the engine alone, one image at a time, in this process -------------
    # measured again right before each throughput run: this host's speed drifts over
    # minutes, and a ratio means something only against a baseline of the same moment
    engine = Engine.load(settings=Settings(model_spec="tiny", device="cpu"))
    engine.warmup()

    def direct_loop() -> tuple[float, float]:
        torch.set_num_threads(2)
        per_image = []
        t0 = time.perf_counter()
        for img in images:
            t = time.perf_counter()
            engine.predict([img])
            per_image.append(time.perf_counter() - t)
        direct_s = time.perf_counter() - t0
        torch.set_num_threads(1)  # leave the cores to the worker
        ips = len(images) / direct_s
        print(
            f"direct engine loop     {direct_s:8.2f} s  {ips:7.2f} img/s   "
            f"engine p50 {statistics.median(per_image) * 1000:6.1f} ms/img  (baseline)"
        )
        return ips, statistics.median(per_image)

    print(f"tiny spec, {w}x{h} PNG inputs, {args.jobs} jobs, cpu={os.cpu_count()}")
    direct_ips, engine_p50 = direct_loop()

    results = {}
    for label, max_batch in (("batched (max_batch=4)", 4), ("unbatched (max_batch=1)", 1)):
        env = {**base_env, "BEN2Q_MAX_BATCH": str(max_batch)}
        worker = start_worker(env, tmp / f"worker{max_batch}.log", f"b{max_batch}")
        client = Client(settings=Settings(**{"broker_url": redis.url, "max_batch": max_batch}))
        if max_batch == 4:
            # lone jobs: latency and overhead over the engine time (the job's own engine
            # pass as its worker timed it: infer_ms), and where the overhead went
            warm = client.submit(uris[0], output="s3://bench-out/lat/")  # first-use costs
            assert client.wait(warm, timeout=120).state == "succeeded"
            lat, parts = [], {k: [] for k in ("over", "wait", "fetch", "store", "rest")}
            for i in range(args.latency_jobs):
                t = time.perf_counter()
                job = client.submit(uris[i % len(uris)], output="s3://bench-out/lat/")
                st = client.wait(job, timeout=120)
                ms = (time.perf_counter() - t) * 1000
                assert st.state == "succeeded", st
                item = st.items[0]
                lat.append(ms)
                parts["over"].append(ms - item.infer_ms)
                parts["wait"].append(st.queue_wait_ms)
                parts["fetch"].append(item.fetch_ms)
                parts["store"].append(item.store_ms)
                parts["rest"].append(
                    ms - item.infer_ms - st.queue_wait_ms - item.fetch_ms - item.store_ms
                )
            over_direct = [x - engine_p50 * 1000 for x in lat]
            print(
                f"lone job latency       p50 {pct(lat, 50):7.1f} ms  p99 {pct(lat, 99):7.1f} ms"
                f"; minus its engine time: p50 {pct(parts['over'], 50):6.1f} ms"
                f"  p99 {pct(parts['over'], 99):6.1f} ms"
                f" (minus the direct loop's p50: {pct(over_direct, 50):6.1f} ms)"
            )
            print(
                "  overhead p50 by part: queue wait {:.1f} ms, read+decode {:.1f} ms, "
                "encode+write {:.1f} ms, the rest (submit, status records, "
                "notification) {:.1f} ms".format(
                    *(pct(parts[k], 50) for k in ("wait", "fetch", "store", "rest"))
                )
            )
            floor = s3_and_codec_floor(s3, uris[0], st.items[0].output, settings=client.settings)
            print(
                "  the same operations alone in this process, idle 0.3 s before each as a lone"
                " job's are: S3 GET {get:.1f} ms + PUT {put:.1f} ms (boto3 to the S3 server),"
                " decode {decode:.1f} ms + encode {encode:.1f} ms; overhead minus these:"
                " p50 {rest:.1f} ms".format(
                    **floor, rest=pct(parts["over"], 50) - sum(floor.values())
                )
            )
        direct_ips, _ = direct_loop()
        t = time.perf_counter()
        jobs = [client.submit(u, output=f"s3://bench-out/{max_batch}/") for u in uris]
        finals = [client.wait(j, timeout=600) for j in jobs]
        elapsed = time.perf_counter() - t
        assert all(s.state == "succeeded" for s in finals)
        waits = [s.queue_wait_ms for s in finals]
        e2e = [(s.finished_at - s.created_at) * 1000 for s in finals]
        sizes = Counter(s.items[0].batch_size for s in finals)
        jps = results[label] = len(jobs) / elapsed
        print(
            f"{label:22s} {elapsed:8.2f} s  {jps:7.2f} jobs/s  x{jps / direct_ips:.3f}"
            f" of baseline; queue wait p50 {pct(waits, 50):7.0f} ms p99 {pct(waits, 99):7.0f} ms;"
            f" end-to-end p50 {pct(e2e, 50):7.0f} ms p99 {pct(e2e, 99):7.0f} ms;"
            f" jobs by pass size {dict(sorted(sizes.items()))}"
        )
        if max_batch == 4:
            direct_ips, _ = direct_loop()
            t = time.perf_counter()
            st = client.wait(client.submit_batch(uris, output="s3://bench-out/batch/"), timeout=600)
            elapsed = time.perf_counter() - t
            assert st.state == "succeeded", st.state
            ips = len(uris) / elapsed
            print(
                f"one batch job of {len(uris):3d}   {elapsed:8.2f} s  {ips:7.2f} img/s   "
                f"x{ips / direct_ips:.3f} of baseline"
            )
        client.close()
        stop(worker)
    redis.stop()
    s3srv.stop()
    shutil.rmtree(tmp / "s3", ignore_errors=True)  # SeaweedFS keeps every object on disk


if __name__ == "__main__":
    main()
