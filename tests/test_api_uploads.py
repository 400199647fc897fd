"""Uploads, ``POST /v1/remove`` and the output endpoints, end to end: a real ``ben2q api``
process, a real worker, redis-server and SeaweedFS; results are compared with the engine."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from apistack import ApiServer, problem, wait_done
from apistack import photo_image as photo
from PIL import Image
from stack import Worker, png_bytes

from ben2q.config import Settings
from ben2q.engine import Engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(settings=Settings(model_spec="tiny", device="cpu"))


@pytest.fixture(scope="module")
def small_api(api_stack):
    """A second deployment on the same Redis: an API process with 20000 bytes per image,
    3 files per request and uploads on ``file://`` storage under the stack's local root,
    and a worker of its own configuration on its own queue (a worker accepts a key's
    uploads from the upload location it is configured with, as the API is)."""
    env = {
        **api_stack.env,
        "BEN2Q_QUEUE": "ben2q-small",
        "BEN2Q_HEALTH_DIR": str(api_stack.root / ".health-small"),
        "BEN2Q_MAX_IMAGE_BYTES": "20000",
        "BEN2Q_API_MAX_UPLOAD_FILES": "3",
        "BEN2Q_API_UPLOAD_LOCATION": (api_stack.root / "uploads").as_uri() + "/",
    }
    worker = Worker(env, api_stack.logs / "worker-small.log", name="smallw")
    server = ApiServer(env, api_stack.logs / "api-small.log").start()
    yield server
    server.stop()
    worker.stop()


@pytest.fixture(scope="module")
def bare_api(api_stack):
    """An API process without an upload location, whose /v1/remove waits 0.05 s at most."""
    env = {k: v for k, v in api_stack.env.items() if k != "BEN2Q_API_UPLOAD_LOCATION"}
    env["BEN2Q_API_REMOVE_TIMEOUT"] = "0.05"
    server = ApiServer(env, api_stack.logs / "api-bare.log").start()
    yield server
    server.stop()


def assert_cutout(data: bytes, src: Image.Image, engine: Engine, fmt: str = "PNG") -> None:
    out = Image.open(io.BytesIO(data))
    out.load()
    assert out.format == fmt and out.mode == "RGBA" and out.size == src.size
    expected = engine.predict([src])[0].alpha
    assert np.abs(np.asarray(out)[..., 3].astype(int) - expected.astype(int)).max() <= 1
    rgba, seen = np.asarray(out), np.asarray(out)[..., 3] > 0
    assert np.array_equal(rgba[..., :3][seen], np.asarray(src)[seen])
    assert not rgba[..., :3][~seen].any()  # files never carry the removed background


def assert_mask(data: bytes, src: Image.Image, engine: Engine) -> None:
    out = Image.open(io.BytesIO(data))
    out.load()
    assert out.format == "PNG" and out.mode == "L" and out.size == src.size
    expected = engine.predict([src])[0].alpha
    assert np.abs(np.asarray(out).astype(int) - expected.astype(int)).max() <= 1


def follow(http: httpx.Client, path: str) -> bytes:
    """GET an output endpoint: a 302 to a presigned URL, fetched from SeaweedFS directly."""
    answer = http.get(path)
    assert answer.status_code == 302, answer.text
    expiry = Settings.model_fields["api_presign_expiry"].default  # the stack's
    assert abs(int(answer.headers["x-expires-at"]) - (time.time() + expiry)) < 30
    assert answer.headers["cache-control"] == f"private, max-age={expiry}"
    location = answer.headers["location"]
    assert "X-Amz-Signature=" in location
    fetched = httpx.get(location, timeout=30)
    assert fetched.status_code == 200, fetched.text
    return fetched.content


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0und4ry") -> bytes:
    """A hand-made multipart body (name, filename or None for a field, data)."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


FORM = {"Content-Type": "multipart/form-data; boundary=b0und4ry"}


def uploaded_keys(api_stack, key_id: str) -> list[str]:
    answer = api_stack.s3.list_objects_v2(Bucket="api-up", Prefix=f"{key_id}/")
    return [obj["Key"] for obj in answer.get("Contents", [])]


# --- uploads to POST /v1/jobs ----------------------------------------------------------------


