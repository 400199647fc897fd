"""Shared fixtures: the conformance data, deterministic models and small test images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
# The suite runs the conforming float32 path on every CPU (``auto`` is bfloat16 on CPUs with
# native bf16), so exact comparisons mean the same everywhere; tests of ``auto`` and of
# reduced precision ask for them by name.
os.environ.setdefault("BEN2Q_PRECISION", "float32")
sys.path.insert(0, str(Path(__file__).parent))  # tests/servers.py


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_engine():
    """A float32 CPU engine of the tiny spec with deterministic weights."""
    from ben2q.config import Settings
    from ben2q.engine import Engine

    return Engine.load(settings=Settings(model_spec="tiny", device="cpu", max_batch=4))


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colourful image with a bright ellipse 'object' and a little noise."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [40 + 150 * xx / max(width, 1), 60 + 120 * yy / max(height, 1), 90 + 0 * xx], axis=-1
    )
    inside = ((xx - width / 2) / (width / 3 + 1)) ** 2 + ((yy - height / 2) / (height / 3 + 1)) ** 2
    base[inside <= 1] = (230, 200, 60)
    base += rs.normal(0, 4, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture()
def reduced_precision_on_cpu(monkeypatch):
    """Let the engine run bf16/fp16 on this CPU even where it is only emulated (slow, but
    the numerics of the fast mode stay tested on every machine; tiny spec)."""
    import ben2q.engine

    monkeypatch.setattr(ben2q.engine, "cpu_runs_natively", lambda dtype: True)


@pytest.fixture()
def make_image():
    return synthetic_image


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the whole session (its own port and directory)."""
    from servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS's S3 server over HTTP (SigV4 checked) for the whole session."""
    from servers import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """AWS variables for boto3's credential chain, in this process and for subprocesses."""
    from servers import S3_ENV

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return {**S3_ENV, "BEN2Q_S3_ENDPOINT_URL": s3_server.url}


@pytest.fixture()
def url(redis_server, request) -> str:
    """A flushed database of the session's redis-server, private to the test module.

    Modules that use it set ``DB = n`` (distinct numbers) so they never see each other's keys.
    """
    import redis

    url = redis_server.url.rsplit("/", 1)[0] + f"/{request.module.DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture()
def raw(url):
    """A plain redis-py client on the module's database."""
    import redis

    client = redis.Redis.from_url(url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def api_stack(redis_server, s3_server, tmp_path_factory):
    """A real ``ben2q api`` process, one real worker, redis-server (DB 5) and SeaweedFS,
    shared by the API test modules (each test makes its own keys, so tenants never meet)."""
    from apistack import start_stack
    from stack import aws_env

    with aws_env():
        stack = start_stack(redis_server, s3_server, tmp_path_factory.mktemp("api"))
        yield stack
        stack.api.stop()
        stack.worker.stop()
