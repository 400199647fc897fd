"""HTTP API benchmark: what the API adds, against the Python client in the same run.

    .venv/bin/python bench/api.py                      # everything (about 3 minutes)
    .venv/bin/python bench/api.py --only submit,get    # some parts
    .venv/bin/python bench/api.py --streams 1000 --waits 300   # smaller fan-out runs

Starts its own redis-server, SeaweedFS S3 server, one ``ben2q api`` process (uvicorn, one
process) and, for ``remove``, one ``ben2q worker`` (tiny spec, CPU), all on loopback.
Parts:

- ``submit``: p50/p99 of ``POST /v1/jobs`` (JSON, one s3:// input) against
  ``Client.submit`` of the same request, alternating, on a queue no worker consumes; the
  difference is the latency the API adds (goal: at most 5 ms at p50).
- ``get``: ``GET /v1/jobs/{id}`` requests per second of the one API process at 50
  concurrent connections, with ``wrk`` (Debian package ``wrk``) on the same 2 cores; p50
  and p99 latency (goal: at least 1,500/s, p99 at most 50 ms).
- ``remove``: ``POST /v1/remove`` (a 640x480 PNG uploaded, the cut-out answered) against
  the same job through the Python client (S3 put, submit, wait, S3 get), alternating
  (goal: at most 1.1x).
- ``sse``: N concurrent ``GET /v1/jobs/{id}/events`` streams on the one API process (a
  client process holds them), each on its own job; then every job's terminal record is
  saved and each stream's final event is timed against its save (goal: p99 at most 250 ms,
  at most 10 Redis connections held by the API process); the API's memory before/during.
- ``wait``: N concurrent ``AsyncClient.wait`` calls in this process, timed the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import S3_ENV, RedisServer, S3Server, free_port, redis_connections  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, 0 * xx + 90], -1).astype(np.uint8)
    inside = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2
    img[inside <= 1] = (230, 200, 60)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Service:
    """Redis, S3, one API process and (on demand) one worker, with a key."""

    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis").start()
        self.s3 = S3Server(tmp / "s3").start()
        for bucket in ("bench-in", "bench-out", "bench-up"):
            self.s3.create_bucket(bucket)
        os.environ.update(S3_ENV)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
        self.env.update(
            {
                **S3_ENV,
                "BEN2Q_BROKER_URL": self.redis.url,
                "BEN2Q_S3_ENDPOINT_URL": self.s3.url,
                "BEN2Q_MODEL_SPEC": "tiny",
                "BEN2Q_DEVICE": "cpu",
                "BEN2Q_ALLOW_PRIVATE_URLS": "true",
                "BEN2Q_API_OUTPUT_LOCATION": "s3://bench-out/",
                "BEN2Q_API_UPLOAD_LOCATION": "s3://bench-up/",
                "BEN2Q_API_RATE_REQUESTS": "100000000",
                "BEN2Q_API_RATE_IMAGES": "100000000",
                "BEN2Q_API_MAX_QUEUED": "100000000",
                "BEN2Q_LOG_FORMAT": "text",
                "BEN2Q_HEALTH_DIR": str(tmp / "health"),
                **(extra_env or {}),
            }
        )
        for name, value in self.env.items():
            if name.startswith("BEN2Q_"):
                os.environ[name] = value
        from ben2q.keys import KeyStore

        store = KeyStore(self.redis.url)
        self.key, self.token = store.create("bench", input_prefixes=["s3://bench-in/"])
        store.close()
        self.api_port = free_port()
        self.api = subprocess.Popen(
            [sys.executable, "-m", "ben2q.cli", "api", "--port", str(self.api_port)],
            env=self.env,
            stdout=open(tmp / "api.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.api_port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        self.worker: subprocess.Popen | None = None

    def settings(self, **update):
        from ben2q.config import Settings

        return Settings().model_copy(update=update)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start_worker(self) -> None:
        log = self.tmp / "worker.log"
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "ben2q.cli", "worker", "--hostname", "bench@%h"],
            env=self.env,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if "BEN2 tiny ready" in log.read_text(errors="replace") and " ready." in log.read_text(
                errors="replace"
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("worker not ready")

    def close(self) -> None:
        for proc in (self.api, self.worker):
            if proc is not None:
                proc.terminate()
                proc.wait(20)
        self.s3.stop()
        self.redis.stop()


# --- parts ------------------------------------------------------------------------------


def bench_submit(svc: Service, rounds: int) -> None:
    from ben2q.client import Client

    svc.s3.client().put_object(Bucket="bench-in", Key="s.png", Body=png(64, 48))
    body = {"input": "s3://bench-in/s.png"}
    settings = svc.settings(queue="bench-idle")
    # the API's own jobs also go to a queue nobody consumes: restart it on that queue
    api_ms, client_ms = [], []
    with (
        httpx.Client(base_url=svc.url, headers=svc.headers()) as http,
        Client(settings=settings) as client,
    ):
        for _ in range(30):  # warm both
            http.post("/v1/jobs", json=body).raise_for_status()
            client.submit(body["input"], "s3://bench-out/c/")
        for _ in range(rounds):
            t = time.perf_counter()
            http.post("/v1/jobs", json=body).raise_for_status()
            api_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            client.submit(body["input"], "s3://bench-out/c/")
            client_ms.append((time.perf_counter() - t) * 1000)
    a50, c50 = statistics.median(api_ms), statistics.median(client_ms)
    print(
        f"submit ({rounds} each, alternating): API p50 {a50:.2f} ms p99 {pct(api_ms, 99):.2f} ms; "
        f"Client.submit p50 {c50:.2f} ms p99 {pct(client_ms, 99):.2f} ms; "
        f"the API adds {a50 - c50:.2f} ms at p50 (goal <= 5), ratio {a50 / c50:.2f}x"
    )
    # empty the idle queues again
    import redis

    r = redis.Redis.from_url(svc.redis.url)
    r.delete("bench-idle", "ben2q")
    r.close()


def bench_get(svc: Service, seconds: int) -> None:
    wrk = shutil.which("wrk")
    with httpx.Client(base_url=svc.url, headers=svc.headers()) as http:
        job = http.post("/v1/jobs", json={"input": "s3://bench-in/s.png"}).json()["id"]
    if wrk is None:
        print("get: skipped (install wrk: apt-get install wrk)")
        return
    before = rss_mb(svc.api.pid)
    out = subprocess.run(
        [
            wrk,
            "-t1",
            "-c50",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {svc.token}",
            f"{svc.url}/v1/jobs/{job}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def latency(q: str) -> str:
        match = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        return match.group(1) if match else "?"

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    print(
        f"get: GET /v1/jobs/{{id}} at 50 connections, {seconds} s (wrk -t1 on the same 2 cores): "
        f"{rps:,.0f} requests/s (goal >= 1,500), p50 {latency('50')}, p99 {latency('99')} "
        f"(goal <= 50 ms); non-2xx: {non2xx.group(1) if non2xx else 0}; API RSS "
        f"{before:.0f} -> {rss_mb(svc.api.pid):.0f} MB"
    )


def bench_remove(svc: Service, rounds: int) -> None:
    from ben2q.client import Client

    if svc.worker is None:
        svc.start_worker()
    data = png(640, 480, seed=3)
    s3 = svc.s3.client()
    api_ms, client_ms = [], []
    with (
        httpx.Client(base_url=svc.url, headers=svc.headers(), timeout=120) as http,
        Client(settings=svc.settings()) as client,
    ):

        def via_api() -> bytes:
            answer = http.post("/v1/remove", files={"file": ("p.png", data, "image/png")})
            answer.raise_for_status()
            return answer.content

        def via_client(i: int) -> bytes:
            s3.put_object(Bucket="bench-in", Key=f"r{i}.png", Body=data)
            job = client.submit(f"s3://bench-in/r{i}.png", "s3://bench-out/client/")
            record = client.wait(job, timeout=120)
            bucket, key = record.items[0].output.removeprefix("s3://").split("/", 1)
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

        for i in range(3):
            via_api(), via_client(1000 + i)
        for i in range(rounds):
            t = time.perf_counter()
            a = via_api()
            api_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            b = via_client(i)
            client_ms.append((time.perf_counter() - t) * 1000)
    same = Image.open(io.BytesIO(a)).size == Image.open(io.BytesIO(b)).size == (640, 480)
    a50, c50 = statistics.median(api_ms), statistics.median(client_ms)
    print(
        f"remove: 640x480, {rounds} each alternating: POST /v1/remove p50 {a50:.0f} ms "
        f"(p90 {pct(api_ms, 90):.0f}); Python client put+submit+wait+get p50 {c50:.0f} ms "
        f"(p90 {pct(client_ms, 90):.0f}); ratio {a50 / c50:.2f}x (goal <= 1.1); same size: {same}"
    )


def _make_records(svc: Service, count: int, tenant: str | None) -> list[str]:
    from ben2q.jobs import make_request
    from ben2q.status import StatusStore

    store = StatusStore(svc.redis.url, ttl=3600)
    ids = []
    from ben2q.jobs import JobStatus

    with store.redis.pipeline(transaction=False) as pipe:
        for _ in range(count):
            request = make_request(
                "single", ["s3://bench-in/s.png"], "s3://bench-out/x/", tenant=tenant
            )
            status = JobStatus.queued(request)
            pipe.set(store.keys.job(status.id), status.model_dump_json(), ex=3600)
            ids.append(status.id)
        pipe.execute()
    store.close()
    return ids


def _finish_all(svc: Service, ids: list[str], rate: float = 0.0) -> dict[str, float]:
    """Save every job's terminal record (pipelined in 100s; ``rate`` > 0: at most that many
    per second, in steps of 10 ms); the time each was saved."""
    from ben2q.status import StatusStore, encode

    store = StatusStore(svc.redis.url, ttl=3600)
    saved: dict[str, float] = {}
    step = max(1, int(rate / 100)) if rate else 100
    began = time.monotonic()
    for start in range(0, len(ids), step):
        if rate:
            time.sleep(max(0.0, began + start / rate - time.monotonic()))
        chunk = ids[start : start + step]
        records = []
        for job_id in chunk:
            status = store.get(job_id)
            status.state = "succeeded"
            status.progress = 1.0
            status.finished_at = time.time()
            for item in status.items:
                item.state = "succeeded"
            records.append(status)
        now = time.time()
        with store.redis.pipeline(transaction=False) as pipe:
            for status in records:
                data = encode(status)
                pipe.set(store.keys.job(status.id), data, ex=3600)
                pipe.publish(store.keys.events(status.id), data)
            pipe.execute()
        for status in records:
            saved[status.id] = now
    store.close()
    return saved


SSE_CLIENT = r"""
# A light SSE client: raw asyncio streams (no HTTP library), so that on the API's own two
# cores the client costs little and the latency measured is the API's.
import asyncio, json, sys, time

