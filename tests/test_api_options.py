"""Output options through the served HTTP API (a real ``ben2q api`` process, worker,
Redis and S3 server): query, form and JSON fields, the remove.bg-style foreground headers,
and refusals before enqueue that name the field. Expected pixels are computed here, from
the engine's alpha, with numpy and Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
from apistack import problem, wait_done
from PIL import Image
from stack import png_bytes

from ben2q.config import Settings
from ben2q.engine import Engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(settings=Settings(model_spec="tiny", device="cpu"))


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def bbox(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha >= 8)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def foreground(headers) -> tuple[int, int, int, int]:
    return tuple(int(headers[f"x-foreground-{k}"]) for k in ("left", "top", "width", "height"))


def test_remove_on_white_as_jpeg_cropped_with_foreground_headers(api_stack, engine, make_image):
    key, token = api_stack.key("options-remove")
    src = make_image(120, 90, seed=5)
    alpha = engine.predict([src])[0].alpha
    left, top, width, height = bbox(alpha)
    with api_stack.client(token) as http:
        answer = http.post(
            "/v1/remove",
            files={"file": ("shoe.png", png_bytes(src), "image/png")},
            data={
                "background": "white",
                "format": "jpg",
                "quality": "98",
                "crop": "true",
                "crop_margin": "6px",
            },
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/jpeg"
        assert answer.headers["x-subject"] == "true"
        assert foreground(answer.headers) == (6, 6, width, height)
        out = decode(answer.content)
        assert out.format == "JPEG" and out.size == (width + 12, height + 12)
        assert (answer.headers["x-width"], answer.headers["x-height"]) == (
            str(width + 12),
            str(height + 12),
        )
        a = alpha[..., None] / 255
        white = np.floor(np.asarray(src) * a + 255 * (1 - a) + 0.5)
        white = np.pad(white, ((6, 6), (6, 6), (0, 0)), constant_values=255)
        want = white[top : top + height + 12, left : left + width + 12]
        assert np.abs(np.asarray(out).astype(int) - want).mean() < 3  # JPEG q98, 4:2:0 chroma
        record = http.get(f"/v1/jobs/{answer.headers['x-job-id']}").json()
        [item] = record["items"]
        assert record["options"]["background"] == "white" and record["options"]["crop"] is True
        assert item["format"] == "jpeg" and item["bytes"] == len(answer.content)
        assert item["box"] == {"left": 6, "top": 6, "width": width, "height": height}


def test_remove_alpha_only_from_the_query_on_a_raw_body(api_stack, engine, make_image):
    key, token = api_stack.key("options-alpha")
    src = make_image(100, 60, seed=6)
    alpha = engine.predict([src])[0].alpha
    with api_stack.client(token) as http:
        answer = http.post(
            "/v1/remove?channels=alpha&max_side=50",
            content=png_bytes(src),
            headers={"Content-Type": "image/png"},
        )
        assert answer.status_code == 200, answer.text
        out = decode(answer.content)
        assert answer.headers["content-type"] == "image/png" and out.mode == "L"
        assert out.size == (50, 30)
        want = np.asarray(Image.fromarray(alpha).resize((50, 30), Image.Resampling.LANCZOS))
        assert np.abs(np.asarray(out).astype(int) - want).max() <= 1


def test_jobs_json_with_a_background_image_in_the_keys_scope(api_stack, engine, make_image):
    key, token = api_stack.key("options-jobs")
    src = make_image(80, 60, seed=7)
    uri = api_stack.put(f"{key.id}/in.png", png_bytes(src))
    backdrop = api_stack.put(
        f"{key.id}/backdrop.png", png_bytes(Image.new("RGB", (40, 40), (10, 200, 30)))
    )
    with api_stack.client(token) as http:
        created = http.post(
            "/v1/jobs",
            json={"input": uri, "background": backdrop, "format": "webp", "mask": True},
        )
        assert created.status_code == 202, created.text
        record = wait_done(http, created.json()["id"])
        [item] = record["items"]
        assert record["state"] == "succeeded" and item["format"] == "webp"
        assert item["output"].endswith(".webp") and item["subject"] is True
        out = decode(api_stack.read(item["output"]))
        assert (
            out.format == "WEBP"
            and out.mode == "RGB"
            and len(api_stack.read(item["output"])) == item["bytes"]
        )
        a = engine.predict([src])[0].alpha[..., None] / 255
        want = np.floor(np.asarray(src) * a + np.array([10, 200, 30]) * (1 - a) + 0.5)
        assert np.abs(np.asarray(out).astype(int) - want).max() <= 1  # lossless WebP
        matte = decode(api_stack.read(item["mask"]))
        assert matte.mode == "L" and tuple(item["box"].values()) == bbox(np.asarray(matte))


@pytest.mark.parametrize(
    "body,pointer",
    [
        ({"format": "jpeg"}, "/format"),
        ({"crop": True, "crop_margin": "-5px"}, "/crop_margin"),
        ({"crop_margin": "5%"}, "/crop_margin"),
        ({"background": "notacolour"}, "/background"),
        ({"channels": "alpha", "background": "white"}, "/background"),
        ({"max_side": 100, "scale": 0.5}, "/scale"),
        ({"quality": 80}, "/quality"),
        ({"scale": 9}, "/scale"),
    ],
)
def test_invalid_options_are_refused_naming_the_field(api_stack, body, pointer):
    key, token = api_stack.key("options-bad")
    uri = f"s3://api-in/{key.id}/in.png"
    with api_stack.client(token) as http:
        problem(http.post("/v1/jobs", json={"input": uri, **body}), 422, "invalid_request", pointer)
        form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items()}
        problem(
            http.post("/v1/remove", files={"file": ("x.png", b"\x89PNG")}, data=form),
            422,
            "invalid_request",
            pointer,
        )
        assert http.get("/v1/jobs").json()["jobs"] == []  # nothing was enqueued


def test_options_in_the_query_are_checked_with_the_body(api_stack, make_image):
    key, token = api_stack.key("options-query")
    data = png_bytes(make_image(20, 20, seed=1))
    with api_stack.client(token) as http:
        # the query alone is fine; with the body's format it is not
        problem(
            http.post(
                "/v1/remove?background=%23ffffff80",
                content=data,
                headers={"Content-Type": "image/png"},
                params={"format": "jpeg"},
            ),
            422,
            "invalid_request",
            "/format",
        )
        answer = http.post(
            "/v1/remove?max_side=0", content=data, headers={"Content-Type": "image/png"}
        )
        assert answer.status_code == 422, answer.text
        assert http.get("/v1/jobs").json()["jobs"] == []


def test_a_background_outside_the_keys_scope_is_forbidden(api_stack):
    key, token = api_stack.key("options-scope")
    other = api_stack.put("someone-else/backdrop.png", b"x", bucket="api-other")
    with api_stack.client(token) as http:
        body = problem(
            http.post(
                "/v1/jobs",
                json={"input": f"s3://api-in/{key.id}/x.png", "background": other},
            ),
            403,
            "forbidden",
            "/background",
        )
        assert body["detail"].startswith("background: this key may read")
        assert http.get("/v1/jobs").json()["jobs"] == []
