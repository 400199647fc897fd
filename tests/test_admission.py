"""The worker re-checks every delivered request (the broker is a trust boundary).

Unit tests drive ``ben2q.admission.check_request`` with requests no client would build;
the end-to-end tests send raw task messages (as a hostile producer with broker access
would) to a real worker over a real redis-server and SeaweedFS, and check what it
records, what it leaves alone, and that it stays responsive.
"""

from __future__ import annotations

import time

import pytest
from celery import Celery
from stack import Worker, aws_env, png_bytes, service_env, settings_of

from ben2q.admission import check_request
from ben2q.broker import TASK_BATCH, TASK_REMOVE, celery_config
from ben2q.client import Client
from ben2q.config import Settings
from ben2q.errors import InvalidRequest
from ben2q.jobs import JobRequest, JobStatus, make_request, new_job_id
from ben2q.keys import ApiKey, KeyStore, ScopeError
from ben2q.status import StatusStore

DB = 13  # the session server is shared: this module keeps to its own database


def forged(**fields: object) -> JobRequest:
    """A request as a raw message carries it: built without ``make_request``'s checks."""
    base: dict[str, object] = {
        "id": new_job_id(),
        "kind": "batch",
        "inputs": ["s3://adm-in/a.png"],
        "output": "s3://adm-out/",
        "submitted_at": time.time(),
    }
    return JobRequest.model_validate({**base, **fields})


def key(**fields: object) -> ApiKey:
    base: dict[str, object] = {
        "id": "0123456789abcdef",
        "name": "tenant-a",
        "hash": "0" * 64,
        "input_prefixes": ["s3://adm-in/tenant-a/"],
        "allow_urls": False,
        "output_prefix": "s3://adm-out/tenant-a/",
        "created_at": 0.0,
    }
    return ApiKey.model_validate({**base, **fields})


SETTINGS = Settings(max_batch_items=10, api_upload_location="s3://uploads/")


def test_a_request_the_client_would_build_passes():
    request = make_request("batch", ["s3://adm-in/a.png", "s3://adm-in/b.png"], "s3://out/")
    assert check_request(request, SETTINGS, expected_kind="batch") is request


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"inputs": [f"s3://adm-in/{i}.png" for i in range(11)]}, "inputs", "at most 10"),
        ({"inputs": ["s3://adm-in/ok.png", "gopher://x/y"]}, "inputs[1]", "scheme"),
        ({"inputs": ["s3://adm-in/../../etc/passwd"]}, "inputs[0]", "'..'"),
        ({"inputs": ["file:///etc/passwd"]}, "inputs[0]", "local root"),
        ({"output": "file:///tmp/anywhere/"}, "output", "local root"),
        ({"output": "s3://adm-out/../x/"}, "output", "'..'"),
        ({"inputs": []}, "inputs", "at least one"),
        ({"webhook_url": "ftp://example.com/hook"}, "webhook_url", "http"),
        (
            {"options": {"background": "file:///etc/shadow"}},
            "background",
            "local root",
        ),
    ],
)
def test_requests_no_client_would_build_are_refused_naming_the_field(fields, field, message):
    with pytest.raises(InvalidRequest) as err:
        check_request(forged(**fields), SETTINGS, expected_kind="batch")
    assert err.value.field == field and message in err.value.message


def test_a_job_sent_to_the_other_task_is_refused():
    with pytest.raises(InvalidRequest) as err:
        check_request(forged(kind="batch"), SETTINGS, expected_kind="single")
    assert err.value.field == "kind"
    two = forged(kind="single", inputs=["s3://adm-in/a.png", "s3://adm-in/b.png"])
    with pytest.raises(InvalidRequest, match="exactly one input"):
        check_request(two, SETTINGS, expected_kind="single")


def test_a_tenant_job_stays_inside_its_key_scope():
    k = key()
    ok = forged(
        tenant=k.id,
        inputs=["s3://adm-in/tenant-a/x.png", f"s3://uploads/{k.id}/job/0000-y.png"],
        output="s3://adm-out/tenant-a/run/",
    )
    assert check_request(ok, SETTINGS, key=k) is ok
    cases = [
        ({"inputs": ["s3://adm-in/tenant-b/x.png"]}, "inputs[0]"),  # another tenant's data
        ({"inputs": ["s3://uploads/fedcba9876543210/j/0-x.png"]}, "inputs[0]"),  # their upload
        ({"inputs": ["https://example.com/x.png"]}, "inputs[0]"),  # URLs not allowed
        ({"output": "s3://adm-out/tenant-b/"}, "output"),
        ({"options": {"background": "s3://adm-in/tenant-b/bg.png"}}, "background"),
    ]
    base = {
        "tenant": k.id,
        "inputs": ["s3://adm-in/tenant-a/x.png"],
        "output": "s3://adm-out/tenant-a/",
    }
    for fields, field in cases:
        with pytest.raises(ScopeError) as err:
            check_request(forged(**{**base, **fields}), SETTINGS, key=k)
        assert err.value.field == field, fields
    with pytest.raises(ScopeError, match="no API key"):  # a tenant that does not exist
        check_request(forged(tenant=k.id), SETTINGS, key=None)
    small = key(max_batch=2)  # the key's own batch limit holds too
    three = forged(**{**base, "inputs": [f"s3://adm-in/tenant-a/{i}.png" for i in range(3)]})
    with pytest.raises(InvalidRequest, match="at most 2"):
        check_request(three, SETTINGS, key=small)


