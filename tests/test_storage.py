"""Tests of ben2q.storage against real servers: SeaweedFS's S3 server over HTTP (SigV4
checked), a loopback ``http.server`` and the local file system. No mocks: every call crosses
a real boundary.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from servers import S3Server

from ben2q.config import Settings
from ben2q.errors import (
    FetchFailed,
    ForbiddenURL,
    ImageTooLarge,
    InvalidRequest,
    NotFound,
    StorageError,
    UploadFailed,
)
from ben2q.storage import Storage

# --------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------


@pytest.fixture()
def bucket(s3_server, s3_env) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture()
def storage(s3_server, s3_env) -> Iterator[Storage]:
    st = Storage(Settings(s3_endpoint_url=s3_server.url, s3_max_attempts=2))
    yield st
    st.close()


def test_s3_round_trip_with_content_type_and_metadata(storage, bucket, s3_server):
    uri = f"s3://{bucket}/jobs/j1/0000-cat.png"
    data = os.urandom(4096)
    assert not storage.exists(uri)

    storage.write(uri, data, content_type="image/png", metadata={"job": "j1", "index": "0"})

    assert storage.read(uri) == data
    assert storage.exists(uri)
    head = s3_server.client().head_object(Bucket=bucket, Key="jobs/j1/0000-cat.png")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {"job": "j1", "index": "0"}
    assert head["ContentLength"] == len(data)


def test_s3_overwrite_replaces_the_object(storage, bucket, s3_server):
    uri = f"s3://{bucket}/out.webp"
    storage.write(uri, b"first version", content_type="image/webp")
    storage.write(uri, b"second", content_type="image/png")

    assert storage.read(uri) == b"second"
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listing["Contents"]] == ["out.webp"]
    head = s3_server.client().head_object(Bucket=bucket, Key="out.webp")
    assert head["ContentType"] == "image/png"


def test_s3_keys_are_literal(storage, bucket, s3_server):
    uri = f"s3://{bucket}/dir/a b%20c?x#y.png"
    storage.write(uri, b"odd", content_type="image/png")
    body = s3_server.client().get_object(Bucket=bucket, Key="dir/a b%20c?x#y.png")["Body"]
    assert body.read() == b"odd"
    assert storage.read(uri) == b"odd"


def test_s3_missing_key_and_bucket_are_not_found(storage, bucket):
    with pytest.raises(NotFound) as missing_key:
        storage.read(f"s3://{bucket}/nope.png")
    assert missing_key.value.code == "not_found"
    assert f"s3://{bucket}/nope.png" in missing_key.value.message

    with pytest.raises(NotFound) as missing_bucket:
        storage.read("s3://no-such-bucket-ben2q/x.png")
    assert missing_bucket.value.code == "not_found"
    assert "no-such-bucket-ben2q" in missing_bucket.value.message
    assert not storage.exists("s3://no-such-bucket-ben2q/x.png")


def test_s3_keys_the_store_refuses_fail_at_once_as_invalid(storage, bucket, s3_server):
    """AWS takes any UTF-8 key up to 1024 bytes; SeaweedFS answers 400 InvalidRequest to a
    NUL, to ``.``/``..`` segments and to ``\\`` (its path separator) around them. The same
    key never succeeds later: an invalid input, after one request (no retries)."""
    sends: list[str] = []
    storage._s3().meta.events.register(
        "before-send.s3.GetObject", lambda **kw: sends.append(kw["event_name"])
    )
    for key in ("names/a\x00b.png", "a/../../x.png", "names/..\\..\\x.png", "a/./b.png"):
        sends.clear()
        with pytest.raises(InvalidRequest) as err:
            storage.read(f"s3://{bucket}/{key}")
        assert err.value.field == "input"
        assert "InvalidRequest" in err.value.message
        assert len(sends) == 1
    with pytest.raises(NotFound):  # a plain missing key stays not_found
        storage.read(f"s3://{bucket}/names/a.png")
    puts: list[str] = []
    storage._s3().meta.events.register(
        "before-send.s3.PutObject", lambda **kw: puts.append(kw["event_name"])
    )
    with pytest.raises(InvalidRequest) as werr:
        storage.write(f"s3://{bucket}/odd/../../j/0000-a.png", b"x", content_type="image/png")
    assert werr.value.field == "output"
    assert "InvalidRequest" in werr.value.message
    assert len(puts) == 1
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=bucket)


def test_s3_write_to_missing_bucket_is_upload_failed(storage):
    with pytest.raises(UploadFailed) as err:
        storage.write("s3://no-such-bucket-ben2q/o.png", b"x", content_type="image/png")
    assert err.value.code == "upload_failed"
    assert "no such bucket" in err.value.message
    assert "s3://no-such-bucket-ben2q/o.png" in err.value.message
    assert err.value.__cause__ is not None


def test_s3_bad_uris_are_invalid_requests(storage):
    for uri in ("s3://", "s3:///key.png", "s3://bucket-only", "s3://bucket-only/"):
        with pytest.raises(InvalidRequest) as err:
            storage.read(uri)
        assert err.value.field == "input"
    with pytest.raises(InvalidRequest) as err:
        storage.write("s3://bucket/prefix/", b"x", content_type="image/png")
    assert err.value.field == "output"


def test_s3_object_at_the_limit_reads_and_over_it_is_refused(s3_server, s3_env, bucket):
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="exact", Body=b"a" * 1024)
    client.put_object(Bucket=bucket, Key="over", Body=b"a" * 1025)
    with Storage(Settings(s3_endpoint_url=s3_server.url, max_image_bytes=1024)) as st:
        assert st.read(f"s3://{bucket}/exact") == b"a" * 1024
        with pytest.raises(ImageTooLarge) as err:
            st.read(f"s3://{bucket}/over")
    assert err.value.code == "image_too_large"


def test_s3_too_large_is_refused_without_reading_the_body(s3_server, s3_env, bucket):
    size = 8 * 1024 * 1024
    s3_server.client().put_object(Bucket=bucket, Key="big.png", Body=os.urandom(size))
    st = Storage(Settings(s3_endpoint_url=s3_server.url, max_image_bytes=64 * 1024))
    bodies = []
    # A real client hook (no mock): keep the GetObject response's body to inspect it after.
    st._s3().meta.events.register(
        "after-call.s3.GetObject", lambda parsed, **_: bodies.append(parsed["Body"])
    )
    try:
        with pytest.raises(ImageTooLarge) as err:
            st.read(f"s3://{bucket}/big.png")
    finally:
        st.close()
    assert str(size) in err.value.message  # the declared ContentLength decided it
    assert len(bodies) == 1
    assert bodies[0].tell() == 0  # not one byte of the body was read


def test_s3_client_is_shared_and_region_defaults_to_us_east_1(s3_server, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    st = Storage(Settings(s3_endpoint_url=s3_server.url, s3_max_attempts=3))
    try:
        client = st._s3()
        assert st._s3() is client
        assert client.meta.region_name == "us-east-1"
        assert client.meta.config.s3["addressing_style"] == "path"
        assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    finally:
        st.close()


def test_s3_server_checks_signatures(s3_server, bucket):
    """The S3 server verifies SigV4: a wrong secret or an unknown key is refused (403)."""
    from botocore.exceptions import ClientError

    good = s3_server.client()
    good.put_object(Bucket=bucket, Key="signed.png", Body=b"signed")
    bad = s3_server.client(secret="not-the-secret", attempts=1)
    for call in (
        lambda: bad.get_object(Bucket=bucket, Key="signed.png"),
        lambda: bad.put_object(Bucket=bucket, Key="forged.png", Body=b"forged"),
        lambda: bad.list_objects_v2(Bucket=bucket),
    ):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    stranger = boto3_client(s3_server.url, "AKIDUNKNOWN", "testing")
    with pytest.raises(ClientError) as unknown:
        stranger.get_object(Bucket=bucket, Key="signed.png")
    assert unknown.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert unknown.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    keys = [o["Key"] for o in good.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["signed.png"]  # the forged upload did not land


def test_s3_wrong_secret_through_storage(s3_server, s3_env, bucket, monkeypatch):
    """A worker with a wrong secret: reads fail for good (a 403, like a denied key) and
    writes fail as uploads, both naming the server's reason."""
    s3_server.client().put_object(Bucket=bucket, Key="in.png", Body=b"input")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with Storage(Settings(s3_endpoint_url=s3_server.url, s3_max_attempts=2)) as st:
        with pytest.raises(NotFound) as read_err:
            st.read(f"s3://{bucket}/in.png")
        assert "access denied" in read_err.value.message
        assert "SignatureDoesNotMatch" in read_err.value.message
        with pytest.raises(UploadFailed) as write_err:
            st.write(f"s3://{bucket}/out.png", b"x", content_type="image/png")
        assert "SignatureDoesNotMatch" in write_err.value.message
        assert not st.exists(f"s3://{bucket}/in.png")  # HEAD: a 403 is False
    assert s3_server.client().get_object(Bucket=bucket, Key="in.png")["Body"].read() == b"input"
    listing = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listing] == ["in.png"]


