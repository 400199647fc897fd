"""The Docker files: docker/compose.yaml, docker/Dockerfile, .dockerignore.

No Docker engine is needed. The compose file is checked as YAML (and by `docker compose
config` where a Compose v2 client is installed), the Dockerfile as text, and the commands
the images run are run here, through the same `ben2q` CLI and, for the workers, Celery's
own option parser; the image's health check pings a real worker started like the compose
`webhooks` service.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from ben2q.cli import build_parser
from ben2q.config import Settings
from ben2q.model import hub_weights_path

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

GPU_WORKERS = {"worker-gpu0", "worker-gpu1"}
WORKERS = GPU_WORKERS | {"webhooks", "worker-cpu"}
BEN2Q_SERVICES = WORKERS | {"flower", "exporter", "api"}
EXPECTED_SERVICES = BEN2Q_SERVICES | {"redis", "minio", "minio-init"}
BUCKETS = ("ben2q-inputs", "ben2q-outputs", "ben2q-uploads")
REQUIRED_ENV = {
    "MINIO_ROOT_PASSWORD": "minio-test-password",
    "BEN2Q_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "BEN2Q_FLOWER_BASIC_AUTH": "admin:test-password",
}


# --- parsing ------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def index(self, predicate) -> int:
        hits = [i for i, ins in enumerate(self.instructions) if predicate(*ins)]
        assert hits, f"stage {self.name}: no matching instruction"
        return hits[0]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a line continuation"
    return out


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: FROM {args}"
            current = Stage(words[2], words[0])
            assert current.name not in stages, f"stage {current.name} defined twice"
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            current.instructions.append((keyword, args))
    return global_args, stages


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` in an argv."""
    for i, arg in enumerate(command):
        if arg == flag:
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def stages(dockerfile) -> dict[str, Stage]:
    return dockerfile[1]


# --- compose ------------------------------------------------------------------------------


def test_compose_names_exactly_the_expected_services(services, compose):
    assert set(services) == EXPECTED_SERVICES
    assert set(compose["volumes"]) == {"redis-data", "minio-data", "hf-cache"}
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert all("profiles" not in s for name, s in services.items() if name != "worker-cpu")


def test_ben2q_services_use_images_built_from_the_dockerfile(services, stages):
    for name in BEN2Q_SERVICES:
        service = services[name]
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name
        target = build["target"]
        assert target in stages, f"{name}: no stage {target!r} in the Dockerfile"
        assert target == ("gpu" if name in GPU_WORKERS else "cpu"), name
        assert service["image"].endswith(f":{target}"), name
        assert service["command"][0] in {"worker", "flower", "exporter", "api"}, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["restart"] == "unless-stopped", name


def test_gpu_workers_each_reserve_their_own_device_and_are_named_after_it(services):
    seen = set()
    for name in sorted(GPU_WORKERS):
        service = services[name]
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        [device_id] = device["device_ids"]
        assert isinstance(device_id, str) and device_id.isdigit(), name
        seen.add(device_id)
        assert name == f"worker-gpu{device_id}"
        command = service["command"]
        # The container sees only its reserved GPU, always as device 0.
        assert flag_value(command, "--gpu") == "0", name
        assert flag_value(command, "--hostname") == f"gpu{device_id}@%h", name
        assert service["stop_grace_period"] == "5m", name
        assert service["volumes"] == ["hf-cache:/models/hf"], name
        assert service["depends_on"]["minio-init"]["condition"] == (
            "service_completed_successfully"
        )
    assert len(seen) == len(GPU_WORKERS), "two GPU workers reserve the same device"


