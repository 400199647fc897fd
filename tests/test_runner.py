"""The job runner in-process: a real Redis status store and file:// storage, the tiny engine.

The queue tests run the same code inside real workers; here faults that a worker cannot be
made to meet from outside (a bug in a lower library) are injected into one storage read.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ben2q.config import Settings
from ben2q.jobs import make_request
from ben2q.runner import JobRunner, public_uri, run_jobs
from ben2q.status import StatusStore
from ben2q.storage import Storage

DB = 11  # the session server is shared: this module keeps to its own database


class FlakyStorage(Storage):
    """Real file:// storage whose read of one named input raises a non-ben2q exception."""

    def read(self, uri: str) -> bytes:
        if uri.endswith("/boom.png"):
            raise KeyError("a bug below ben2q")
        return super().read(uri)


@pytest.fixture()
def runner(url, tiny_engine, tmp_path):
    settings = Settings(model_spec="tiny", device="cpu", local_root=str(tmp_path), max_batch=2)
    store = StatusStore(url, ttl=600)
    r = JobRunner(tiny_engine, FlakyStorage(settings), store, settings, hostname="t@h")
    yield r
    r.pool.shutdown()


def test_an_unexpected_input_error_fails_its_item_only(runner, tmp_path, make_image):
    for name in ("a.png", "boom.png", "c.png"):
        make_image(40, 30, seed=len(name)).save(tmp_path / name)
    (tmp_path / "out").mkdir()
    inputs = [f"file://{tmp_path}/{n}" for n in ("a.png", "boom.png", "c.png")]
    request = make_request("batch", inputs, f"file://{tmp_path}/out/", local_root=str(tmp_path))
    [status] = run_jobs(runner, [request])
    assert status.state == "partial"
    assert [i.state for i in status.items] == ["succeeded", "failed", "succeeded"]
    error = status.items[1].error
    assert error.code == "internal" and "KeyError" in error.message
    written = sorted(p.name for p in (tmp_path / "out" / request.id).iterdir())
    assert written == ["0000-a.png", "0002-c.png"]
    out = Image.open(tmp_path / "out" / request.id / "0000-a.png")
    assert out.mode == "RGBA" and out.size == (40, 30)
    assert np.asarray(out)[..., 3].std() > 0


@pytest.mark.parametrize(
    ("uri", "public"),
    [
        ("s3://bucket/in/a b.png", "s3://bucket/in/a b.png"),
        (
            "https://user:pw@cdn.example.com:8443/x.png?X-Amz-Signature=abc&t=1#frag",
            "https://cdn.example.com:8443/x.png",
        ),
        ("http://[::1]:8080/a.png?token=secret", "http://[::1]:8080/a.png"),
        ("file:///srv/in/x.png", "file:///srv/in/x.png"),
    ],
)
def test_public_uri_drops_credentials_query_and_fragment(uri, public):
    assert public_uri(uri) == public
