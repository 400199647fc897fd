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
    assert "--without-mingle" in argv and "--without-gossip" in argv  # a second at start
    assert "--queues=ben2q-webhooks,ben2q,ben2q-batch" in argv and "--hostname=ben2q@%h" in argv
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
    env.update(
        {"BEN2Q_MODEL_SPEC": "tiny", "BEN2Q_DEVICE": "cpu", "BEN2Q_PRECISION": "float32", **extra}
    )
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


# --- a person at a terminal ---------------------------------------------------------------


def _run_in_terminal(
    argv: list[str], env: dict[str, str], *, until: str | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdout and stderr (as a person would); with
    ``until``, send Ctrl-C (SIGINT to its process group, as the terminal does) once that
    text appeared. Returns the exit status and everything it printed."""
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    out = b""
    interrupted = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: every writer is gone
                    break
                if not chunk:
                    break
                out += chunk
            if until and not interrupted and until.encode() in out:
                os.killpg(proc.pid, signal.SIGINT)
                interrupted = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(leader)
    return code, out.decode(errors="replace").replace("\r\n", "\n")


def test_up_without_weights_says_why_in_one_line_and_exits(tmp_path):
    env = _env(BEN2Q_MODEL_SPEC="base", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf"))
    code, text = _run_in_terminal(
        [sys.executable, "-m", "ben2q.cli", "up", "--root", str(tmp_path / "root")], env
    )
    assert code == 69, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].startswith("starting Redis on redis://127.0.0.1:")
    [reason] = [line for line in lines if "cannot run jobs" in line and "CRITICAL" in line]
    assert "weights_unavailable: no BEN2 weights" in reason
    assert "BEN2Q_WEIGHTS=/path/to/BEN2_Base.pth" in reason
    assert f"HF_HOME={tmp_path / 'empty-hf'} hf download PramaLLC/BEN2 BEN2_Base.pth" in reason
    assert lines[-1].startswith("ben2q up stopped: the worker cannot run jobs")
    assert "{" not in text  # readable text, no JSON lines
    assert "Traceback" not in text and "SecurityWarning" not in text
    assert " -------------- " not in text  # no Celery banner
    assert len(lines) <= 4, text  # start, (root warning), the reason, the end
    assert "ben2q is up" not in text


def test_up_at_a_terminal_is_readable_and_ctrl_c_stops_it(tmp_path):
    code, text = _run_in_terminal(
        [sys.executable, "-m", "ben2q.cli", "up", "--root", str(tmp_path / "root")],
        _env(),
        until="Ctrl-C stops the worker and Redis.",
    )
    assert code == 0, text
    assert "{" not in text and "Traceback" not in text and "SecurityWarning" not in text
    ready = text.index("BEN2 tiny ready on cpu")
    assert text.index("ben2q is up: broker redis://127.0.0.1:") > ready  # once it is warm
    assert text.count("Warm shutdown") <= 1
    messages = [line.split(" ", 2)[-1] for line in text.splitlines() if "Z INFO " in line]
    assert len(messages) == len(set(messages)), text  # each message once
    url = next(w for w in text.split() if w.startswith("redis://"))
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:  # Redis went down with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_workers_that_cannot_run_jobs_are_reported_not_restarted(tmp_path):
    """``--gpus 0,1`` on a machine whose PyTorch has no CUDA: both workers exit out of
    service at once; the supervisor says so for each and exits 69 instead of restarting
    them forever."""
    env = _env(
        BEN2Q_BROKER_URL="redis://127.0.0.1:1/0",  # never reached: no job is consumed
        BEN2Q_HEALTH_DIR=str(tmp_path / "health"),
        BEN2Q_LOG_FORMAT="text",
    )
    del env["BEN2Q_DEVICE"]  # --gpu N makes it cuda:0
    done = subprocess.run(
        [sys.executable, "-m", "ben2q.cli", "worker", "--gpus", "0,1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 69, done.stderr[-3000:]
    for gpu in (0, 1):
        assert f"gpu{gpu} cannot run jobs (see its last log line); not restarted" in done.stderr
    reasons = [line for line in done.stderr.splitlines() if "cannot run jobs: " in line]
    assert len(reasons) == 2
    assert all("device_unavailable: BEN2Q_DEVICE=cuda:0" in r for r in reasons), reasons
    assert "restarting in" not in done.stderr and "Traceback" not in done.stderr


def test_the_supervisor_restarts_a_worker_that_crashed(tmp_path):
    from ben2q.serve import Supervisor

    marker = tmp_path / "runs"
    script = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
        "sys.exit(1) if n == 0 else time.sleep(60)"
    )
    sup = Supervisor({"w": [sys.executable, "-c", script, str(marker)]})
    sup.start()
    try:
        deadline = time.monotonic() + 30
        while marker.read_text() != "xx" if marker.exists() else True:
            sup.poll()  # the crash (exit 1) is restarted after 2 s
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert sup.running and sup.restarts["w"] == 1 and not sup.out_of_service
    finally:
        sup.stop()
