"""deploy/kubernetes, checked without a cluster.

- Both overlays render (``tests/kustomize.py``; the same objects as ``kubectl kustomize``
  where kubectl is installed) and every core object passes ``kubernetes-validate
  --strict`` for the oldest and newest Kubernetes versions we support.
- The KEDA ScaledObject passes the ``openAPIV3Schema`` of KEDA's own CRD (vendored in
  tests/fixtures/keda) and the rules KEDA's admission webhook adds.
- Policy: limits, non-root, read-only root, probes from ``ben2q health``, grace periods
  above the longest job, the scaler aimed at the worker Deployment and at the lists its
  workers consume, an API that is ready with its workers at zero.
- KEDA's count, on a real redis-server with real workers: the same per-key count KEDA's
  redis scaler makes (its Lua: LLEN for a list, HLEN for a hash...) over the rendered
  ScaledObject's keys, combined by its formula, equals the jobs not yet finished while a
  worker holds its prefetch, and falls to zero when they are, whatever webhook retries
  a webhook worker holds.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
import time
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from celery import Celery
from kustomize import render
from stack import ROOT, Worker, aws_env, png_bytes, service_env, settings_of

from ben2q.broker import (
    TASK_BATCH,
    TASK_CHUNK,
    TASK_REMOVE,
    TASK_WEBHOOK,
    celery_config,
    unacked_key,
)
from ben2q.client import Client
from ben2q.config import Settings
from ben2q.worker import (
    check_visibility_timeout,
    longest_job_seconds,
    prefetch,
    webhook_time_limits,
)

DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")
KEDA_CRD = ROOT / "tests" / "fixtures" / "keda" / "keda.sh_scaledobjects.yaml"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
SECRET = "ben2q-secrets"
DB = 10  # the session server is shared: this module keeps to its own database
INJECT = ROOT / "tests" / "inject"

# KEDA's redis scaler counts a key by its type (pkg/scalers/redis_scaler.go): the same
# rule, as a Lua script run by the server, so the count is taken the way KEDA takes it.
KEDA_COUNT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'list' or kind == 'none' then return redis.call('LLEN', KEYS[1]) end
if kind == 'hash' then return redis.call('HLEN', KEYS[1]) end
if kind == 'set' then return redis.call('SCARD', KEYS[1]) end
if kind == 'zset' then return redis.call('ZCARD', KEYS[1]) end
return redis.error_reply('ERR unsupported key type: ' .. kind)
"""


# --- reading the rendered objects -------------------------------------------------------


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def deployments(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "Deployment"]


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (only,) = pod(deployment)["containers"]
    return only