async def main(port, token, ids, ready_path, out_path):
    done, errors = {}, []
    opened = failed = 0

    def progress():
        if opened + failed == len(ids):
            open(ready_path, "w").write(json.dumps({"opened": opened, "failed": failed,
                                                    "errors": errors[:5]}))

    async def one(job_id):
        nonlocal opened, failed
        first = True
        try:
            for attempt in range(20):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    await asyncio.sleep(0.2 * (attempt + 1))
            writer.write((f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n"
                          f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
                          ).encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:300].decode(errors="replace") +
                                   (await reader.read(300)).decode(errors="replace"))
            tail = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data = tail + chunk
                if first and b"data:" in data:
                    first = False
                    opened += 1
                    progress()
                if b'"state":"succeeded"' in data:
                    done[job_id] = time.time()
                    break
                tail = data[-64:]
            writer.close()
        except Exception as exc:
            errors.append(repr(exc)[:400])
            if first:
                failed += 1
                progress()

    await asyncio.gather(*(one(j) for j in ids))
    json.dump({"done": done, "errors": errors[:5], "error_count": len(errors)}, open(out_path, "w"))

port, token, ids_path, ready_path, out_path = sys.argv[1:6]
asyncio.run(main(int(port), token, json.load(open(ids_path)), ready_path, out_path))
"""


def bench_sse(svc: Service, count: int, rate: float = 0.0) -> None:
    ids = _make_records(svc, count, svc.key.id)
    tmp = svc.tmp
    (tmp / "ids.json").write_text(json.dumps(ids))
    ready, out = tmp / "sse-ready", tmp / "sse-out.json"
    for path in (ready, out):
        path.unlink(missing_ok=True)
    (tmp / "sse_client.py").write_text(SSE_CLIENT)
    rss_before = rss_mb(svc.api.pid)
    started = time.monotonic()
    client = subprocess.Popen(
        [
            sys.executable,
            str(tmp / "sse_client.py"),
            str(svc.api_port),
            svc.token,
            str(tmp / "ids.json"),
            str(ready),
            str(out),
        ]
    )
    while not ready.exists():
        if client.poll() is not None or time.monotonic() - started > 600:
            client.kill()
            raise RuntimeError("the SSE client did not open its streams")
        time.sleep(0.1)
    opened_s = time.monotonic() - started
    time.sleep(0.2)
    opening = json.loads(ready.read_text())
    if opening["failed"]:
        print(f"sse: {opening['failed']} of {count} streams failed to open: {opening['errors']}")
    time.sleep(1.0)
    held = len(redis_connections(svc.api.pid, svc.redis.port))
    rss_during = rss_mb(svc.api.pid)
    saved = _finish_all(svc, ids, rate)
    client.wait(300)
    result = json.loads(out.read_text())
    internal = (tmp / "api.log").read_text(errors="replace").split("internal error on")
    if len(internal) > 1:
        print(
            "sse: the API logged",
            len(internal) - 1,
            "internal errors; the last:",
            internal[-1][-1500:],
        )
    lat = [(result["done"][j] - saved[j]) * 1000 for j in ids if j in result["done"]]
    print(
        f"sse: {count} streams on one API process opened in {opened_s:.1f} s; "
        f"{f'jobs finishing at {rate:g}/s' if rate else 'all jobs finished at once'}; "
        "final event "
        f"received by {len(lat)}/{count} (errors {result['error_count']}); latency from the "
        f"save p50 {pct(lat, 50):.0f} ms p99 {pct(lat, 99):.0f} ms max {max(lat):.0f} ms "
        f"(goal p99 <= 250); Redis connections held by the API process: {held} (goal <= 10); "
        f"API RSS {rss_before:.0f} MB idle, {rss_during:.0f} MB with the streams open "
        f"({(rss_during - rss_before) * 1024 / count:.1f} kB per stream)"
    )


def bench_wait(svc: Service, count: int) -> None:
    from ben2q.client import AsyncClient

    ids = _make_records(svc, count, None)

    async def run() -> tuple[list[float], int, int]:
        done: dict[str, float] = {}
        async with AsyncClient(settings=svc.settings()) as client:

            async def one(job_id: str) -> None:
                await client.wait(job_id, timeout=300)
                done[job_id] = time.time()

            tasks = [asyncio.create_task(one(j)) for j in ids]
            await asyncio.sleep(3.0)
            held = len(redis_connections(os.getpid(), svc.redis.port))
            saved = await asyncio.to_thread(_finish_all, svc, ids)
            results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = sum(isinstance(r, BaseException) for r in results)
        return [(done[j] - saved[j]) * 1000 for j in ids if j in done], held, errors

    rss_before = rss_mb(os.getpid())
    lat, held, errors = asyncio.run(run())
    print(
        f"wait: {count} concurrent AsyncClient.wait in one process: {len(lat)}/{count} got "
        f"their final record (errors {errors}); latency from the save p50 {pct(lat, 50):.0f} ms "
        f"p99 {pct(lat, 99):.0f} ms; Redis connections held while waiting: {held}; process RSS "
        f"{rss_before:.0f} -> {rss_mb(os.getpid()):.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="submit,get,remove,sse,wait")
    parser.add_argument("--submit-rounds", type=int, default=300)
    parser.add_argument("--get-seconds", type=int, default=10)
    parser.add_argument("--remove-rounds", type=int, default=15)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--waits", type=int, default=1000)
    parser.add_argument(
        "--api-env", action="append", default=[], metavar="BEN2Q_X=V", help="API settings"
    )
    parser.add_argument(
        "--finish-rate", type=float, default=1000, help="jobs ending per second (paced run)"
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(f"CPU: {cpu}, {os.cpu_count()} cores; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="ben2q-bench-api-") as tmp:
        svc = Service(Path(tmp), dict(kv.split("=", 1) for kv in args.api_env))
        try:
            if "submit" in parts:
                bench_submit(svc, args.submit_rounds)
            if "get" in parts:
                bench_get(svc, args.get_seconds)
            if "remove" in parts:
                bench_remove(svc, args.remove_rounds)
            if "sse" in parts:
                bench_sse(svc, args.streams)  # a burst: every job ends at once
                bench_sse(svc, args.streams, rate=args.finish_rate)
            if "wait" in parts:
                bench_wait(svc, args.waits)
        finally:
            svc.close()


if __name__ == "__main__":
    main()