def boto3_client(url: str, key: str, secret: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


def test_s3_concurrent_writes_and_reads_through_one_storage(storage, bucket):
    n = 16
    barrier = threading.Barrier(n)
    payloads = {i: os.urandom(2048 + i) for i in range(n)}

    def work(i: int) -> bytes:
        barrier.wait(timeout=10)  # all threads race for the lazily created client too
        uri = f"s3://{bucket}/c/{i:02d}.png"
        storage.write(uri, payloads[i], content_type="image/png", metadata={"i": str(i)})
        return storage.read(uri)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(work, range(n)))
    assert results == [payloads[i] for i in range(n)]


def test_s3_server_down_then_back(tmp_path, s3_env):
    server = S3Server(tmp_path / "s3").start()
    try:
        server.create_bucket("down")
        st = Storage(Settings(s3_endpoint_url=server.url, s3_max_attempts=2))
        st.write("s3://down/a.png", b"before", content_type="image/png")
        assert st.read("s3://down/a.png") == b"before"

        sends: list[str] = []
        st._s3().meta.events.register(
            "before-send.s3.GetObject", lambda **kw: sends.append(kw["event_name"])
        )

        server.stop()
        start = time.monotonic()
        with pytest.raises(StorageError) as read_err:
            st.read("s3://down/a.png")
        assert len(sends) == 2  # s3_max_attempts counts every attempt, the first too
        assert type(read_err.value) is StorageError
        assert read_err.value.code == "storage_error"
        assert "s3://down/a.png" in read_err.value.message
        with pytest.raises(UploadFailed) as write_err:
            st.write("s3://down/b.png", b"x", content_type="image/png")
        assert write_err.value.code == "upload_failed"
        assert write_err.value.__cause__ is not None
        with pytest.raises(StorageError):
            st.exists("s3://down/a.png")
        assert time.monotonic() - start < 15  # s3_max_attempts=2: no long retry loop

        server.start()  # same port, same data directory: what was written is still there
        assert st.read("s3://down/a.png") == b"before"
        assert not st.exists("s3://down/b.png")  # the write during the outage never landed
        st.write("s3://down/b.png", b"after", content_type="image/png")
        assert st.read("s3://down/b.png") == b"after"
        st.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# file://
