"""The job service end to end: real redis-server, real S3 server (SeaweedFS), real Celery workers.

One worker process (tiny network, deterministic weights) serves the module; producers use
``ben2q.client``. Outputs are read back from S3 and compared with the engine run directly.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from stack import Worker, aws_env, png_bytes, service_env, settings_of

from ben2q.client import AsyncClient, Client
from ben2q.config import Settings
from ben2q.engine import Engine
from ben2q.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(redis_server, s3_server, tmp_path_factory):
    """Environment and settings of a running worker; buckets ``inputs`` and ``outputs``."""
    root = tmp_path_factory.mktemp("local-root")
    env = service_env(redis_server, s3_server, BEN2Q_LOCAL_ROOT=str(root))
    s3 = s3_server.client()
    for bucket in ("inputs", "outputs"):
        s3_server.create_bucket(bucket)
    worker = Worker(env, tmp_path_factory.mktemp("logs") / "worker.log")
    with aws_env():
        yield {"env": env, "settings": settings_of(env), "s3": s3, "worker": worker, "root": root}
    worker.stop()


@pytest.fixture(scope="module")
def engine():
    return Engine.load(settings=Settings(model_spec="tiny", device="cpu"))


@pytest.fixture()
def client(stack):
    with Client(settings=stack["settings"]) as c:
        yield c


def put(stack, key: str, data: bytes) -> str:
    stack["s3"].put_object(Bucket="inputs", Key=key, Body=data)
    return f"s3://inputs/{key}"


def read_output(stack, uri: str) -> Image.Image:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    img = Image.open(io.BytesIO(stack["s3"].get_object(Bucket=bucket, Key=key)["Body"].read()))
    img.load()
    return img


def assert_alpha_matches_engine(out: Image.Image, src: Image.Image, engine: Engine) -> None:
    assert out.mode == "RGBA" and out.size == src.size
    expected = engine.predict([src])[0].alpha
    diff = np.abs(np.asarray(out)[..., 3].astype(int) - expected.astype(int))
    assert diff.max() <= 1
    assert_colours_kept(np.asarray(out), np.asarray(src))


def assert_colours_kept(rgba: np.ndarray, src: np.ndarray) -> None:
    """The input's colours where the output shows anything; 0 under fully transparent
    pixels (files never carry the removed background)."""
    seen = rgba[..., 3] > 0
    assert np.array_equal(rgba[..., :3][seen], src[seen])
    assert not rgba[..., :3][~seen].any()


def test_single_job_from_s3_to_rgba_in_s3(stack, client, engine, make_image):
    src = make_image(130, 90, seed=11)
    uri = put(stack, "single/cat photo.png", png_bytes(src))
    job = client.submit(uri, output="s3://outputs/run1/")
    status = client.wait(job.id, timeout=60)
    assert status.state == "succeeded" and status.progress == 1.0
    [item] = status.items
    assert item.output == f"s3://outputs/run1/{job.id}/0000-cat_photo.png"
    assert (item.width, item.height) == (130, 90)
    assert status.worker.startswith("w1@") and status.attempts == 1
    assert status.queue_wait_ms is not None and status.run_ms is not None
    head = stack["s3"].head_object(Bucket="outputs", Key=item.output.split("/", 3)[3])
    assert head["ContentType"] == "image/png" and head["Metadata"]["job-id"] == job.id
    assert_alpha_matches_engine(read_output(stack, item.output), src, engine)


def test_batch_job_with_masks_and_webp(stack, client, engine, make_image):
    images = [make_image(60 + 7 * i, 50, seed=20 + i) for i in range(5)]
    # two inputs with the same file name must not collide
    uris = [
        put(stack, f"batch/{'a' if i % 2 else 'b'}/same.png", png_bytes(img))
        for i, img in enumerate(images)
    ]
    uris[1] = put(stack, "batch/a/same.png", png_bytes(images[1]))
    job = client.submit_batch(uris, output="s3://outputs/run2", format="webp", mask=True)
    status = client.wait(job, timeout=60)
    assert status.state == "succeeded" and status.kind == "batch"
    outputs = [item.output for item in status.items]
    assert len(set(outputs)) == 5 and all(o.endswith(".webp") for o in outputs)
    for item in status.items:
        src = Image.open(
            io.BytesIO(
                stack["s3"]
                .get_object(Bucket="inputs", Key=item.input.removeprefix("s3://inputs/"))["Body"]
                .read()
            )
        ).convert("RGB")
        out = read_output(stack, item.output)
        assert out.format == "WEBP"
        assert_alpha_matches_engine(out, src, engine)
        mask = read_output(stack, item.mask)
        assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(out)[..., 3])


def test_a_bad_item_fails_alone(stack, client, make_image):
    good = put(stack, "partial/good.png", png_bytes(make_image(40, 40)))
    bad = put(stack, "partial/bad.png", b"definitely not an image")
    job = client.submit_batch(
        [good, bad, "s3://inputs/partial/missing.png"], output="s3://outputs/run3/"
    )
    status = client.wait(job, timeout=60)
    assert status.state == "partial"
    codes = [item.error.code if item.error else None for item in status.items]
    assert codes == [None, "invalid_image", "not_found"]
    assert status.items[0].state == "succeeded"
    assert read_output(stack, status.items[0].output).mode == "RGBA"
    assert status.items[1].output is None
    # where the time went: the good item has every stage, inside its own duration
    good_item = status.items[0]
    stages = (good_item.fetch_ms, good_item.infer_ms, good_item.store_ms)
    assert all(v is not None and v > 0 for v in stages)
    assert sum(stages) <= good_item.duration_ms
    assert status.items[1].infer_ms is None and status.items[1].store_ms is None
    # the worker survived and serves the next job
    again = client.wait(client.submit(good, output="s3://outputs/run3b/"), timeout=60)
    assert again.state == "succeeded"
    assert stack["worker"].proc.poll() is None


class _ImageHandler(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_a_batch_window_holds_a_job_for_companions(stack, make_image, tmp_path):
    """With BEN2Q_BATCH_WINDOW_MS set, jobs reaching an idle worker within the window share
    one pass (without it, the first would run alone: the test above)."""
    env = {**stack["env"], "BEN2Q_BATCH_WINDOW_MS": "1000", "BEN2Q_QUEUE": "windowed"}
    worker = Worker(env, tmp_path / "windowed.log", "windowed")
    try:
        uris = [
            put(stack, f"window/{i}.png", png_bytes(make_image(50, 50, seed=60 + i)))
            for i in range(2)
        ]
        with Client(settings=settings_of(env)) as client:
            jobs = [client.submit(u, output="s3://outputs/window/") for u in uris]
            statuses = [client.wait(j, timeout=60) for j in jobs]
        assert [s.state for s in statuses] == ["succeeded", "succeeded"]
        assert [s.items[0].batch_size for s in statuses] == [2, 2]
        assert all(s.queue_wait_ms < 10_000 for s in statuses)
    finally:
        worker.stop()


def test_url_input_from_a_loopback_server(stack, client, engine, make_image):
    src = make_image(70, 55, seed=31)
    _ImageHandler.body = png_bytes(src)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shop/item.png?size=large"
        status = client.wait(client.submit(url, output="s3://outputs/run4/"), timeout=60)
    finally:
        server.shutdown()
    assert status.state == "succeeded", status
    assert status.items[0].output.endswith("/0000-item.png")
    assert_alpha_matches_engine(read_output(stack, status.items[0].output), src, engine)
    # the input's query (a presigned URL's signature, a token) is not copied beside the output
    bucket, key = status.items[0].output.removeprefix("s3://").split("/", 1)
    head = stack["s3"].head_object(Bucket=bucket, Key=key)
    assert head["Metadata"]["source"] == url.split("?")[0]


def test_several_single_jobs_share_a_forward_pass(stack, client, make_image):
    busy = [
        put(stack, f"many/busy{i}.png", png_bytes(make_image(400, 400, seed=i))) for i in range(8)
    ]
    uris = [
        put(stack, f"many/{i}.png", png_bytes(make_image(50, 50, seed=40 + i))) for i in range(4)
    ]
    lone = client.wait(client.submit(uris[0], output="s3://outputs/run5/"), timeout=60)
    assert lone.items[0].batch_size == 1  # an idle worker does not hold a lone job back
    blocker = client.submit_batch(busy, output="s3://outputs/run5/")  # keeps the model busy
    for status in client.events(blocker, timeout=60):
        if status.state == "running":
            break
    jobs = [client.submit(u, output="s3://outputs/run5/") for u in uris]
    statuses = [client.wait(j, timeout=60) for j in jobs]
    assert client.wait(blocker, timeout=60).state == "succeeded"
    assert all(s.state == "succeeded" for s in statuses)
    # they arrived while the model was busy, so they ran as one batched forward
    assert [s.items[0].batch_size for s in statuses] == [4, 4, 4, 4]
    assert len({s.items[0].infer_ms for s in statuses}) == 1  # the same engine pass
    starts = [s.started_at for s in statuses]
    assert max(starts) - min(starts) < 0.2  # begun together, in one flush


def test_cancel_a_running_batch(stack, client, make_image):
    uris = [
        put(stack, f"cancel/{i}.png", png_bytes(make_image(300, 300, seed=i))) for i in range(40)
    ]
    job = client.submit_batch(uris, output="s3://outputs/run6/")
    for status in client.events(job, timeout=60):
        if status.state == "running" and status.progress > 0:
            break
    client.cancel(job)
    final = client.wait(job, timeout=60)
    assert final.state == "cancelled"
    states = [item.state for item in final.items]
    assert "cancelled" in states and states.count("succeeded") < 40
    for item in final.items:  # what was done is really there
        if item.state == "succeeded":
            assert read_output(stack, item.output).mode == "RGBA"


def test_file_inputs_and_outputs_inside_the_local_root(stack, client, make_image):
    root: Path = stack["root"]
    src = make_image(45, 35, seed=51)
    (root / "in").mkdir()
    src.save(root / "in" / "local.png")
    job = client.submit(f"file://{root}/in/local.png", output=f"file://{root}/out/")
    status = client.wait(job, timeout=60)
    assert status.state == "succeeded"
    path = root / "out" / job.id / "0000-local.png"
    assert status.items[0].output == f"file://{path}"
    assert Image.open(path).size == (45, 35)
    with pytest.raises(InvalidRequest) as info:
        client.submit(f"file://{root}/../etc/passwd", output=f"file://{root}/out/")
    assert info.value.field == "input"


def test_async_client_mirrors_the_sync_one(stack, make_image):
    uri = put(stack, "async/x.png", png_bytes(make_image(33, 44, seed=61)))

    async def main():
        async with AsyncClient(settings=stack["settings"]) as ac:
            job = await ac.submit(uri, output="s3://outputs/run7/")
            seen = [s.state async for s in ac.events(job, timeout=60)]
            final = await ac.get(job)
            with pytest.raises(InvalidRequest):
                await ac.submit_batch([], output="s3://outputs/")
            return seen, final

    seen, final = asyncio.run(main())
    assert seen[-1] == "succeeded" and final.state == "succeeded"
    assert read_output(stack, final.items[0].output).size == (33, 44)


def test_cli_submit_wait_and_status(stack, make_image):
    uri = put(stack, "cli/y.png", png_bytes(make_image(41, 29, seed=71)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ben2q.cli",
            "submit",
            uri,
            "--output",
            "s3://outputs/run8/",
            "--wait",
            "--json",
        ],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["state"] == "succeeded"
    assert read_output(stack, status["items"][0]["output"]).size == (41, 29)
    again = subprocess.run(
        [sys.executable, "-m", "ben2q.cli", "status", status["id"]],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "succeeded" in again.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "ben2q.cli",
            "submit",
            "s3://inputs/cli/missing.png",
            "--output",
            "s3://outputs/run8/",
            "--wait",
        ],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1


def test_plain_celery_command_runs_jobs(stack, make_image, tmp_path):
    """`celery -A ben2q.worker worker` works as well as `ben2q worker`."""
    env = {**stack["env"], "BEN2Q_QUEUE": "plain-celery"}
    log = tmp_path / "celery.log"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "ben2q.worker",
            "worker",
            "-Q",
            "plain-celery",
            "-n",
            "plain@%h",
            "--loglevel",
            "INFO",
        ],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    worker = Worker.__new__(Worker)
    worker.proc, worker.log = proc, log
    try:
        worker.wait_ready()
        uri = put(stack, "plain/z.png", png_bytes(make_image(20, 20)))
        settings = stack["settings"].model_copy(update={"queue": "plain-celery"})
        with Client(settings=settings) as c:
            status = c.wait(c.submit(uri, output="s3://outputs/plain/"), timeout=60)
        assert status.state == "succeeded" and status.worker.startswith("plain@")
    finally:
        worker.stop()


class _FlakyHandler(BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests of a path, then the image."""

    body = b""
    failures = 2
    seen: dict[str, int] = {}

    def do_GET(self):  # noqa: N802
        n = self.seen[self.path] = self.seen.get(self.path, 0) + 1
        if self.path.startswith("/gone"):
            self.send_response(404)
            self.end_headers()
            return
        if n <= self.failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_transient_errors_are_retried_with_backoff_permanent_ones_not(stack, client, make_image):
    _FlakyHandler.body = png_bytes(make_image(30, 30, seed=81))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        flaky = client.wait(
            client.submit(f"{base}/flaky.png", output="s3://outputs/r9/"), timeout=90
        )
        gone = client.wait(client.submit(f"{base}/gone.png", output="s3://outputs/r9/"), timeout=60)
    finally:
        server.shutdown()
    assert flaky.state == "succeeded" and flaky.attempts == 3  # 503, 503, then the image
    assert _FlakyHandler.seen["/flaky.png"] == 3
    assert gone.state == "failed" and gone.attempts == 1
    assert gone.items[0].error.code == "fetch_failed"
    assert _FlakyHandler.seen["/gone.png"] == 1