def test_workers_consume_their_queues_and_are_health_checked_for_readiness(services, stages):
    settings = Settings()
    [image_check] = stages["cpu"].all("HEALTHCHECK")
    for name in WORKERS:
        command = services[name]["command"]
        hostname = flag_value(command, "--hostname")
        assert hostname and hostname.endswith("@%h"), name
        check = services[name]["healthcheck"]
        assert check["test"] == ["CMD", "ben2q", "health", "--worker", "--ready"], name
        assert json.loads(image_check.split(" CMD ", 1)[1]) == check["test"][1:]
        assert check["start_period"] == "10m" and check["retries"] == 3, name
        queues = flag_value(command, "--queues")
        if name == "webhooks":
            assert queues == settings.webhook_queue
            assert flag_value(command, "--pool") == "threads"
            assert flag_value(command, "--concurrency") == "16"
        else:  # model workers leave webhook deliveries to the webhooks service
            assert queues == f"{settings.queue},{settings.batch_queue}", name
    assert services["worker-cpu"]["environment"]["BEN2Q_DEVICE"] == "cpu"


def test_the_webhooks_service_gets_no_storage_credentials(compose, services):
    """Least privilege: delivering webhooks needs the broker and the signing secret only."""
    env = services["webhooks"]["environment"]
    assert set(env) == {"BEN2Q_BROKER_URL", "BEN2Q_WEBHOOK_SECRET"}
    assert env["BEN2Q_WEBHOOK_SECRET"] == compose["x-ben2q-env"]["BEN2Q_WEBHOOK_SECRET"]
    for name in GPU_WORKERS | {"worker-cpu"}:  # model workers do read and write storage
        assert "AWS_SECRET_ACCESS_KEY" in services[name]["environment"], name


