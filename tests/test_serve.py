"""Starting workers: argument building, GPU pinning, `celery -A ben2q.worker`, `ben2q up`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ben2q.config import Settings
from ben2q.serve import pin_gpu, worker_argv
from ben2q.worker import worker_config


def test_worker_argv_defaults_and_passthrough():
    argv = worker_argv([], queues=None, gpu=None)
    assert argv[:3] == ["worker", "--pool=prefork", "--concurrency=1"]
    assert "--queues=ben2q,ben2q-webhooks" in argv and "--hostname=ben2q@%h" in argv
    pinned = worker_argv(["--loglevel", "INFO"], queues="a,b", gpu=2)
    assert "--hostname=gpu2@%h" in pinned and "--queues=a,b" in pinned
    assert pinned[-2:] == ["--loglevel", "INFO"]
    named = worker_argv(["-n", "x@y"], queues=None, gpu=1)
    assert not any(a.startswith("--hostname") for a in named)


def test_pin_gpu_sets_the_visible_device():
    env: dict[str, str] = {}
    pin_gpu(3, env)
    assert env == {"CUDA_VISIBLE_DEVICES": "3", "BEN2Q_DEVICE": "cuda:0"}
    env = {"BEN2Q_DEVICE": "cuda:0"}
    pin_gpu(1, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"


def test_worker_policy_is_late_ack_json_and_sized_prefetch():
    conf = worker_config(Settings(max_batch=6, visibility_timeout=900))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["worker_prefetch_multiplier"] == 12 and conf["worker_concurrency"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 900


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
    env.update({"BEN2Q_MODEL_SPEC": "tiny", "BEN2Q_DEVICE": "cpu", **extra})
    return env


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert proc.poll() is None, content[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen: {path.read_text()[-3000:]}")


def test_ben2q_up_runs_a_job_with_file_storage(tmp_path, make_image):
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    make_image(64, 48, seed=1).save(root / "in" / "photo.jpg")
    log = tmp_path / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "ben2q.cli", "up", "--root", str(root)],
        env=_env(),
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        text = _wait_for(log, "BEN2 tiny ready", up)
        _wait_for(log, " ready.", up)
        url = next(w.rstrip(",") for w in text.split() if w.startswith("redis://"))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "ben2q.cli",
                "submit",
                f"file://{root}/in/photo.jpg",
                "--output",
                f"file://{root}/out/",
                "--wait",
                "--broker",
                url,
            ],
            env=_env(BEN2Q_LOCAL_ROOT=str(root)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        [result] = list((root / "out").glob("*/0000-photo.png"))
        from PIL import Image

        assert Image.open(result).mode == "RGBA" and Image.open(result).size == (64, 48)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:  # Redis went down with it
        assert s.connect_ex(("127.0.0.1", port)) != 0