# --------------------------------------------------------------------------------------


@pytest.fixture()
def root(tmp_path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture()
def outside(tmp_path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "secret.png").write_bytes(b"SECRET")
    return o


def local(root: Path, **kw) -> Storage:
    return Storage(Settings(local_root=root, **kw))


def furi(path: Path | str) -> str:
    return "file://" + quote(str(path))


def test_file_round_trip_creates_directories_and_leaves_no_temp_files(root):
    st = local(root)
    uri = furi(root / "out" / "job" / "0000-a.png")
    assert not st.exists(uri)
    st.write(uri, b"png bytes", content_type="image/png", metadata={"ignored": "yes"})
    assert st.read(uri) == b"png bytes"
    assert st.exists(uri)
    assert (root / "out" / "job" / "0000-a.png").read_bytes() == b"png bytes"
    assert sorted(p.name for p in (root / "out" / "job").iterdir()) == ["0000-a.png"]


def test_file_rewrite_replaces_atomically(root):
    st = local(root)
    target = root / "o.png"
    st.write(furi(target), b"old contents", content_type="image/png")
    with open(target, "rb") as old:
        st.write(furi(target), b"new", content_type="image/png")
        # A new file took the name: a reader of the old one still sees it whole.
        assert old.read() == b"old contents"
    assert target.read_bytes() == b"new"
    assert [p.name for p in root.iterdir()] == ["o.png"]


def test_file_failed_write_leaves_no_temp_file(root):
    st = local(root)
    (root / "dir.png").mkdir()
    (root / "dir.png" / "child").write_bytes(b"x")
    with pytest.raises(UploadFailed) as err:
        st.write(furi(root / "dir.png"), b"data", content_type="image/png")
    assert err.value.__cause__ is not None
    assert sorted(p.name for p in root.iterdir()) == ["dir.png"]


def test_file_percent_encoded_names(root):
    st = local(root)
    (root / "a b#1?.png").write_bytes(b"spaced")
    assert st.read(f"file://{root}/a%20b%231%3F.png") == b"spaced"
    assert st.read(f"file://localhost{root}/a%20b%231%3F.png") == b"spaced"
    st.write(f"file://{root}/new%20%C3%A9.png", b"w", content_type="image/png")
    assert (root / "new é.png").read_bytes() == b"w"
    with pytest.raises(InvalidRequest):
        st.read(f"file://{root}/a b#1?.png")  # '#' and '?' must be encoded


def test_file_traversal_is_refused(root, outside):
    st = local(root)
    for uri in (
        f"file://{root}/../outside/secret.png",
        f"file://{root}/%2e%2e/outside/secret.png",
        furi(outside / "secret.png"),
        "file:///etc/passwd",
        f"file://{root}/../../../../../etc/passwd",
    ):
        with pytest.raises(InvalidRequest) as err:
            st.read(uri)
        assert err.value.field == "input"
        assert "outside the local root" in err.value.message
        assert "SECRET" not in err.value.message

    with pytest.raises(InvalidRequest) as werr:
        st.write(f"file://{root}/../outside/new.png", b"x", content_type="image/png")
    assert werr.value.field == "output"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]


