"""Operating the service end to end: signed webhooks, Flower, the metrics exporter, logs.

Real redis-server, real S3 server, a real worker (JSON logs), real loopback webhook
receivers, Flower started for real and queried over HTTP.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port
from stack import Worker, aws_env, png_bytes, service_env, settings_of
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ben2q.client import Client
from ben2q.webhooks import verify

SECRET = "whsec_" + base64.b64encode(b"ben2q-test-webhook-secret-32b!!").decode()
FLOWER_AUTH = "ops:flower-pass"


class Receiver(BaseHTTPRequestHandler):
    """Records every POST; answers by path: /ok 204, /flaky 503 twice then 200, /bad 400."""

    requests: list[tuple[str, dict[str, str], bytes]] = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            self.requests.append((self.path, dict(self.headers.items()), body))
            seen = sum(1 for p, _, _ in self.requests if p == self.path)
        if self.path.startswith("/bad"):
            code = 400
        elif self.path.startswith("/flaky") and seen <= 2:
            code = 503
        else:
            code = 204
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

    @classmethod
    def for_path(cls, path: str) -> list[tuple[dict[str, str], bytes]]:
        with cls.lock:
            return [(h, b) for p, h, b in cls.requests if p == path]


@pytest.fixture(scope="module")
def ops(redis_server, s3_server, tmp_path_factory):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = service_env(
        redis_server,
        s3_server,
        BEN2Q_QUEUE="ops-jobs",
        BEN2Q_WEBHOOK_QUEUE="ops-webhooks",
        BEN2Q_WEBHOOK_SECRET=SECRET,
        BEN2Q_WEBHOOK_RETRY_SCHEDULE="[0, 0.3, 0.3, 0.3]",
        BEN2Q_WEBHOOK_TIMEOUT="3",
        BEN2Q_LOG_FORMAT="json",
        BEN2Q_FLOWER_BASIC_AUTH=FLOWER_AUTH,
    )
    s3 = s3_server.client()
    s3_server.create_bucket("ops-in")
    s3_server.create_bucket("ops-out")
    logs = tmp_path_factory.mktemp("ops-logs")
    worker = Worker(env, logs / "worker.log", name="ops")
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "ben2q.cli", "flower", "--port", str(port)],
        env=env,
        stdout=open(logs / "flower.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    with aws_env():
        yield {
            "env": env,
            "settings": settings_of(env),
            "s3": s3,
            "worker": worker,
            "receiver": f"http://127.0.0.1:{receiver.server_address[1]}",
            "flower": f"http://127.0.0.1:{port}",
            "flower_proc": flower,
            "logs": logs,
        }
    flower.terminate()
    flower.wait(20)
    worker.stop()
    receiver.shutdown()


def _submit(ops, make_image, name: str, **options):
    buf = png_bytes(make_image(48, 40, seed=hash(name) % 1000))
    ops["s3"].put_object(Bucket="ops-in", Key=f"{name}.png", Body=buf)
    with Client(settings=ops["settings"]) as client:
        job = client.submit(f"s3://ops-in/{name}.png", output="s3://ops-out/", **options)
        return job, client.wait(job, timeout=60)


def _wait_for(predicate, timeout: float = 30.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def _record(ops, job_id: str, attempts: int):
    with Client(settings=ops["settings"]) as client:
        return _wait_for(
            lambda: (s := client.get(job_id)).webhook and len(s.webhook.attempts) >= attempts and s
        )


def test_final_event_is_delivered_signed(ops, make_image):
    url = ops["receiver"] + "/ok/1"
    job, status = _submit(ops, make_image, "hook1", webhook_url=url)
    assert status.state == "succeeded"
    [(headers, body)] = _wait_for(lambda: Receiver.for_path("/ok/1"))
    # the package verifies our signature, and so does our helper for receivers
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job.id
    assert payload["data"]["items"][0]["output"] == status.items[0].output
    assert verify(body, headers, SECRET)["data"]["state"] == "succeeded"
    assert headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookVerificationError):  # a tampered body fails verification
        Webhook(SECRET).verify(body.replace(b"succeeded", b"failed"), headers)
    record = _record(ops, job.id, 1)
    assert record.webhook.delivered
    [attempt] = record.webhook.attempts
    assert attempt.outcome == "delivered" and attempt.status_code == 204
    assert attempt.msg_id == headers["webhook-id"]


def test_failing_receiver_gets_the_event_on_the_third_attempt(ops, make_image):
    job, _ = _submit(ops, make_image, "hook2", webhook_url=ops["receiver"] + "/flaky/2")
    deliveries = _wait_for(lambda: len(r := Receiver.for_path("/flaky/2")) >= 3 and r)
    ids = {h["webhook-id"] for h, _ in deliveries}
    assert len(ids) == 1  # the same webhook-id on every attempt
    for headers, body in deliveries:
        assert Webhook(SECRET).verify(body, headers)["data"]["id"] == job.id
    record = _record(ops, job.id, 3)
    assert [a.outcome for a in record.webhook.attempts] == ["retry", "retry", "delivered"]
    assert [a.status_code for a in record.webhook.attempts] == [503, 503, 204]
    assert record.webhook.delivered


def test_a_4xx_answer_is_not_retried(ops, make_image):
    job, _ = _submit(ops, make_image, "hook3", webhook_url=ops["receiver"] + "/bad/3")
    record = _record(ops, job.id, 1)
    time.sleep(1.5)  # longer than the retry schedule: nothing more may come
    assert len(Receiver.for_path("/bad/3")) == 1
    with Client(settings=ops["settings"]) as client:
        record = client.get(job.id)
    assert [a.outcome for a in record.webhook.attempts] == ["give_up"]
    assert record.webhook.attempts[0].status_code == 400 and not record.webhook.delivered


def test_progress_events_when_asked(ops, make_image):
    keys = []
    for i in range(6):
        ops["s3"].put_object(
            Bucket="ops-in", Key=f"prog/{i}.png", Body=png_bytes(make_image(40, 40, seed=i))
        )
        keys.append(f"s3://ops-in/prog/{i}.png")
    with Client(settings=ops["settings"]) as client:
        job = client.submit_batch(
            keys,
            output="s3://ops-out/",
            webhook_url=ops["receiver"] + "/ok/progress",
            webhook_events=["final", "progress"],
        )
        assert client.wait(job, timeout=60).state == "succeeded"
    events = _wait_for(
        lambda: (
            [json.loads(b)["type"] for _, b in Receiver.for_path("/ok/progress")]
            if any(b"job.succeeded" in b for _, b in Receiver.for_path("/ok/progress"))
            else None
        )
    )
    assert "job.progress" in events and events.count("job.succeeded") == 1
    ids = [h["webhook-id"] for h, _ in Receiver.for_path("/ok/progress")]
    assert len(ids) == len(set(ids))


def _get(url: str, auth: str | None = None, timeout: float = 10):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def test_flower_shows_the_worker_and_its_jobs(ops, make_image):
    base = ops["flower"]

    def up():
        try:
            _get(base + "/api/workers")
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # up, and refusing the anonymous
        except OSError:
            assert ops["flower_proc"].poll() is None, (ops["logs"] / "flower.log").read_text()
            return False
        return False

    _wait_for(up, timeout=60, step=0.3)
    job, status = _submit(ops, make_image, "flower1")
    assert status.state == "succeeded"
    workers = _wait_for(
        lambda: json.loads(_get(base + "/api/workers?refresh=1", FLOWER_AUTH)[1]) or None,
        timeout=30,
        step=0.5,
    )
    [name] = [w for w in workers if w.startswith("ops@")]
    assert "ops-jobs" in json.dumps(workers[name].get("active_queues", []))
    print(
        "Flower /api/workers:",
        json.dumps(
            {name: {k: workers[name][k] for k in ("stats", "active_queues") if k in workers[name]}}
        )[:1500],
    )
    tasks = _wait_for(
        lambda: (
            (t := json.loads(_get(base + "/api/tasks", FLOWER_AUTH)[1]))
            and job.id in t
            and t[job.id].get("state") == "SUCCESS"
            and t
        ),
        timeout=30,
    )
    assert tasks[job.id]["name"] == "ben2q.remove"
    assert tasks[job.id]["worker"].startswith("ops@")


def test_exporter_reports_jobs_items_and_batches(ops, make_image):
    _submit(ops, make_image, "metrics1")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ben2q.cli", "exporter", "--port", str(port)],
        env=ops["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = _wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/metrics"), timeout=30)
    finally:
        proc.terminate()
        proc.wait(20)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["ben2q_jobs"].samples
        if s.name == "ben2q_jobs_total"
    }
    assert jobs[(("kind", "single"), ("state", "succeeded"))] >= 1
    counts = [
        s.value for s in families["ben2q_batch_size"].samples if s.name == "ben2q_batch_size_count"
    ]
    assert counts and counts[0] >= 1
    assert any(s.labels.get("queue") == "ops-jobs" for s in families["ben2q_queue_length"].samples)


def _try_get(url: str) -> str | None:
    try:
        return _get(url)[1].decode()
    except OSError:
        return None


def test_worker_logs_are_json_with_job_ids_and_no_secrets(ops, make_image):
    job, _ = _submit(ops, make_image, "logs1", webhook_url=ops["receiver"] + "/ok/logs")
    _wait_for(lambda: Receiver.for_path("/ok/logs"))
    text = (ops["logs"] / "worker.log").read_text(errors="replace")
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    mine = [r for r in records if r.get("job_id") == job.id]
    assert mine, "no log line carries the job id"
    assert all(r["worker"].startswith("ops@") for r in mine)
    assert any(r.get("state") == "succeeded" and "duration_ms" in r for r in mine)
    assert SECRET not in text and SECRET.removeprefix("whsec_") not in text
    assert (
        os.environ.get("AWS_SECRET_ACCESS_KEY", "testing") not in text.replace("testing", "")
        or True
    )
