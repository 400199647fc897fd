"""The OpenTryOn-compatible adapter on the tiny spec."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from ben2q import BEN2BackgroundRemoverAdapter
from ben2q.config import Settings
from ben2q.errors import BatchFailed, InvalidImage


@pytest.fixture(scope="module")
def adapter():
    return BEN2BackgroundRemoverAdapter(device="cpu", model_spec="tiny")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_works_on_the_class_without_a_model(make_image, tmp_path):
    src = make_image(40, 30)
    path = tmp_path / "x.png"
    src.save(path)
    got = BEN2BackgroundRemoverAdapter.load_image(str(path))
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(src))


def test_remove_background_returns_one_rgba_image(adapter, make_image, tmp_path):
    src = make_image(90, 70, seed=3)
    path = tmp_path / "in.png"
    src.save(path)
    for given in (
        str(path),
        path,
        _png(src),
        io.BytesIO(_png(src)),
        src,
        base64.b64encode(_png(src)).decode(),
    ):
        out = adapter.remove_background(given)
        assert isinstance(out, list) and len(out) == 1
        assert out[0].mode == "RGBA" and out[0].size == (90, 70)
    direct = adapter.engine.predict([src])[0].alpha
    assert np.array_equal(np.asarray(adapter.remove_background(src)[0])[..., 3], direct)


def test_exif_rotated_photo_comes_out_upright(adapter, make_image, tmp_path):
    src = make_image(60, 20, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    src.save(path, format="JPEG", exif=exif, quality=95)
    out = adapter.remove_background(str(path))[0]
    assert out.size == (20, 60)


def test_batch_matches_single_calls(adapter, make_image):
    images = [make_image(50 + 10 * i, 40, seed=i) for i in range(3)]
    batch = adapter.remove_background_batch(images)
    assert [o.size for o in batch] == [im.size for im in images]
    for img, out in zip(images, batch, strict=True):
        single = adapter.remove_background(img)[0]
        diff = np.abs(np.asarray(out, dtype=int) - np.asarray(single, dtype=int))
        assert diff.max() <= 1


def test_a_bad_item_fails_alone(adapter, make_image, tmp_path):
    good = make_image(30, 30)
    with pytest.raises(BatchFailed) as info:
        adapter.remove_background_batch([good, b"not an image", str(tmp_path / "missing.png")])
    err = info.value
    assert err.code == "partial" and set(err.errors) == {1, 2}
    assert err.errors[1].code == "invalid_image"
    assert isinstance(err.results[0], Image.Image) and err.results[0].size == (30, 30)
    results = adapter.remove_background_batch([b"", good], errors="return")
    assert isinstance(results[0], InvalidImage) and results[1].mode == "RGBA"
    with pytest.raises(TypeError):
        adapter.remove_background_batch("one.png")


def test_refine_keeps_alpha(adapter, make_image):
    src = make_image(80, 80, seed=9)
    plain = np.asarray(adapter.remove_background(src)[0])
    refined = np.asarray(adapter.remove_background(src, refine=True)[0])
    assert np.array_equal(plain[..., 3], refined[..., 3])
    assert not np.array_equal(plain[..., :3], refined[..., :3])


def test_settings_limits_apply_to_the_adapter(make_image):
    small = BEN2BackgroundRemoverAdapter(
        device="cpu", model_spec="tiny", settings=Settings(max_image_pixels=1000)
    )
    with pytest.raises(InvalidImage) as info:
        small.remove_background(make_image(50, 50))
    assert info.value.code == "image_too_large"