def test_file_symlinks_pointing_outside_are_refused(root, outside):
    st = local(root)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)

    for uri in (furi(root / "link.png"), furi(root / "dirlink" / "secret.png")):
        with pytest.raises(InvalidRequest) as err:
            st.read(uri)
        assert "outside the local root" in err.value.message
        with pytest.raises(InvalidRequest):
            st.exists(uri)

    for uri in (
        furi(root / "dirlink" / "new.png"),
        furi(root / "dirlink" / "sub" / "new.png"),
        furi(root / "link.png"),
    ):
        with pytest.raises(InvalidRequest) as werr:
            st.write(uri, b"EVIL", content_type="image/png")
        assert werr.value.field == "output"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]
    assert (outside / "secret.png").read_bytes() == b"SECRET"


def test_file_symlink_inside_the_root_is_followed(root):
    st = local(root)
    (root / "real").mkdir()
    (root / "real" / "a.png").write_bytes(b"inside")
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert st.read(furi(root / "alias" / "a.png")) == b"inside"


def test_file_without_local_root_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    st = Storage(Settings(local_root=None))
    with pytest.raises(InvalidRequest) as rerr:
        st.read(furi(tmp_path / "a.png"))
    assert rerr.value.field == "input"
    assert "BEN2Q_LOCAL_ROOT" in rerr.value.message
    with pytest.raises(InvalidRequest) as werr:
        st.write(furi(tmp_path / "b.png"), b"x", content_type="image/png")
    assert werr.value.field == "output"
    assert not (tmp_path / "b.png").exists()