# --- raw messages to a real worker ---------------------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_server, s3_server, tmp_path_factory):
    db_url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    env = service_env(
        redis_server,
        s3_server,
        BEN2Q_BROKER_URL=db_url,
        BEN2Q_API_OUTPUT_LOCATION="s3://adm-out/api/",
        BEN2Q_API_UPLOAD_LOCATION="s3://adm-out/uploads/",
        BEN2Q_MAX_BATCH_ITEMS="1000",  # the forgery below: five times this
    )
    for bucket in ("adm-in", "adm-out"):
        s3_server.create_bucket(bucket)
    settings = settings_of(env)
    store = StatusStore(settings.status_url, ttl=3600)
    store.redis.flushdb()
    worker = Worker(env, tmp_path_factory.mktemp("logs") / "worker.log")
    app = Celery("forger", set_as_current=False)
    app.conf.update(celery_config(settings))
    with aws_env():
        yield {
            "settings": settings,
            "store": store,
            "s3": s3_server.client(),
            "app": app,
            "worker": worker,
        }
    app.close()
    worker.stop()
    store.close()


def send(stack, task: str, request: dict, **options: object) -> str:
    stack["app"].send_task(
        task,
        kwargs={"request": request},
        task_id=request["id"],
        queue=stack["settings"].queue,
        ignore_result=True,
        **options,
    )
    return str(request["id"])


def wait_record(store: StatusStore, job_id: str, timeout: float = 60) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.get(job_id)
        if status is not None and status.done:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} has no final record after {timeout} s")


def raw_request(**fields: object) -> dict:
    return forged(**fields).model_dump(mode="json")


def test_an_over_limit_raw_batch_is_refused_and_a_good_job_runs_promptly(stack, make_image):
    limit = stack["settings"].max_batch_items
    big = raw_request(inputs=[f"s3://adm-in/many/{i}.png" for i in range(5 * limit)])
    t0 = time.monotonic()
    job_id = send(stack, TASK_BATCH, big, time_limit=10**6, soft_time_limit=10**6)
    stack["s3"].put_object(Bucket="adm-in", Key="good.png", Body=png_bytes(make_image(64, 48)))
    with Client(settings=stack["settings"]) as client:
        good = client.submit("s3://adm-in/good.png", output="s3://adm-out/good/")
        status = client.wait(good, timeout=60)
    assert status.state == "succeeded"
    assert time.monotonic() - t0 < 30  # the forgery cost the worker nothing
    refused = wait_record(stack["store"], job_id)
    assert refused.state == "failed" and refused.error is not None
    assert refused.error.code == "invalid_request"
    assert f"{5 * limit} inputs; at most {limit}" in refused.error.message
    assert refused.items == []  # the forgery's inputs are not copied into the record


def test_raw_messages_that_break_the_rules_fail_their_job_with_the_field(stack):
    cases = {
        send(stack, TASK_BATCH, raw_request(output="file:///tmp/escape/")): "output",
        send(stack, TASK_BATCH, raw_request(inputs=["file:///etc/passwd"])): "inputs[0]",
        send(stack, TASK_REMOVE, raw_request(kind="batch")): "kind",
        send(
            stack, TASK_REMOVE, raw_request(kind="single", inputs=["s3://a/1.png", "s3://a/2.png"])
        ): "input",
    }
    for job_id, field in cases.items():
        status = wait_record(stack["store"], job_id)
        assert status.state == "failed" and status.error.code == "invalid_request"
        assert status.error.message.startswith(f"{field}: "), status.error.message
        assert all(item.state == "failed" for item in status.items)


def test_a_forged_tenant_job_stays_in_scope_and_cannot_touch_another_record(stack):
    store: StatusStore = stack["store"]
    keys = KeyStore.on(store.redis)
    victim, _ = keys.create("victim", input_prefixes=["s3://adm-in/victim/"])
    attacker, _ = keys.create("attacker", input_prefixes=["s3://adm-in/attacker/"])
    own_out = f"s3://adm-out/api/{attacker.id}/"
    # the attacker's key, reading the victim's inputs: refused, recorded as forbidden
    reach = send(
        stack,
        TASK_BATCH,
        raw_request(tenant=attacker.id, inputs=["s3://adm-in/victim/secret.png"], output=own_out),
    )
    status = wait_record(store, reach)
    assert status.error.code == "forbidden" and status.error.message.startswith("inputs[0]")
    # ... writing into the victim's output prefix
    write = send(
        stack,
        TASK_BATCH,
        raw_request(
            tenant=attacker.id,
            inputs=["s3://adm-in/attacker/x.png"],
            output=f"s3://adm-out/api/{victim.id}/",
        ),
    )
    assert wait_record(store, write).error.message.startswith("output")
    # a tenant that does not exist
    ghost = send(stack, TASK_BATCH, raw_request(tenant="f" * 16, output=own_out))
    assert "no API key" in wait_record(store, ghost).error.message
    # a forged message reusing the id of the victim's queued job leaves its record alone
    victim_job = make_request(
        "batch",
        ["s3://adm-in/victim/a.png"],
        f"s3://adm-out/api/{victim.id}/",
        tenant=victim.id,
    )
    store.create(JobStatus.queued(victim_job))
    send(
        stack,
        TASK_BATCH,
        raw_request(
            id=victim_job.id,
            tenant=attacker.id,
            inputs=["s3://adm-in/victim/a.png"],
            output=own_out,
        ),
    )
    marker = send(stack, TASK_BATCH, raw_request(inputs=["gopher://x/y"]))
    wait_record(store, marker)  # the forgery before it has been handled by now
    kept = store.get(victim_job.id)
    assert kept is not None and kept.state == "queued" and kept.tenant == victim.id
    assert kept.error is None
