"""Cold start: from ``ben2q worker`` process start to its first job's output. Not a test.

    .venv/bin/python bench/coldstart.py                       # base network, precision auto
    .venv/bin/python bench/coldstart.py --precision float32 --rounds 3
    .venv/bin/python bench/coldstart.py --warmup full         # the warm-up forward first

An autoscaled fleet starts workers when jobs are already waiting, so every second between
the process's start and the first output is queue wait. Each round: a job (a 1200x900 PNG,
file:// in and out) is put on the queue first, then a ``ben2q worker`` process is started
with BEN2 Base's checkpoint (deterministic weights saved as ``BEN2_Base.pth``) in a local
Hugging Face cache and ``HF_HUB_OFFLINE=1``; the time runs until the job's output exists.
The split comes from the worker's own JSON log lines:

* start -> the model's load: interpreter, imports, Celery's start and the pool's fork;
* checkpoint: reading the file (``torch.load`` with ``weights_only``, memory-mapped);
* build + weights in place: the module tree and ``load_state_dict``;
* warm-up: the warm-up pass (``BEN2Q_WARMUP``), including one-time weight packing;
* first job: fetch, forward (the first at full size if there was no full warm-up),
  encode, write, status.

Starts its own redis-server on loopback (``tests/servers.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import RedisServer  # noqa: E402

PHOTO = ROOT / "tests" / "fixtures" / "b_photo.png"
COMMIT = "0" * 40


def hub_cache(root: Path) -> Path:
    """An HF_HOME whose hub cache holds BEN2_Base.pth (deterministic weights), in the layout
    huggingface_hub writes; built once and kept under ``root``."""
    import torch

    from ben2q.model import build_model, deterministic_state_dict

    home = root / "hf"
    repo = home / "hub" / "models--PramaLLC--BEN2"
    path = repo / "snapshots" / COMMIT / "BEN2_Base.pth"
    if not path.exists():
        print(f"writing a deterministic BEN2_Base.pth into {home} (once)", flush=True)
        model = build_model("base")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(deterministic_state_dict(model), tmp)
        tmp.rename(path)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
    return home


def log_events(log: Path) -> list[tuple[float, str]]:
    """(epoch seconds, message) of the worker's JSON log lines."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "ts" in rec:
            ts = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            events.append((ts, str(rec.get("message", ""))))
    return events


def first(events: list[tuple[float, str]], needle: str) -> tuple[float, str]:
    for ts, msg in events:
        if needle in msg:
            return ts, msg
    raise SystemExit(f"no log line with {needle!r}")


def one_round(redis_url: str, hf_home: Path, work: Path, args, n: int) -> dict:
    from ben2q.client import Client
    from ben2q.config import Settings

    queue = f"cold-{os.getpid()}-{n}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEN2Q_", "HF_"))}
    env.update(
        {
            "BEN2Q_BROKER_URL": redis_url,
            "BEN2Q_QUEUE": queue,
            "BEN2Q_MODEL_SPEC": "base",
            "BEN2Q_DEVICE": "cpu",
            "BEN2Q_PRECISION": args.precision,
            "BEN2Q_LOCAL_ROOT": str(work),
            "BEN2Q_LOG_FORMAT": "json",
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "1",
        }
    )
    if args.warmup:
        env["BEN2Q_WARMUP"] = args.warmup
    settings = Settings(broker_url=redis_url, queue=queue, local_root=work)
    out_dir = work / f"out{n}"
    with Client(settings=settings) as client:
        job = client.submit(f"file://{work / 'in.png'}", f"file://{out_dir}/")
        log = work / f"worker{n}.log"
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ben2q.cli", "worker", "--hostname", f"cold{n}@%h"],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            status = client.wait(job, timeout=600)
            done = time.time()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if status.state != "succeeded":
        raise SystemExit(f"the job did not succeed: {status.model_dump_json()[:2000]}")
    assert any(out_dir.iterdir()), "no output written"
    events = log_events(log)
    loaded, loaded_msg = first(events, "weights from")  # "... (read in R s) in T s"
    ready, ready_msg = first(events, " ready on ")
    read_s = float(loaded_msg.split("read in ")[1].split(" s")[0])
    loading = loaded - float(loaded_msg.rsplit(" in ", 1)[1].split(" s")[0])
    return {
        "total": done - started,
        "imports": loading - started,
        "checkpoint": read_s,
        "build": loaded - loading - read_s,
        "warmup": ready - loaded,
        "first_job": done - ready,
        "ready": ready_msg,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--warmup", default=None, help="BEN2Q_WARMUP for the worker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ben2q-bench")
    args = parser.parse_args()

    hf_home = hub_cache(args.cache)
    work = Path(tempfile.mkdtemp(prefix="ben2q-cold-"))
    Image.open(PHOTO).convert("RGB").resize((1200, 900), Image.Resampling.LANCZOS).save(
        work / "in.png"
    )
    redis = RedisServer(work / "redis").start()
    rows = []
    try:
        for n in range(args.rounds):
            row = one_round(redis.url, hf_home, work, args, n)
            rows.append(row)
            print(
                f"round {n + 1}: {row['total']:.2f} s = start/imports {row['imports']:.2f} + "
                f"checkpoint {row['checkpoint']:.2f} + build {row['build']:.2f} + warm-up "
                f"{row['warmup']:.2f} + first job {row['first_job']:.2f}",
                flush=True,
            )
    finally:
        redis.stop()
    print(f"\n{rows[-1]['ready']}")
    print("| part | median s |\n| --- | --- |")
    for key in ("imports", "checkpoint", "build", "warmup", "first_job", "total"):
        print(f"| {key} | {statistics.median(r[key] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