def test_file_missing_directory_and_fifo_are_not_found(root):
    st = local(root)
    with pytest.raises(NotFound) as err:
        st.read(furi(root / "missing.png"))
    assert err.value.code == "not_found"
    with pytest.raises(NotFound):
        st.read(furi(root / "no" / "such" / "dir.png"))
    (root / "d").mkdir()
    with pytest.raises(NotFound) as derr:
        st.read(furi(root / "d"))
    assert "not a file" in derr.value.message
    os.mkfifo(root / "fifo")
    with pytest.raises(NotFound):  # and does not hang waiting for a writer
        st.read(furi(root / "fifo"))
    assert not st.exists(furi(root / "d"))


def test_file_size_limit(root):
    st = local(root, max_image_bytes=100)
    (root / "exact.png").write_bytes(b"e" * 100)
    (root / "big.png").write_bytes(b"b" * 101)
    assert st.read(furi(root / "exact.png")) == b"e" * 100
    with pytest.raises(ImageTooLarge) as err:
        st.read(furi(root / "big.png"))
    assert err.value.code == "image_too_large"


def test_bounded_read_stops_one_byte_past_the_limit():
    # The declared size (ContentLength, fstat) is checked first; this bound is what still
    # holds when a file grows after the check or a server's body is longer than declared.
    from ben2q.storage import _read_bounded

    stream = io.BytesIO(b"z" * 10_000)
    with pytest.raises(ImageTooLarge):
        _read_bounded(stream.read, 100, "stream")
    assert stream.tell() == 101
    assert _read_bounded(io.BytesIO(b"y" * 100).read, 100, "stream") == b"y" * 100


def test_file_bad_forms_are_refused(root):
    st = local(root)
    with pytest.raises(InvalidRequest):
        st.read(f"file://otherhost{root}/a.png")
    with pytest.raises(InvalidRequest):
        st.write(furi(root) + "/", b"x", content_type="image/png")
    with pytest.raises(InvalidRequest):
        st.write(furi(root), b"x", content_type="image/png")
    with pytest.raises(InvalidRequest):
        st.read(f"file://{root}/a%00.png")


def test_file_concurrent_writes_through_one_storage(root):
    st = local(root)
    n = 16

    def work(i: int) -> bytes:
        uri = furi(root / "c" / f"{i % 4}" / f"{i}.png")
        st.write(uri, str(i).encode() * 100, content_type="image/png")
        st.write(furi(root / "same.png"), str(i).encode(), content_type="image/png")
        return st.read(uri)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(work, range(n)))
    assert results == [str(i).encode() * 100 for i in range(n)]
    assert int((root / "same.png").read_bytes()) in range(n)
    assert not [p for p in root.rglob("*.tmp")]


# --------------------------------------------------------------------------------------
# http(s):// and other schemes
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/img.png":
            body = b"\x89PNG served"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_read_through_the_guarded_fetch(http_url):
    st = Storage(Settings(allow_private_urls=True))
    assert st.read(f"{http_url}/img.png") == b"\x89PNG served"
    with pytest.raises(FetchFailed) as err:  # fetch's errors pass through unchanged
        st.read(f"{http_url}/missing.png")
    assert "404" in err.value.message


def test_http_loopback_refused_by_default(http_url):
    with pytest.raises(ForbiddenURL):
        Storage(Settings()).read(f"{http_url}/img.png")


def test_http_write_and_other_schemes_are_invalid(http_url):
    st = Storage(Settings(allow_private_urls=True))
    with pytest.raises(InvalidRequest) as werr:
        st.write(f"{http_url}/o.png", b"x", content_type="image/png")
    assert werr.value.field == "output"
    for uri in ("ftp://host/a.png", "gs://b/k.png", "/abs/path.png", ""):
        with pytest.raises(InvalidRequest) as rerr:
            st.read(uri)
        assert rerr.value.field == "input"
    with pytest.raises(InvalidRequest) as oerr:
        st.write("gs://b/k.png", b"x", content_type="image/png")
    assert oerr.value.field == "output"