def test_upload_one_file_and_fetch_output_and_mask(api_stack, engine):
    key, token = api_stack.key("uploader")
    src = photo(1)
    with api_stack.client(token) as http:
        created = http.post(
            "/v1/jobs",
            files={"file": ("my photo (1).png", png_bytes(src), "image/png")},
            data={"mask": "true"},
        )
        assert created.status_code == 202, created.text
        record = created.json()
        job_id = record["id"]
        assert created.headers["location"] == f"/v1/jobs/{job_id}"
        assert record["kind"] == "single" and record["tenant"] == key.id
        assert record["items"][0]["input"] == f"s3://api-up/{key.id}/{job_id}/0-my_photo_1_.png"
        assert record["options"]["mask"] is True
        assert api_stack.read(record["items"][0]["input"]) == png_bytes(src)
        done = wait_done(http, job_id)
        assert done["state"] == "succeeded", done
        assert_cutout(follow(http, f"/v1/jobs/{job_id}/items/0/output"), src, engine)
        assert_mask(follow(http, f"/v1/jobs/{job_id}/items/0/mask"), src, engine)


def test_upload_several_files_is_a_batch_job(api_stack, engine):
    key, token = api_stack.key("batcher")
    sources = [photo(10 + i, size=(40 + 8 * i, 32)) for i in range(3)]
    files = [
        ("file", (f"img{i}.jpg" if i == 1 else f"img{i}", png_bytes(src), "image/png"))
        for i, src in enumerate(sources)
    ]
    with api_stack.client(token) as http:
        created = http.post(
            "/v1/jobs",
            files=files,
            data={"format": "webp", "refine": "false", "output": "batches/b1"},
        )
        assert created.status_code == 202, created.text
        record = created.json()
        assert record["kind"] == "batch" and len(record["items"]) == 3
        assert record["output"] == f"s3://api-out/{key.id}/batches/b1/"
        names = [item["input"].rsplit("/", 1)[1] for item in record["items"]]
        assert names == ["0-img0.png", "1-img1.jpg", "2-img2.png"]  # extension from the header
        done = wait_done(http, record["id"])
        assert done["state"] == "succeeded", done
        for i, src in enumerate(sources):
            data = follow(http, f"/v1/jobs/{record['id']}/items/{i}/output")
            assert_cutout(data, src, engine, fmt="WEBP")
        problem(http.get(f"/v1/jobs/{record['id']}/items/3/output"), 404, "not_found")
        body = problem(http.get(f"/v1/jobs/{record['id']}/items/0/mask"), 404, "not_found")
        assert "mask" in body["detail"]


def test_refused_uploads_name_the_part(api_stack):
    key, token = api_stack.key("refused")
    good = png_bytes(photo(2))
    huge = png_bytes(Image.new("RGB", (2100, 2000)))  # 4.2 MP > BEN2Q_MAX_IMAGE_PIXELS
    with api_stack.client(token) as http:
        body = problem(
            http.post("/v1/jobs", files=[("file", ("a.png", good)), ("file", ("b.png", huge))]),
            413,
            "image_too_large",
            "/file/1",
        )
        assert "pixels" in body["detail"]
        problem(
            http.post(
                "/v1/jobs",
                files=[("file", ("a.png", good)), ("file", ("notes.txt", b"hello, not an image"))],
            ),
            422,
            "invalid_image",
            "/file/1",
        )
        problem(http.post("/v1/jobs", files={"file": ("e.png", b"")}), 422, "invalid_image")
        cases = [
            # truncated: no closing boundary
            (multipart(("file", "a.png", good))[:-30], FORM, 400, "invalid_multipart", None),
            # no boundary parameter
            (
                multipart(("file", "a.png", good)),
                {"Content-Type": "multipart/form-data"},
                400,
                "invalid_multipart",
                None,
            ),
            # no file part
            (multipart(("format", None, b"png")), FORM, 422, "invalid_request", "/file"),
            # an unknown field, a bad option, an oversized field, a field twice
            (
                multipart(("bogus", None, b"1"), ("file", "a.png", good)),
                FORM,
                422,
                "invalid_request",
                "/bogus",
            ),
            (
                multipart(("format", None, b"gif"), ("file", "a.png", good)),
                FORM,
                422,
                "invalid_request",
                "/format",
            ),
            (
                multipart(("webhook_url", None, b"x" * 9000), ("file", "a.png", good)),
                FORM,
                413,
                "payload_too_large",
                "/webhook_url",
            ),
            (
                multipart(("refine", None, b"1"), ("refine", None, b"0"), ("file", "a", good)),
                FORM,
                422,
                "invalid_request",
                "/refine",
            ),
            # a part without a Content-Disposition name
            (
                b"--b0und4ry\r\nX-Nothing: 1\r\n\r\nzz\r\n--b0und4ry--\r\n",
                FORM,
                400,
                "invalid_multipart",
                None,
            ),
        ]
        for content, headers, status, code, pointer in cases:
            problem(http.post("/v1/jobs", content=content, headers=headers), status, code, pointer)
        # an output outside the key's prefix: refused before anything is stored
        problem(
            http.post(
                "/v1/jobs",
                content=multipart(("output", None, b"../up"), ("file", "a", good)),
                headers=FORM,
            ),
            403,
            "forbidden",
            "/output",
        )
    assert api_stack.api.alive()
    assert uploaded_keys(api_stack, key.id) == []  # no refused request stored anything