def container_env(objects: list[dict], c: dict) -> dict[str, str]:
    """A container's environment as the kubelet builds it: ``envFrom`` ConfigMaps, then
    ``env`` in order, ``$(VAR)`` expanded from what is defined before. A Secret's value is
    a stand-in naming its key."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), var["value"]
            )
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            value = find(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET, ref
            value = f"secret-{ref['key'].lower().replace('_', '-')}"
        env[var["name"]] = value
    return env


def settings_for(objects: list[dict], deployment: dict) -> Settings:
    env = container_env(objects, container(deployment))
    unresolved = [k for k, v in env.items() if "$(" in v]
    assert not unresolved, f"$(VAR) references to nothing defined before: {unresolved}"
    return settings_of(env)


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def without(args: list[str], name: str) -> list[str]:
    """``args`` without the option ``name`` and its value."""
    i = args.index(name)
    return args[:i] + args[i + 2 :]


def queues_of(deployment: dict) -> list[str]:
    args = container(deployment)["args"]
    assert args[0] == "worker"
    return option(args, "--queues").split(",")


def triggers(scaled: dict) -> dict[str, dict]:
    return {t["name"]: t["metadata"] for t in scaled["spec"]["triggers"]}


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request) -> list[dict]:
    return render(DEPLOY / request.param)


@pytest.fixture(scope="module")
def keda_schema() -> dict:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


# --- rendering and schemas ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    theirs = [doc for doc in yaml.safe_load_all(out) if doc]

    def key(o: dict) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(render(DEPLOY / overlay), key=key) == sorted(theirs, key=key)


def test_each_overlay_has_every_part(objects):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for name in ("ben2q-worker", "ben2q-webhooks", "ben2q-api", "ben2q-flower", "ben2q-exporter"):
        assert ("Deployment", name) in kinds
    for part in [
        ("Service", "ben2q-api"),
        ("HorizontalPodAutoscaler", "ben2q-api"),
        ("Service", "ben2q-flower"),
        ("Service", "ben2q-exporter"),
        ("PodDisruptionBudget", "ben2q-worker"),
        ("PodDisruptionBudget", "ben2q-api"),
        ("ScaledObject", "ben2q-worker"),
        ("Namespace", "ben2q"),
        ("PersistentVolumeClaim", "ben2q-models"),
        ("ConfigMap", "ben2q-config"),
    ]:
        assert part in kinds
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"ben2q"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_pass_kubernetes_validate_strict(objects, version):
    core = [o for o in objects if o["apiVersion"] != "keda.sh/v1alpha1"]
    assert len(core) == len(objects) - 1  # KEDA's ScaledObject is checked against its CRD
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)
    # the check is real: an unknown field fails it
    bad = copy.deepcopy(find(objects, "Deployment", "ben2q-worker"))
    container(bad)["resources"]["limit"] = {"cpu": "1"}
    with pytest.raises(kubernetes_validate.ValidationError, match="limit"):
        kubernetes_validate.validate(bad, version, strict=True)


def test_scaled_object_passes_kedas_crd_schema_and_webhook_rules(objects, keda_schema):
    scaled = find(objects, "ScaledObject", "ben2q-worker")
    jsonschema.Draft7Validator(keda_schema).validate(scaled)
    bad = copy.deepcopy(scaled)
    bad["spec"]["triggers"][0]["metadata"]["listLength"] = 8  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(keda_schema).validate(bad)
    # what KEDA's admission webhook adds: a formula over named triggers, a positive target
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    names = set(triggers(scaled))
    assert set(re.findall(r"[A-Za-z_]\w*", modifiers["formula"])) <= names
    assert float(modifiers["target"]) > 0
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


# --- policy ----------------------------------------------------------------------------------


def test_every_container_has_requests_and_limits(objects):
    for d in deployments(objects):
        resources = container(d)["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), d["metadata"]["name"]


def test_every_pod_runs_as_non_root_on_a_read_only_root(objects):
    for d in deployments(objects):
        spec, c = pod(d), container(d)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        # what must be written has a volume: /tmp (HOME, the probe files)
        env = container_env(objects, c)
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        assert env["HOME"] in mounts and "/tmp" in mounts
        assert env["BEN2Q_HEALTH_DIR"].startswith("/tmp/")


def test_probes_come_from_ben2q_health(objects):
    for d in deployments(objects):
        c = container(d)
        assert "livenessProbe" in c and "readinessProbe" in c, d["metadata"]["name"]
        if c["args"][0] != "worker":
            continue
        assert c["livenessProbe"]["exec"]["command"] == ["ben2q", "health", "--worker"]
        ready = ["ben2q", "health", "--worker", "--ready"]
        assert c["readinessProbe"]["exec"]["command"] == ready
        assert c["startupProbe"]["exec"]["command"] == ready
        settings = settings_for(objects, d)
        startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        if "--pool" not in c["args"]:  # a model to load: the startup budget covers it
            assert startup > settings.model_load_timeout
        # liveness fails only after a heartbeat is older than `ben2q health` allows
        live = c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"]
        assert live >= settings.heartbeat_max_age


def test_grace_periods_outlast_the_longest_job(objects):
    worker = find(objects, "Deployment", "ben2q-worker")
    settings = settings_for(objects, worker)
    check_visibility_timeout(settings)  # the worker would refuse to start otherwise
    assert pod(worker)["terminationGracePeriodSeconds"] > longest_job_seconds(settings)
    hooks = find(objects, "Deployment", "ben2q-webhooks")
    hard = webhook_time_limits(settings_for(objects, hooks))[1]
    assert pod(hooks)["terminationGracePeriodSeconds"] > hard
    # every process that sends jobs sets the same per-image limits as the workers
    api = settings_for(objects, find(objects, "Deployment", "ben2q-api"))
    assert api.job_time_limit == settings.job_time_limit


def test_the_gpu_overlay_gives_each_worker_one_gpu(objects):
    worker = find(objects, "Deployment", "ben2q-worker")
    c = container(worker)
    limits = c["resources"]["limits"]
    if c["image"].endswith(":gpu"):
        assert limits["nvidia.com/gpu"] == 1 and option(c["args"], "--gpu") == "0"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod(worker)["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits and "--gpu" not in c["args"]
        assert container_env(objects, c)["BEN2Q_DEVICE"] == "cpu"
    for d in deployments(objects):  # nothing else asks for a GPU
        if d is not worker:
            assert "nvidia.com/gpu" not in container(d)["resources"]["limits"]
            assert container(d)["image"].endswith(":cpu")


def test_the_scaler_counts_what_the_workers_consume(objects):
    scaled = find(objects, "ScaledObject", "ben2q-worker")
    worker = find(objects, "Deployment", "ben2q-worker")
    settings = settings_for(objects, worker)
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in worker["spec"]  # KEDA owns the count; apply must not reset it
    assert scaled["spec"]["minReplicaCount"] == 0
    queues = queues_of(worker)
    held = unacked_key(settings, queues)
    lists = {m["listName"] for m in triggers(scaled).values()}
    assert lists == {*queues, held}
    # the producers' routes lead to those lists
    routes = celery_config(settings)["task_routes"]
    assert {routes[t]["queue"] for t in (TASK_REMOVE, TASK_BATCH, TASK_CHUNK)} <= set(queues)
    # webhook workers keep what they hold elsewhere
    hooks = find(objects, "Deployment", "ben2q-webhooks")
    assert unacked_key(settings_for(objects, hooks), queues_of(hooks)) not in lists
    # the scaler reads the broker the workers use
    env = container_env(objects, container(worker))
    broker = urlsplit(settings.broker_url)
    for meta in triggers(scaled).values():
        assert meta["addressFromEnv"] in env and meta["passwordFromEnv"] in env
        assert env[meta["addressFromEnv"]] == f"{broker.hostname}:{broker.port}"
        assert env[meta["passwordFromEnv"]] == broker.password
        assert meta["databaseIndex"] == broker.path.lstrip("/")
    # one worker's worth of messages per worker: its prefetch
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert float(modifiers["target"]) == prefetch(settings)
    assert modifiers["metricType"] == "AverageValue" and modifiers["activationTarget"] == "0"
    terms = [t.strip() for t in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(triggers(scaled))  # a plain sum of every trigger


def test_the_api_is_ready_with_no_worker_and_scaled_on_cpu(objects):
    api = find(objects, "Deployment", "ben2q-api")
    c = container(api)
    # a readiness that waited for a worker would never see one: jobs bring them up
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert settings_for(objects, api).api_ready_min_workers == 0
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    hpa = find(objects, "HorizontalPodAutoscaler", "ben2q-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ben2q-api"
    assert "replicas" not in api["spec"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = find(objects, "Service", "ben2q-api")
    assert service["spec"]["selector"].items() <= labels.items()
    port = service["spec"]["ports"][0]["targetPort"]
    assert port in [p["name"] for p in c["ports"]]


def test_disruption_budgets_and_services_select_pods(objects):
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in deployments(objects)]
    for o in objects:
        if o["kind"] == "PodDisruptionBudget":
            selector = o["spec"]["selector"]["matchLabels"]
        elif o["kind"] == "Service":
            selector = o["spec"]["selector"]
        else:
            continue
        assert sum(selector.items() <= t.items() for t in templates) == 1, o["metadata"]


def test_the_model_cache_is_a_shared_volume(objects):
    worker = find(objects, "Deployment", "ben2q-worker")
    c = container(worker)
    hf_home = container_env(objects, c)["HF_HOME"]
    (mount,) = [m for m in c["volumeMounts"] if hf_home.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod(worker)["volumes"] if v["name"] == mount["name"]]
    claim = find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_every_secret_key_is_in_the_readme(objects):
    """The README's `kubectl create secret` must create every key a pod reads."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes") :]
    keys = {
        var["valueFrom"]["secretKeyRef"]["key"]
        for d in deployments(objects)
        for var in container(d).get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert keys
    for key in keys:
        assert f"--from-literal={key}=" in section, key


# --- KEDA's count on a real Redis -------------------------------------------------------------


def keda_value(raw: redis.Redis, scaled: dict) -> tuple[float, dict[str, int]]:
    """The scaler's composite metric: each trigger's key counted as KEDA counts it, then
    combined by the formula (a sum: checked above)."""
    counts = {
        name: int(raw.eval(KEDA_COUNT, 1, meta["listName"]))
        for name, meta in triggers(scaled).items()
    }
    return float(sum(counts.values())), counts


def wait_for(check, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_keda_counts_every_unfinished_job_and_only_those(redis_server, s3_server, tmp_path):
    objects = render(DEPLOY / "gpu")
    scaled = find(objects, "ScaledObject", "ben2q-worker")
    worker_d = find(objects, "Deployment", "ben2q-worker")
    hooks_d = find(objects, "Deployment", "ben2q-webhooks")
    deployed = container_env(objects, container(worker_d))
    target = float(scaled["spec"]["advanced"]["scalingModifiers"]["target"])

    db_url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    policy = {
        k: deployed[k]
        for k in (
            "BEN2Q_MAX_BATCH",
            "BEN2Q_BATCH_CHUNK",
            "BEN2Q_JOB_TIME_LIMIT",
            "BEN2Q_JOB_SOFT_TIME_LIMIT",
            "BEN2Q_VISIBILITY_TIMEOUT",
        )
    }
    env = service_env(
        redis_server,
        s3_server,
        BEN2Q_BROKER_URL=db_url,
        BEN2Q_WEBHOOK_SECRET="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        BEN2Q_TEST_FAULT="slow_forward:1",  # 1 s per image: a busy worker holds its prefetch
        PYTHONPATH=os.pathsep.join([str(INJECT), str(ROOT / "src")]),
        OMP_NUM_THREADS="1",
        **policy,
    )
    settings = settings_of(env)
    raw = redis.Redis.from_url(db_url)
    raw.flushdb()
    s3_server.create_bucket("keda-in")
    s3_server.create_bucket("keda-out")
    s3_server.client().put_object(Bucket="keda-in", Key="a.png", Body=png_bytes(_photo()))

    n = 12  # a worker's prefetch (8) and 4 more
    with aws_env(), Client(settings=settings) as client:
        jobs = [client.submit("s3://keda-in/a.png", output=f"s3://keda-out/{i}/") for i in range(n)]
        value, counts = keda_value(raw, scaled)
        assert value == n and counts[next(iter(triggers(scaled)))] == n  # all waiting

        # a webhook worker holding a delivery that is not due yet
        app = Celery(set_as_current=False)
        app.conf.update(celery_config(settings))
        app.send_task(
            TASK_WEBHOOK,
            queue=settings.webhook_queue,
            kwargs={
                "job_id": "none",
                "url": "http://127.0.0.1:9/",
                "body": "{}",
                "msg_id": "msg_1",
                "event": "job.succeeded",
                "not_before": time.time() + 600,
            },
        )
        # both workers as the manifests run them, started together
        queues = ",".join(queues_of(worker_d))
        workers = [
            Worker(env, tmp_path / "worker.log", name="gpu", wait=False, args=["--queues", queues]),
            Worker(
                env,
                tmp_path / "hooks.log",
                name="hooks",
                model=False,
                wait=False,
                args=without(container(hooks_d)["args"][1:], "--hostname"),
            ),
        ]
        try:
            for w in workers:
                w.wait_ready()
            hooks_key = unacked_key(settings, queues_of(hooks_d))
            per_worker = prefetch(settings)
            wait_for(
                lambda: (
                    raw.hlen(hooks_key) == 1
                    and raw.llen(settings.webhook_queue) == 0
                    and raw.hlen("unacked") == per_worker
                ),
                what="the webhook worker to hold the delivery, the image worker its prefetch",
            )
            # between two hand-overs (a pass: 4 images, 4 s) nothing moves:
            # read the count, the jobs, then the count again
            value, counts = keda_value(raw, scaled)
            unfinished = sum(not client.get(job, items=False).done for job in jobs)
            assert keda_value(raw, scaled) == (value, counts), "read during a hand-over"
            # what the image worker holds is counted, the webhook worker's delivery is not;
            # LLEN alone would say less than what is left
            assert counts["held"] == per_worker and value == unfinished > counts["jobs"]
            assert math.ceil(value / target) == math.ceil(unfinished / per_worker)

            for job in jobs:
                assert client.wait(job, timeout=120).state == "succeeded"
            wait_for(
                lambda: keda_value(raw, scaled)[0] == 0,
                timeout=10,
                what="the count to fall to zero",
            )
            # nothing left for the image workers: KEDA may scale them to zero, while the
            # webhook worker still holds its delivery under its own key
            assert raw.hlen(hooks_key) == 1
        finally:
            for w in workers:
                w.stop()


def _photo():
    from PIL import Image

    return Image.new("RGB", (40, 30), (200, 120, 40))