# --- output options through real jobs ------------------------------------------------------


def bbox(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, width, height) of alpha >= 8, by numpy."""
    ys, xs = np.nonzero(alpha >= 8)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.floor(rgb * a + 255 * (1 - a) + 0.5).astype(np.uint8)


def box_of(item) -> tuple[int, int, int, int]:
    return item.box.left, item.box.top, item.box.width, item.box.height


def test_output_options_through_a_queue_job(stack, client, engine, make_image):
    src = make_image(160, 120, seed=81)
    uri = put(stack, "opts/shoe.png", png_bytes(src))
    job = client.submit(
        uri,
        "s3://outputs/opts/",
        background="white",
        format="jpg",
        quality=95,
        crop=True,
        crop_margin="10%",
        max_side=64,
        mask=True,
    )
    status = client.wait(job, timeout=60)
    assert status.state == "succeeded", status.items[0].error
    [item] = status.items
    assert item.output.endswith("0000-shoe.jpg") and item.format == "jpeg"
    key = item.output.split("/", 3)[3]
    head = stack["s3"].head_object(Bucket="outputs", Key=key)
    assert head["ContentType"] == "image/jpeg" and head["ContentLength"] == item.bytes
    out = read_output(stack, item.output)
    assert out.format == "JPEG" and out.size == (item.width, item.height)
    # independent: the engine's alpha, numpy's box and margins, numpy compositing on white,
    # then Pillow's Lanczos to 64 px on the longest side
    alpha = engine.predict([src])[0].alpha
    left, top, width, height = bbox(alpha)
    mx, my = int(np.floor(width / 10 + 0.5)), int(np.floor(height / 10 + 0.5))
    white = np.pad(
        on_white(np.asarray(src), alpha), ((my, my), (mx, mx), (0, 0)), constant_values=255
    )
    crop = white[top : top + height + 2 * my, left : left + width + 2 * mx]
    w, h = crop.shape[1], crop.shape[0]
    size = (
        (64, max(1, int(np.floor(h * 64 / w + 0.5))))
        if w >= h
        else (max(1, int(np.floor(w * 64 / h + 0.5))), 64)
    )
    assert out.size == size
    want = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(np.asarray(out).astype(int) - want).mean() < 4  # JPEG q95 and rounding
    matte = read_output(stack, item.mask)  # the output's own matte, for compositors
    assert matte.mode == "L" and matte.size == out.size
    assert box_of(item) == bbox(np.asarray(matte)) and item.subject is True


def test_jobs_with_different_options_share_a_forward_pass(stack, client, engine, make_image):
    busy = [
        put(stack, f"mix/busy{i}.png", png_bytes(make_image(400, 400, seed=i))) for i in range(8)
    ]
    srcs = [make_image(70, 50, seed=90 + i) for i in range(4)]
    uris = [put(stack, f"mix/{i}.png", png_bytes(s)) for i, s in enumerate(srcs)]
    backdrop = Image.fromarray(np.full((30, 90, 3), (20, 90, 200), np.uint8))
    bg_uri = put(stack, "mix/backdrop.png", png_bytes(backdrop))
    options = [
        {"channels": "alpha"},
        {"format": "webp"},
        {"background": bg_uri, "format": "png"},
        {"crop": True, "crop_margin": 3, "background": "#ff000080"},
    ]
    blocker = client.submit_batch(busy, output="s3://outputs/mix/")
    for status in client.events(blocker, timeout=60):
        if status.state == "running":
            break
    jobs = [client.submit(u, "s3://outputs/mix/", **o) for u, o in zip(uris, options, strict=True)]
    done = [client.wait(j, timeout=60) for j in jobs]
    assert client.wait(blocker, timeout=60).state == "succeeded"
    assert [s.state for s in done] == ["succeeded"] * 4
    assert [s.items[0].batch_size for s in done] == [4, 4, 4, 4]  # one forward pass
    alphas = [engine.predict([s])[0].alpha for s in srcs]
    outs = [read_output(stack, s.items[0].output) for s in done]
    assert outs[0].mode == "L" and np.abs(np.asarray(outs[0]).astype(int) - alphas[0]).max() <= 1
    assert outs[1].format == "WEBP" and outs[1].mode == "RGBA"
    assert_colours_kept(np.asarray(outs[1]), np.asarray(srcs[1]))
    assert outs[2].mode == "RGB" and done[2].items[0].format == "png"
    a = alphas[2][..., None] / 255  # a flat backdrop: covering it is the same flat colour
    want = np.floor(np.asarray(srcs[2]) * a + np.array([20, 90, 200]) * (1 - a) + 0.5)
    assert np.abs(np.asarray(outs[2]).astype(int) - want).max() <= 1
    left, top, width, height = bbox(alphas[3])
    assert outs[3].mode == "RGBA" and outs[3].size == (width + 6, height + 6)
    assert (np.asarray(outs[3])[..., 3] >= 128).all()  # everything lies over half-red
    assert box_of(done[3].items[0]) == (3, 3, width, height)


def test_a_missing_background_fails_the_item_with_its_code(stack, client, make_image):
    uri = put(stack, "opts/ok.png", png_bytes(make_image(40, 30, seed=3)))
    status = client.wait(
        client.submit(uri, "s3://outputs/opts/", background="s3://inputs/opts/nothing.png"),
        timeout=60,
    )
    assert status.state == "failed"
    error = status.items[0].error
    assert error.code == "not_found" and error.message.startswith("background: ")


def test_invalid_options_are_refused_before_enqueue(stack, client):
    import redis

    broker = redis.Redis.from_url(stack["settings"].broker_url)
    before = broker.llen(stack["settings"].queue)
    for fields, field in (
        ({"format": "jpeg"}, "format"),
        ({"crop": True, "crop_margin": "-2px"}, "crop_margin"),
        ({"background": "no-such-colour"}, "background"),
        ({"background": "file:///etc/backdrop.png"}, "background"),
    ):
        with pytest.raises(InvalidRequest) as info:
            client.submit("s3://inputs/opts/ok.png", "s3://outputs/opts/", **fields)
        assert info.value.field == field
    assert broker.llen(stack["settings"].queue) == before


def test_box_of_an_exif_rotated_input_is_upright(stack, client, engine, make_image):
    src = make_image(90, 40, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; upright is ``src``
    buf = io.BytesIO()
    src.transpose(Image.Transpose.ROTATE_90).save(buf, format="PNG", exif=exif)
    uri = put(stack, "opts/rotated.png", buf.getvalue())
    status = client.wait(client.submit(uri, "s3://outputs/opts/", crop=True), timeout=60)
    [item] = status.items
    assert status.state == "succeeded"
    left, top, width, height = bbox(engine.predict([src])[0].alpha)
    assert (item.width, item.height) == (width, height)
    assert box_of(item) == (0, 0, width, height)


def test_empty_and_full_subjects(stack, client, engine):
    """A 1×1 input's matte is one constant value v (no contrast to stretch): with
    ``mask_threshold=255`` it is empty, with ``mask_threshold=1`` full."""
    pixel = Image.new("RGB", (1, 1), (120, 80, 40))
    value = int(engine.predict([pixel])[0].alpha[0, 0])
    assert 1 <= value < 255
    uri = put(stack, "opts/pixel.png", png_bytes(pixel))
    empty = client.wait(
        client.submit(uri, "s3://outputs/opts/", crop=True, mask_threshold=255), timeout=60
    )
    [item] = empty.items
    assert empty.state == "succeeded" and item.subject is False and item.box is None
    assert (item.width, item.height) == (1, 1)  # uncropped, never zero-sized
    full = client.wait(
        client.submit(uri, "s3://outputs/opts/", crop=True, mask_threshold=1), timeout=60
    )
    assert full.items[0].subject is True and box_of(full.items[0]) == (0, 0, 1, 1)


OPTION_SETS = [
    {"scale": 0.5, "mask_smooth": True, "format": "auto"},
    {"mask_threshold": 100, "crop": True, "crop_margin": "20%", "background": "#336699"},
    {"max_side": 40, "channels": "alpha", "format": "webp"},
    {"background": "rgb(250, 250, 250)", "format": "png", "scale": 1.5},
]


def test_a_job_renders_exactly_what_the_library_renders(stack, client, engine, make_image):
    """Every entry point runs the one render step: a queue job's output decodes to the
    pixels ``ben2q.render`` makes from the engine's own prediction (lossless formats)."""
    from ben2q.jobs import job_options
    from ben2q.render import render

    src = make_image(90, 70, seed=33)
    uri = put(stack, "same/one.png", png_bytes(src))
    # the worker's own matte (a plain job's mask), so that float differences between this
    # process and the worker cannot blur the comparison: what is compared is rendering
    plain = client.wait(client.submit(uri, "s3://outputs/same/", mask=True), timeout=60)
    matte = np.asarray(read_output(stack, plain.items[0].mask))
    assert np.abs(matte.astype(int) - engine.predict([src])[0].alpha).max() <= 1
    pred = SimpleNamespace(rgb=np.asarray(src), alpha=matte)
    for fields in OPTION_SETS:
        status = client.wait(client.submit(uri, "s3://outputs/same/", **fields), timeout=60)
        [item] = status.items
        assert status.state == "succeeded", (fields, item.error)
        want = render(pred.rgb, pred.alpha, job_options(**fields))
        got = read_output(stack, item.output)
        assert (item.width, item.height, item.format) == (want.width, want.height, want.encoding)
        assert item.box == want.box and item.bytes == len(want.data)
        assert np.array_equal(np.asarray(got), np.asarray(Image.open(io.BytesIO(want.data))))