def test_redis_is_append_only_and_health_checked(services):
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    command = redis["command"].split()
    assert command[0] == "redis-server"
    assert flag_value(command, "--appendonly") == "yes"
    assert flag_value(command, "--appendfsync") == "everysec"
    assert redis["volumes"] == ["redis-data:/data"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_minio_init_creates_both_buckets_once(services):
    minio, init = services["minio"], services["minio-init"]
    assert minio["command"].split()[:2] == ["server", "/data"]
    assert "--console-address" in minio["command"]
    assert minio["volumes"] == ["minio-data:/data"]
    assert minio["healthcheck"]["test"]
    assert set(minio["environment"]) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    assert init["restart"] == "no"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = "\n".join(init["command"])
    assert "mc alias set ben2q http://minio:9000" in script
    for bucket in BUCKETS:
        assert f"mc mb --ignore-existing ben2q/{bucket}" in script


def test_every_variable_is_defaulted_or_required_with_a_message(compose_text):
    references = re.findall(r"(?<!\$)\$\{([^}]*)\}", compose_text)
    assert references
    for ref in references:
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*(:?-.*|:?\?\s*\S.*)", ref), f"${{{ref}}}"
    # No bare $VAR: Compose would substitute it silently ($$ escapes a shell's $).
    assert not re.findall(r"(?<!\$)\$(?=[A-Za-z_])", compose_text)
    required = {ref.split(":?")[0] for ref in references if ":?" in ref}
    assert required == set(REQUIRED_ENV)


def test_the_env_anchor_points_at_the_compose_services(compose, services, stages):
    env = compose["x-ben2q-env"]
    broker = urlsplit(env["BEN2Q_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname in services and broker.port == 6379
    assert broker.hostname == "redis"
    s3 = urlsplit(env["BEN2Q_S3_ENDPOINT_URL"])
    assert s3.hostname == "minio" and s3.port == 9000
    assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["BEN2Q_WEBHOOK_SECRET"].startswith("${BEN2Q_WEBHOOK_SECRET:?")
    hf_home = env["HF_HOME"]
    for target in ("cpu", "gpu"):
        assert f"HF_HOME={hf_home}" in " ".join(stages[target].all("ENV"))
    for name in BEN2Q_SERVICES:
        service_env = services[name]["environment"]
        assert service_env["BEN2Q_BROKER_URL"] == env["BEN2Q_BROKER_URL"], name
        if name in WORKERS - {"webhooks"}:  # the webhooks service: see the next test
            assert {k: service_env[k] for k in env} == env, name
    assert services["flower"]["environment"]["BEN2Q_FLOWER_BASIC_AUTH"].startswith(
        "${BEN2Q_FLOWER_BASIC_AUTH:?"
    )


def _compose_client() -> list[str] | None:
    """``docker compose`` or a standalone ``docker-compose``, if it is Compose v2."""
    candidates = []
    if shutil.which("docker"):
        candidates.append([shutil.which("docker"), "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        major = out.stdout.strip().lstrip("v").split(".")[0]
        if out.returncode == 0 and major.isdigit() and int(major) >= 2:
            return cmd
    return None


def _compose_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BEN2Q_", "MINIO_", "MC_", "COMPOSE_", "AWS_", "DOCKER_"))
    }
    return {**env, **extra}


def test_docker_compose_config_accepts_the_file():
    client = _compose_client()
    if client is None:
        pytest.skip("no Compose v2 client here (`docker compose` plugin or docker-compose v2)")
    base = [*client, "-f", str(COMPOSE)]
    done = subprocess.run(
        [*base, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_compose_env(**REQUIRED_ENV),
    )
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert set(config["services"]) == EXPECTED_SERVICES - {"worker-cpu"}
    for name in BEN2Q_SERVICES - {"worker-cpu"}:
        assert Path(config["services"][name]["build"]["context"]) == ROOT
    worker = config["services"]["worker-gpu1"]
    assert worker["environment"]["BEN2Q_WEBHOOK_SECRET"] == REQUIRED_ENV["BEN2Q_WEBHOOK_SECRET"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]

    listed = subprocess.run(
        [*base, "--profile", "cpu", "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_compose_env(**REQUIRED_ENV),
    )
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == EXPECTED_SERVICES

    for missing, message in [
        ("BEN2Q_WEBHOOK_SECRET", "set a whsec_ secret"),
        ("BEN2Q_FLOWER_BASIC_AUTH", "set user:password"),
        ("MINIO_ROOT_PASSWORD", "set MINIO_ROOT_PASSWORD"),
    ]:
        env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
        refused = subprocess.run(
            [*base, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_compose_env(**env),
        )
        assert refused.returncode != 0, missing
        assert missing in refused.stderr and message in refused.stderr


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_stages_and_targets(dockerfile):
    global_args, stages = dockerfile
    assert {"cpu", "gpu", "requirements", "wheel", "weights-0", "weights-1", "weights"} <= set(
        stages
    )
    assert stages["cpu"].base == "${PYTHON_IMAGE}"
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert stages["gpu"].base == "${CUDA_IMAGE}"
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-base-ubuntu24\.04", global_args["CUDA_IMAGE"])
    assert global_args["TORCH_CUDA"] == "cu130"  # torch 2.13: cu126, cu130, cu132
    # The weights stage is chosen by the build arg: 0 (default) or 1.
    assert stages["weights"].base == "weights-${BEN2Q_PREFETCH_WEIGHTS}"
    assert global_args["BEN2Q_PREFETCH_WEIGHTS"] == "0"
    for stage in stages.values():
        for args in stage.all("COPY"):
            source = re.search(r"--from=(\S+)", args)
            if source:
                assert source.group(1) in stages, f"{stage.name}: COPY from {source.group(1)}"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_final_stages_run_ben2q_as_a_non_root_user_with_a_health_check(stages, target):
    stage = stages[target]
    users = stage.all("USER")
    assert users, f"{target}: no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1] == "10001:10001"
    assert stage.all("WORKDIR")[-1] == "/app"
    env = " ".join(stage.all("ENV"))
    assert "HF_HOME=/models/hf" in env and "BEN2Q_PRECISION=auto" in env
    assert json.loads(stage.all("ENTRYPOINT")[-1]) == ["ben2q"]
    assert json.loads(stage.all("CMD")[-1]) == ["worker"]
    [healthcheck] = stage.all("HEALTHCHECK")
    assert healthcheck == stages["cpu"].all("HEALTHCHECK")[0]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command == ["ben2q", "health", "--worker", "--ready"]
    assert "--start-period=10m" in healthcheck.split(" CMD ", 1)[0]
    # The weights stage keeps the cache owned by the user.
    assert any("--from=weights --chown=10001:10001" in c for c in stage.all("COPY"))


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_torch_then_dependencies_then_the_package(stages, target):
    stage = stages[target]
    runs = stage.instructions

    def run_with(text):
        return lambda kw, args: kw == "RUN" and text in args

    torch = stage.index(run_with('pip install --no-cache-dir "torch==${TORCH_VERSION}"'))
    deps = stage.index(run_with("-r /tmp/requirements.txt -c /tmp/constraints.txt"))
    package = stage.index(run_with("--no-deps /tmp/dist/*.whl"))
    source = stage.index(lambda kw, args: kw == "COPY" and "--from=wheel" in args)
    weights = stage.index(lambda kw, args: kw == "COPY" and "--from=weights" in args)
    assert weights < torch < deps < source < package
    index = {"cpu": "https://download.pytorch.org/whl/cpu"}.get(
        target, "https://download.pytorch.org/whl/${TORCH_CUDA}"
    )
    assert f"--index-url {index}" in runs[torch][1].replace('"', "")
    assert "pip check" in runs[package][1]


def test_every_pip_install_skips_the_cache(stages):
    for stage in stages.values():
        for args in stage.all("RUN"):
            for command in re.findall(r"pip (?:install|wheel)[^&]*", args):
                assert "--no-cache-dir" in command, f"{stage.name}: {command}"


def test_torch_version_is_the_one_setup_installs(dockerfile):
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    [version] = set(re.findall(r'"torch==([\w.]+)"', setup))
    assert dockerfile[0]["TORCH_VERSION"] == version


def test_prefetch_downloads_the_checkpoint_ben2q_looks_for(dockerfile, stages):
    global_args = dockerfile[0]
    defaults = inspect.signature(hub_weights_path).parameters
    assert global_args["HF_REPO_ID"] == defaults["repo_id"].default == Settings().hf_repo_id
    assert global_args["HF_FILENAME"] == defaults["filename"].default == Settings().hf_filename
    [download] = stages["weights-1"].all("RUN")
    assert "hf_hub_download(sys.argv[1], sys.argv[2])" in download
    assert '"${HF_REPO_ID}" "${HF_FILENAME}"' in download
    assert "HF_HOME=/models/hf" in " ".join(stages["weights-1"].all("ENV"))


def test_no_secrets_in_the_dockerfile(dockerfile, stages):
    secret = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|BASIC_AUTH", re.I)
    names = list(dockerfile[0])
    for stage in stages.values():
        for keyword, args in stage.instructions:
            if keyword in {"ARG", "ENV"}:
                names += re.findall(r"(\w+)=", args) or [args.split()[0]]
    assert names and not [n for n in names if secret.search(n)]


def test_requirements_helper_lists_the_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    helper = [sys.executable, str(DOCKER / "requirements.py"), str(ROOT / "pyproject.toml")]
    done = subprocess.run(helper, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.splitlines() == project["dependencies"]
    assert any(r.startswith("huggingface_hub") for r in project["dependencies"])
    extra = subprocess.run([*helper, "test"], capture_output=True, text=True, timeout=30)
    assert (
        extra.stdout.splitlines()
        == project["dependencies"] + project["optional-dependencies"]["test"]
    )
    bad = subprocess.run([*helper, "no-such-extra"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "no-such-extra" in bad.stderr


# --- .dockerignore ------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, lines: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context (the last match decides)."""
    parts = path.split("/")
    excluded = False
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = _ignore_regex(pattern)
        if any(regex.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_dockerignore_sends_only_what_the_build_copies(stages):
    lines = DOCKERIGNORE.read_text().splitlines()
    sources = []
    for stage in stages.values():
        for args in stage.all("COPY"):
            if "--from=" not in args:
                sources += [w for w in args.split() if not w.startswith("--")][:-1]
    assert {"pyproject.toml", "README.md", "src/", "docker/requirements.py"} <= set(sources)
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in sources  # the wheel build reads it
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, source
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or ".egg-info" in rel:
                continue
            assert not dockerignore_excludes(rel, lines), f"{rel} is left out of the context"
    for left_out in [
        ".venv/bin/python",
        ".git/config",
        "tests/fixtures/a_input.png",
        "ben2_outputs/a_input.png",
        ".env",
        "config/local.env",
        "docker/compose.yaml",
        "src/ben2q/__pycache__/cli.cpython-311.pyc",
        "src/ben2q.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/lastfailed",
    ]:
        assert dockerignore_excludes(left_out, lines), left_out


# --- the images' commands, run here -------------------------------------------------------


def _ben2q() -> list[str]:
    script = Path(sys.executable).with_name("ben2q")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ben2q.cli"]


@pytest.mark.parametrize("name", sorted(BEN2Q_SERVICES))
def test_service_commands_answer_help(services, name):
    command = services[name]["command"]
    done = subprocess.run(
        [*_ben2q(), *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: ben2q {command[0]}")


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_options_pass_through_to_celery(services, name):
    """Our parser takes --gpu/--queues; Celery's must accept every other option."""
    args, extra = build_parser().parse_known_args(services[name]["command"])
    assert args.command == "worker"
    assert args.gpu == (0 if name in GPU_WORKERS else None)
    celery = [sys.executable, "-m", "celery", "-A", "ben2q.worker", "worker"]
    celery += [f"--queues={args.queues}", *extra, "--help"]
    done = subprocess.run(celery, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # an unknown option exits 2


def test_the_health_check_passes_for_a_worker_started_like_the_webhooks_service(
    services, stages, redis_server, tmp_path
):
    """The image's probe, run as Docker runs it, against a real worker started with the
    webhooks service's command: unhealthy before it starts, healthy once it consumes,
    unhealthy again after it stopped."""
    [healthcheck] = stages["cpu"].all("HEALTHCHECK")
    probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    service = services["webhooks"]
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
    env.update(
        {
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "BEN2Q_BROKER_URL": redis_server.url.rsplit("/", 1)[0] + "/15",  # a db of its own
            "BEN2Q_WEBHOOK_SECRET": REQUIRED_ENV["BEN2Q_WEBHOOK_SECRET"],
            "BEN2Q_HEALTH_DIR": str(tmp_path / "health"),  # the container's own /tmp
            "HOSTNAME": socket.gethostname(),  # what Docker sets; %h in --hostname
        }
    )

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)

    assert check().returncode == 1  # nothing started yet
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [*_ben2q(), *service["command"]], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 60
        while (healthy := check()).returncode != 0:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, healthy.stdout + log.read_text()
            time.sleep(0.2)
        assert healthy.stdout.startswith("webhooks@") and "ready" in healthy.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert check().returncode == 1  # stopped: unhealthy


def test_the_api_service_serves_from_the_image_with_storage_and_a_probe(services, compose):
    """The HTTP API runs from the cpu image with the storage env, publishes its port on the
    publish address and is health-checked on /healthz; its locations use created buckets."""
    api = services["api"]
    command = api["command"]
    assert command[0] == "api" and flag_value(command, "--host") == "0.0.0.0"
    port = flag_value(command, "--port")
    assert api["ports"] == [f"${{BEN2Q_PUBLISH_ADDR:-127.0.0.1}}:{port}:{port}"]
    env = api["environment"]
    for name, value in compose["x-ben2q-env"].items():
        assert env[name] == value, name
    for name in ("BEN2Q_API_OUTPUT_LOCATION", "BEN2Q_API_UPLOAD_LOCATION"):
        bucket = env[name].removeprefix("s3://").split("/", 1)[0]
        assert bucket in BUCKETS, name
    assert f"127.0.0.1:{port}/healthz" in api["healthcheck"]["test"][-1]
    assert api["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