def test_size_and_count_limits_while_streaming(api_stack, small_api, engine):
    key, token = api_stack.key("limits")
    small = photo(3)
    big = png_bytes(photo(4, size=(100, 100)))  # about 30 kB > 20000 bytes
    assert len(png_bytes(small)) < 20000 < len(big)
    with httpx.Client(
        base_url=small_api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        body = problem(
            http.post(
                "/v1/jobs",
                files=[("file", ("a.png", png_bytes(small))), ("file", ("b.png", big))],
            ),
            413,
            "image_too_large",
            "/file/1",
        )
        assert "20000" in body["detail"]
        problem(
            http.post(
                "/v1/jobs", files=[("file", (f"{i}.png", png_bytes(small))) for i in range(4)]
            ),
            413,
            "payload_too_large",
            "/file/3",
        )

        # a streamed body of unknown length (chunked) is cut off at the part that overflows
        def chunks():
            yield multipart(("file", "a.png", png_bytes(small)))[:-14]
            yield b'--b0und4ry\r\nContent-Disposition: form-data; name="file"; filename="z"\r\n\r\n'
            for _ in range(200):
                yield b"\0" * 65536

        problem(
            http.post("/v1/jobs", content=chunks(), headers=FORM), 413, "image_too_large", "/file/1"
        )
        assert small_api.alive()
        # within the limits, uploads on file:// storage run like any other
        created = http.post("/v1/jobs", files={"file": ("s.png", png_bytes(small))})
        assert created.status_code == 202, created.text
        record = created.json()
        uri = record["items"][0]["input"]
        assert uri == (api_stack.root / "uploads").as_uri() + f"/{key.id}/{record['id']}/0-s.png"
        done = wait_done(http, record["id"])
        assert done["state"] == "succeeded", done
        assert_cutout(follow(http, f"/v1/jobs/{record['id']}/items/0/output"), small, engine)


def test_uploads_need_an_upload_location(api_stack, bare_api):
    _, token = api_stack.key("bare")
    with httpx.Client(
        base_url=bare_api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        files = {"file": ("a.png", png_bytes(photo(5)))}
        body = problem(http.post("/v1/jobs", files=files), 503, "unavailable")
        assert "BEN2Q_API_UPLOAD_LOCATION" in body["detail"]
        problem(http.post("/v1/remove", files=files), 503, "unavailable")


# --- POST /v1/remove -------------------------------------------------------------------------


def test_remove_multipart_raw_and_json(api_stack, engine):
    key, token = api_stack.key("remover")
    src = photo(6)
    data = png_bytes(src)
    uri = api_stack.put(f"{key.id}/r.png", data)
    with api_stack.client(token) as http:
        answers = [
            http.post("/v1/remove", files={"file": ("r.png", data, "image/png")}),
            http.post("/v1/remove", content=data, headers={"Content-Type": "image/png"}),
            http.post(
                "/v1/remove", content=data, headers={"Content-Type": "application/octet-stream"}
            ),
            http.post("/v1/remove", json={"input": uri}),
        ]
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "image/png"
            assert answer.headers["x-width"] == "64" and answer.headers["x-height"] == "48"
            assert int(answer.headers["content-length"]) == len(answer.content)
            assert_cutout(answer.content, src, engine)
            record = http.get(f"/v1/jobs/{answer.headers['x-job-id']}").json()
            assert record["state"] == "succeeded" and record["tenant"] == key.id
            assert record["output"] == f"s3://api-out/{key.id}/"
        # options: webp, and mask=true answers the mask (form field, query, JSON field)
        webp = http.post("/v1/remove", files={"file": ("r.png", data)}, data={"format": "webp"})
        assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"
        assert_cutout(webp.content, src, engine, fmt="WEBP")
        masks = [
            http.post("/v1/remove", files={"file": ("r.png", data)}, data={"mask": "true"}),
            http.post(
                "/v1/remove?mask=true&format=webp",
                content=data,
                headers={"Content-Type": "image/png"},
            ),
            http.post("/v1/remove", json={"input": uri, "mask": True}),
        ]
        for answer in masks:
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "image/png"
            assert_mask(answer.content, src, engine)
        # the cut-out of a mask=true job is still there
        job_id = masks[0].headers["x-job-id"]
        assert_cutout(follow(http, f"/v1/jobs/{job_id}/items/0/output"), src, engine)
        problem(
            http.post("/v1/remove?format=png", json={"input": uri, "format": "webp"}),
            422,
            "invalid_request",
            "query:format",
        )
        problem(
            http.post("/v1/remove", content=b"x", headers={"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
        )
        problem(
            http.post("/v1/remove", files=[("file", ("a", data)), ("file", ("b", data))]),
            413,
            "payload_too_large",
            "/file/1",
        )
        problem(http.post("/v1/remove", json={"input": "s3://api-other/x.png"}), 403, "forbidden")


def test_remove_failed_job_answers_its_error(api_stack):
    key, token = api_stack.key("remove-bad")
    broken = png_bytes(photo(7))[:200]  # a PNG header (so the API takes it), no pixel data
    not_image = api_stack.put(f"{key.id}/bad.png", b"this is not an image at all")
    with api_stack.client(token) as http:
        for answer in (
            http.post("/v1/remove", files={"file": ("broken.png", broken)}),
            http.post("/v1/remove", json={"input": not_image}),
        ):
            body = problem(answer, 422, "invalid_image")
            job_id = answer.headers["x-job-id"]
            assert answer.headers["location"] == f"/v1/jobs/{job_id}"
            assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "failed", body
            # and its output endpoint says why there is none
            problem(http.get(f"/v1/jobs/{job_id}/items/0/output"), 409, "no_output")
        # refused before any job: a raw body that is no image names the body
        problem(
            http.post("/v1/remove", content=b"nope", headers={"Content-Type": "image/png"}),
            422,
            "invalid_image",
            "/",
        )
        problem(
            http.post("/v1/remove", json={"input": f"s3://api-in/{key.id}/missing.png"}),
            404,
            "not_found",
        )
    assert api_stack.api.alive()


def test_remove_timeout_is_504_with_the_job_to_follow(api_stack, bare_api):
    key, token = api_stack.key("remove-slow")
    uri = api_stack.put(f"{key.id}/slow.png", png_bytes(photo(8, size=(300, 200))))
    with httpx.Client(
        base_url=bare_api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        answer = http.post("/v1/remove", json={"input": uri})
        problem(answer, 504, "timeout")
        job_id = answer.headers["x-job-id"]
        assert answer.headers["location"] == f"/v1/jobs/{job_id}"
        assert wait_done(http, job_id)["state"] == "succeeded"  # the job went on


# --- output endpoints ------------------------------------------------------------------------


def test_outputs_are_the_owners_only(api_stack):
    owner, token = api_stack.key("owner")
    _, other = api_stack.key("other")
    uri = api_stack.put(f"{owner.id}/o.png", png_bytes(photo(9)))
    with api_stack.client(token) as http:
        job = http.post("/v1/jobs", json={"input": uri, "mask": True}).json()
        assert wait_done(http, job["id"])["state"] == "succeeded"
        assert http.get(f"/v1/jobs/{job['id']}/items/0/output").status_code == 302
    with api_stack.client(other) as http:
        for which in ("output", "mask"):
            problem(http.get(f"/v1/jobs/{job['id']}/items/0/{which}"), 404, "not_found")
        problem(http.get("/v1/jobs/nope/items/0/output"), 404, "not_found")
    with api_stack.client() as http:
        problem(http.get(f"/v1/jobs/{job['id']}/items/0/output"), 401, "unauthorized")


def test_file_outputs_are_streamed(api_stack, engine):
    out_dir = api_stack.root / "file-outputs"
    key, token = api_stack.key("filer", output_prefix=out_dir.as_uri() + "/")
    src = photo(11)
    with api_stack.client(token) as http:
        job = http.post(
            "/v1/jobs", files={"file": ("f.png", png_bytes(src))}, data={"mask": "1"}
        ).json()
        done = wait_done(http, job["id"])
        assert done["state"] == "succeeded", done
        assert done["items"][0]["output"].startswith(out_dir.as_uri() + "/")
        answer = http.get(f"/v1/jobs/{job['id']}/items/0/output")
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/png"
        assert int(answer.headers["content-length"]) == len(answer.content)
        on_disk = out_dir / job["id"] / "0000-0-f.png"
        assert answer.content == on_disk.read_bytes()
        assert_cutout(answer.content, src, engine)
        mask = http.get(f"/v1/jobs/{job['id']}/items/0/mask")
        assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
        assert_mask(mask.content, src, engine)
        # a file gone (retention swept it) is a 404, not a 500
        on_disk.unlink()
        problem(http.get(f"/v1/jobs/{job['id']}/items/0/output"), 404, "not_found")