def test_webhook_only_workers_hold_their_messages_apart():
    """The hash of held messages: ``unacked`` for workers that run jobs (what KEDA counts),
    its own for a worker that consumes only webhook deliveries, or the setting's."""
    from ben2q.broker import held_options, unacked_key

    s = Settings(_env_file=None)
    assert unacked_key(s, ["ben2q", "ben2q-batch"]) == "unacked"
    assert unacked_key(s, ["ben2q-webhooks", "ben2q", "ben2q-batch"]) == "unacked"
    assert unacked_key(s, ["ben2q-webhooks"]) == "unacked:ben2q-webhooks"
    custom = Settings(_env_file=None, webhook_queue="hooks", unacked_key="held:x")
    assert unacked_key(custom, ["hooks"]) == "held:x"
    assert unacked_key(custom, ["ben2q"]) == "held:x"
    assert unacked_key(Settings(_env_file=None, webhook_queue="hooks"), ["hooks"]) == (
        "unacked:hooks"
    )
    assert held_options("unacked") == {
        "unacked_key": "unacked",
        "unacked_index_key": "unacked_index",
        "unacked_mutex_key": "unacked_mutex",
    }
    assert held_options("unacked:hooks") == {
        "unacked_key": "unacked:hooks",
        "unacked_index_key": "unacked:hooks:index",
        "unacked_mutex_key": "unacked:hooks:mutex",
    }
