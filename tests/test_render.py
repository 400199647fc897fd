"""The rendering step (``ben2q.render``) against independent computations: numpy
compositing (exact integers or ``fractions``), numpy bounding boxes and slices, Pillow's
float ("F") resampling of premultiplied planes, and decoders for every format. Then the
adapter, which renders through the same step."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from ben2q import BEN2BackgroundRemoverAdapter
from ben2q.errors import ImageTooLarge, InvalidRequest
from ben2q.jobs import job_options, make_request
from ben2q.render import SUBJECT_ALPHA, compose, render, smooth_matte
from ben2q.render.matte import speck_pixels

H, W = 90, 120


def scene(seed: int = 0, height: int = H, width: int = W) -> tuple[np.ndarray, np.ndarray]:
    """Random colours and a soft disc matte off-centre, with a zero border around it."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    r = np.hypot(yy - 0.45 * height, xx - 0.6 * width)
    alpha = np.clip((0.3 * min(height, width) - r) * 40, 0, 255).astype(np.uint8)
    return rgb, alpha


def bbox(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, width, height) of alpha >= 8, by numpy's nonzero."""
    ys, xs = np.nonzero(alpha >= 8)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def hidden(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What files hold: colours zeroed under fully transparent pixels (numpy's where)."""
    return np.where(alpha[..., None] == 0, 0, rgb).astype(np.uint8)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def over(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The reference: sRGB straight-alpha "over" an opaque background, in float64."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.floor(fg * a + bg * (1 - a) + 0.5).astype(np.uint8)


# --- defaults, colours, images ------------------------------------------------------------


def test_defaults_keep_the_cut_out_as_it_is():
    rgb, alpha = scene()
    out = render(rgb, alpha, job_options())
    assert out.mode == "RGBA" and out.encoding == "png" and (out.width, out.height) == (W, H)
    img = decode(out.data)
    assert img.format == "PNG" and img.mode == "RGBA"
    assert np.array_equal(np.asarray(img), np.dstack([hidden(rgb, alpha), alpha]))
    assert np.array_equal(np.asarray(out.image()), np.dstack([rgb, alpha]))  # as composed
    assert (out.box.left, out.box.top, out.box.width, out.box.height) == bbox(alpha)


@pytest.mark.parametrize("color,value", [("white", (255, 255, 255)), ("#1e90ff", (30, 144, 255))])
def test_opaque_colour_matches_numpy_compositing_exactly(color, value):
    rgb, alpha = scene(1)
    out = render(rgb, alpha, job_options(background=color))
    assert out.mode == "RGB"
    got = np.asarray(decode(out.data))  # PNG: lossless
    bg = np.broadcast_to(np.asarray(value, np.float64), rgb.shape)
    assert np.array_equal(got, over(rgb.astype(np.float64), alpha, bg))


def test_semi_transparent_colour_is_porter_duff_over_exactly():
    rgb, alpha = scene(2)
    color = (200, 40, 10, 96)
    out = render(rgb, alpha, job_options(background="#c8280a60"))
    got = np.asarray(decode(out.data))
    assert out.mode == "RGBA" and got.shape == (H, W, 4)
    rng = np.random.default_rng(0)
    for y, x in zip(rng.integers(0, H, 400), rng.integers(0, W, 400), strict=True):
        a, b = Fraction(int(alpha[y, x]), 255), Fraction(color[3], 255)
        ao = a + b * (1 - a)
        assert got[y, x, 3] == math.floor(ao * 255 + Fraction(1, 2))
        for c in range(3):
            want = 0 if ao == 0 else (rgb[y, x, c] * a + color[c] * b * (1 - a)) / ao
            assert got[y, x, c] == math.floor(want + Fraction(1, 2)), (y, x, c)


def test_background_image_covers_the_output_centred():
    rgb, alpha = scene(3)
    rng = np.random.default_rng(7)
    # a smooth backdrop twice as wide as the output's aspect: covering crops its sides
    gx = np.linspace(0, 255, 400)[None, :, None]
    gy = np.linspace(0, 255, 100)[:, None, None]
    backdrop = np.concatenate(
        [
            np.broadcast_to(gx, (100, 400, 1)),
            np.broadcast_to(gy, (100, 400, 1)),
            np.full((100, 400, 1), 90.0),
        ],
        axis=2,
    ).astype(np.uint8)
    bg_img = Image.fromarray(backdrop)
    opts = job_options(background="s3://bucket/backdrop.png")
    out = render(rgb, alpha, opts, background=bg_img)
    assert out.mode == "RGB" and out.encoding == "png"
    # independent: scale to cover (height 100 -> 90: factor 0.9, width 400 -> 360),
    # then take the centre 120 columns
    scaled = np.asarray(bg_img.resize((360, 90), Image.Resampling.LANCZOS)).astype(np.float64)
    centre = scaled[:, 120:240]
    want = over(rgb.astype(np.float64), alpha, centre)
    diff = np.abs(np.asarray(decode(out.data)).astype(int) - want)
    assert diff.mean() < 1.0 and diff.max() <= 6  # fit crops before resampling: sub-pixel
    del rng


def test_background_image_must_be_given_when_the_options_name_one():
    rgb, alpha = scene()
    with pytest.raises(ValueError, match="background"):
        compose(rgb, alpha, job_options(background="https://example.com/bg.jpg"))


# --- formats ------------------------------------------------------------------------------


def test_jpeg_on_white_decodes_close_to_the_composite():
    rgb, alpha = scene(4)
    rgb[:] = 120  # flat colours: JPEG error is then about the edges only
    out = render(rgb, alpha, job_options(background="white", format="jpg", quality=95))
    img = decode(out.data)
    assert img.format == "JPEG" and img.mode == "RGB" and out.encoding == "jpeg"
    want = over(rgb.astype(np.float64), alpha, np.full_like(rgb, 255, dtype=np.float64))
    assert np.abs(np.asarray(img).astype(int) - want).mean() < 2.0


def test_auto_is_jpeg_when_opaque_and_png_otherwise():
    rgb, alpha = scene()
    assert render(rgb, alpha, job_options(format="auto", background="white")).encoding == "jpeg"
    transparent = render(rgb, alpha, job_options(format="auto", background="#ffffff80"))
    assert transparent.encoding == "png" and decode(transparent.data).mode == "RGBA"
    assert render(rgb, alpha, job_options(format="auto")).encoding == "png"
    assert render(rgb, alpha, job_options(format="auto", channels="alpha")).encoding == "png"


def test_lossless_webp_keeps_every_value_and_lossy_webp_is_close():
    rgb, alpha = scene(5)
    lossless = decode(render(rgb, alpha, job_options(format="webp")).data)
    assert lossless.format == "WEBP"
    assert np.array_equal(
        np.asarray(lossless.convert("RGBA")), np.dstack([hidden(rgb, alpha), alpha])
    )
    smooth = np.full_like(rgb, 90)
    lossy = render(smooth, alpha, job_options(format="webp", quality=90))
    got = np.asarray(decode(lossy.data).convert("RGBA")).astype(int)
    assert np.abs(got[..., 3] - alpha).mean() < 3.0
    assert b"VP8 " in lossy.data and b"VP8L" not in lossy.data  # the lossy bitstream
    noisy = render(rgb, alpha, job_options(format="webp", quality=50))
    assert len(noisy.data) < len(render(rgb, alpha, job_options(format="webp")).data) / 2


def test_alpha_channel_alone_is_the_matte_in_grayscale():
    rgb, alpha = scene(6)
    out = render(rgb, alpha, job_options(channels="alpha"))
    img = decode(out.data)
    assert out.mode == "L" and img.mode == "L" and np.array_equal(np.asarray(img), alpha)


# --- crop, margins, empty and full subjects ------------------------------------------------


@pytest.mark.parametrize("margin", ["0px", "7px", "10%", 25])
def test_crop_is_the_numpy_box_plus_margin_zero_padded(margin):
    rgb, alpha = scene(7)
    left, top, width, height = bbox(alpha)
    opts = job_options(crop=True, crop_margin=margin)
    amount, percent = opts.margin
    mx = math.floor(amount * width / 100 + 0.5) if percent else int(amount)
    my = math.floor(amount * height / 100 + 0.5) if percent else int(amount)
    # independent: pad the RGBA image with zeros by the margin on every side, then slice
    pad = max(mx, my)
    rgba = np.pad(np.dstack([hidden(rgb, alpha), alpha]), ((pad, pad), (pad, pad), (0, 0)))
    want = rgba[top + pad - my : top + pad + height + my, left + pad - mx : left + pad + width + mx]
    out = render(rgb, alpha, opts)
    assert np.array_equal(np.asarray(decode(out.data)), want)
    assert (out.box.left, out.box.top, out.box.width, out.box.height) == (mx, my, width, height)


def test_a_margin_beyond_the_image_is_transparent_or_the_background():
    rgb, alpha = scene(8)
    alpha[:] = 0
    alpha[0:10, 0:10] = 255  # the subject touches the top-left corner
    out = render(rgb, alpha, job_options(crop=True, crop_margin=5))
    got = np.asarray(decode(out.data))
    assert got.shape == (20, 20, 4) and not got[:5].any() and not got[:, :5].any()
    white = np.asarray(
        decode(render(rgb, alpha, job_options(crop=True, crop_margin=5, background="white")).data)
    )
    assert white.shape == (20, 20, 3) and (white[:5] == 255).all()


def test_empty_subject_is_flagged_and_never_cropped_to_nothing():
    rgb, _ = scene(9)
    faint = np.full((H, W), SUBJECT_ALPHA - 1, np.uint8)
    out = render(rgb, faint, job_options(crop=True, crop_margin="10%"))
    assert out.box is None and out.subject is False
    assert (out.width, out.height) == (W, H)  # the whole image, documented
    assert np.array_equal(np.asarray(decode(out.data))[..., 3], faint)


def test_full_subject_box_is_the_whole_image():
    rgb, _ = scene(10)
    out = render(rgb, np.full((H, W), 255, np.uint8), job_options(crop=True))
    assert out.subject and out.box.model_dump() == {"left": 0, "top": 0, "width": W, "height": H}


def test_an_output_over_the_pixel_limit_is_refused_before_it_is_made():
    rgb, alpha = scene()
    with pytest.raises(ImageTooLarge):
        compose(rgb, alpha, job_options(crop=True, crop_margin=5000), max_pixels=10_000_000)
    with pytest.raises(ImageTooLarge):
        compose(rgb, alpha, job_options(scale=4.0), max_pixels=W * H * 4)


# --- resize ------------------------------------------------------------------------------


def premultiplied_lanczos(rgb, alpha, size):
    """Independent: each premultiplied channel and alpha resampled as float planes."""
    a = alpha.astype(np.float32)
    planes = [Image.fromarray(rgb[..., c].astype(np.float32) * a / 255, "F") for c in range(3)]
    planes.append(Image.fromarray(a, "F"))
    out = [np.asarray(p.resize(size, Image.Resampling.LANCZOS)) for p in planes]
    alpha_out = np.clip(out[3], 0, 255)
    with np.errstate(invalid="ignore", divide="ignore"):
        colour = np.stack([np.clip(c * 255 / alpha_out, 0, 255) for c in out[:3]], axis=-1)
    return colour, alpha_out


@pytest.mark.parametrize(
    "fields,size",
    [
        ({"max_side": 60}, (60, 45)),
        ({"scale": 0.5}, (60, 45)),
        ({"scale": 1.5}, (180, 135)),
        ({"max_side": 500}, (W, H)),
    ],
)
def test_resize_is_premultiplied_lanczos_keeping_aspect(fields, size):
    _, alpha = scene(11)
    yy, xx = np.mgrid[0:H, 0:W]  # smooth colours: Lanczos on noise is ringing, not colour
    rgb = np.stack([xx * 2, yy * 2, np.full_like(xx, 200)], axis=-1).astype(np.uint8)
    out = render(rgb, alpha, job_options(**fields))
    got = np.asarray(decode(out.data)).astype(np.float64)
    assert got.shape[:2] == (size[1], size[0])
    if size == (W, H):
        assert np.array_equal(got, np.dstack([hidden(rgb, alpha), alpha]))
        return
    colour, a = premultiplied_lanczos(rgb, alpha, size)
    assert np.abs(got[..., 3] - a).max() <= 2.0  # 8-bit passes vs float planes
    solid = a > 128  # colours of nearly transparent pixels are ill-conditioned
    assert np.abs(got[..., :3][solid] - colour[solid]).max() <= 4.0  # 8-bit RGBa passes
    assert (out.box.left, out.box.top, out.box.width, out.box.height) == bbox(got[..., 3])


def test_crop_then_resize_reports_the_box_of_the_final_matte():
    rgb, alpha = scene(12, 300, 400)
    out = render(
        rgb,
        alpha,
        job_options(
            crop=True, crop_margin="10%", max_side=64, background="white", format="png", mask=True
        ),
    )
    assert max(out.width, out.height) == 64
    assert (out.box.left, out.box.top, out.box.width, out.box.height) == bbox(out.alpha)
    assert decode(out.data).size == (out.width, out.height)


# --- matte clean-up ------------------------------------------------------------------------


def test_threshold_makes_the_matte_binary():
    rgb, alpha = scene(13)
    out = render(rgb, alpha, job_options(mask_threshold=128, channels="alpha"))
    assert np.array_equal(np.asarray(decode(out.data)), np.where(alpha >= 128, 255, 0))


def test_smooth_clears_specks_and_fills_pinholes_and_nothing_else():
    h, w = 200, 200
    limit = speck_pixels(h, w)  # 20 pixels at 0.05 % of 40,000
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.clip((60 - np.hypot(yy - 100, xx - 100)) * 60, 0, 255).astype(np.uint8)
    alpha[10:13, 10:13] = 200  # a speck of 9 pixels
    alpha[12, 190] = 30  # a faint one-pixel speck
    alpha[170:180, 10:20] = 255  # 100 pixels: not a speck
    alpha[95:98, 95:98] = 0  # a pinhole of 9 pixels in the disc
    alpha[120:130, 80:90] = 0  # a hole of 100 pixels: a real one
    out = smooth_matte(alpha)
    assert limit == 20
    assert not out[10:13, 10:13].any() and out[12, 190] == 0
    assert (out[170:180, 10:20] == 255).all()
    assert (out[95:98, 95:98] == 255).all()
    assert not out[120:130, 80:90].any()
    untouched = np.ones_like(alpha, bool)
    for ys, xs in (
        (slice(10, 13), slice(10, 13)),
        (slice(12, 13), slice(190, 191)),
        (slice(95, 98), slice(95, 98)),
    ):
        untouched[ys, xs] = False
    assert np.array_equal(out[untouched], alpha[untouched])  # soft edges stay soft


def test_smooth_keeps_a_lone_small_subject():
    alpha = np.zeros((200, 200), np.uint8)
    alpha[50:53, 50:53] = 255  # the only blob, however small, is the subject
    assert np.array_equal(smooth_matte(alpha), alpha)


def test_clean_up_comes_before_the_box_and_the_crop():
    rgb, alpha = scene(14, 200, 200)
    alpha[0:3, 0:3] = 255  # a speck in the corner widens the box unless cleared
    assert render(rgb, alpha, job_options(crop=True)).box.left == 0
    out = render(rgb, alpha, job_options(crop=True, mask_smooth=True))
    cleaned = smooth_matte(alpha)
    assert (out.width, out.height) == bbox(cleaned)[2:]


# --- options: the rules, naming the field --------------------------------------------------


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"format": "jpeg"}, "format"),
        ({"format": "jpg", "background": "#ffffff80"}, "format"),
        ({"format": "jpeg", "channels": "alpha"}, "format"),
        ({"crop": True, "crop_margin": -5}, "crop_margin"),
        ({"crop": True, "crop_margin": "-5%"}, "crop_margin"),
        ({"crop": True, "crop_margin": "150%"}, "crop_margin"),
        ({"crop": True, "crop_margin": "5em"}, "crop_margin"),
        ({"crop": True, "crop_margin": True}, "crop_margin"),
        ({"crop_margin": "5%"}, "crop_margin"),
        ({"background": "notacolour"}, "background"),
        ({"background": "ftp://host/bg.png"}, "background"),
        ({"channels": "alpha", "background": "white"}, "background"),
        ({"quality": 80}, "quality"),
        ({"quality": 0, "format": "webp"}, "quality"),
        ({"channels": "alpha", "format": "webp", "quality": 80}, "quality"),
        ({"max_side": 100, "scale": 0.5}, "scale"),
        ({"scale": 0}, "scale"),
        ({"scale": 5}, "scale"),
        ({"max_side": 0}, "max_side"),
        ({"mask_threshold": 0}, "mask_threshold"),
        ({"format": "gif"}, "format"),
        ({"channels": "rgb"}, "channels"),
        ({"bg_color": "white"}, "bg_color"),
    ],
)
def test_invalid_options_name_their_field(fields, field):
    with pytest.raises(InvalidRequest) as info:
        job_options(**fields)
    assert info.value.field == field and info.value.code == "invalid_request"


def test_option_spellings_users_type():
    assert job_options(format="JPG", background="White").encoding == "jpeg"
    assert job_options(background="transparent").background is None
    assert job_options(background="none").background is None
    assert job_options(crop=True, crop_margin=" 5 % ").crop_margin == "5%"
    assert job_options(crop=True, crop_margin=12).crop_margin == "12px"
    assert job_options(background="rgb(10, 20, 30)").background_color == (10, 20, 30, 255)
    assert job_options(background="#0a141e80").background_color == (10, 20, 30, 128)


def test_a_file_background_must_lie_in_the_local_root():
    with pytest.raises(InvalidRequest) as info:
        make_request(
            "single",
            ["s3://bucket/a.jpg"],
            "s3://bucket/out/",
            background="file:///etc/backdrop.png",
            local_root="/data",
        )
    assert info.value.field == "background"
    ok = make_request(
        "single",
        ["s3://bucket/a.jpg"],
        "s3://bucket/out/",
        background="file:///data/backdrop.png",
        local_root="/data",
    )
    assert ok.options.background_uri == "file:///data/backdrop.png"


# --- the adapter renders through the same step ---------------------------------------------


@pytest.fixture(scope="module")
def adapter():
    return BEN2BackgroundRemoverAdapter(device="cpu", model_spec="tiny")


def test_adapter_options_are_the_render_step(adapter, make_image):
    src = make_image(90, 70, seed=3)
    [plain] = adapter.remove_background(src)
    rgba = np.asarray(plain)
    [white] = adapter.remove_background(src, background="white", crop=True, crop_margin=4)
    left, top, width, height = bbox(rgba[..., 3])
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    want = over(rgb.astype(np.float64), alpha, np.full_like(rgb, 255, dtype=np.float64))
    padded = np.pad(want, ((4, 4), (4, 4), (0, 0)), constant_values=255)
    assert white.mode == "RGB"
    assert np.array_equal(
        np.asarray(white), padded[top : top + height + 8, left : left + width + 8]
    )
    out = adapter.render(src, format="jpeg", background="white")
    assert out.encoding == "jpeg" and decode(out.data).size == (90, 70)
    [matte] = adapter.remove_background_batch([src, src], channels="alpha")[:1]
    assert matte.mode == "L" and np.array_equal(np.asarray(matte), alpha)
    with pytest.raises(InvalidRequest):
        adapter.remove_background(src, format="jpeg")


def test_adapter_box_is_in_upright_coordinates(adapter, make_image, tmp_path):
    src = make_image(60, 24, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90° clockwise
    rotated = tmp_path / "rot.png"
    src.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif)
    upright = tmp_path / "up.png"
    src.save(upright)
    a = adapter.render(str(rotated), crop=True)
    b = adapter.render(str(upright), crop=True)
    assert a.box == b.box and (a.width, a.height) == (b.width, b.height)
    assert np.array_equal(np.asarray(decode(a.data)), np.asarray(decode(b.data)))


# --- any valid combination ------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPTION_VALUES = {
    "format": st.sampled_from(["png", "webp", "jpeg", "auto", "jpg"]),
    "quality": st.none() | st.integers(1, 100),
    "background": st.sampled_from([None, "white", "#00000000", "#12345680", "navy"]),
    "channels": st.sampled_from(["rgba", "alpha"]),
    "crop": st.booleans(),
    "crop_margin": st.sampled_from(["0px", "3px", 7, "10%", "100%"]),
    "max_side": st.none() | st.integers(1, 80),
    "scale": st.none() | st.floats(0.05, 2.0),
    "mask_threshold": st.none() | st.integers(1, 255),
    "mask_smooth": st.booleans(),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.fixed_dictionaries({}, optional=OPTION_VALUES),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
)
def test_every_valid_combination_renders_what_its_record_says(fields, shape, seed):
    try:
        opts = job_options(**fields)
    except InvalidRequest as exc:  # an invalid combination: refused, naming a real field
        assert exc.field in OPTION_VALUES
        return
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    alpha = rng.choice(np.array([0, 3, 8, 128, 255], np.uint8), size=shape)
    out = render(rgb, alpha, opts)
    img = decode(out.data)
    assert img.size == (out.width, out.height) and out.width >= 1 and out.height >= 1
    assert img.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[out.encoding]
    assert out.alpha.shape == (out.height, out.width)
    if out.encoding != "jpeg" and out.mode == "L":
        assert np.array_equal(np.asarray(img.convert("L")), out.alpha)  # WebP stores gray as RGB
    want = None if not (out.alpha >= 8).any() else bbox(out.alpha)
    got = None if out.box is None else (out.box.left, out.box.top, out.box.width, out.box.height)
    assert got == want and out.subject == (want is not None)


def test_opaque_compositing_is_exact_for_every_value():
    """Every (foreground, alpha) pair over several backgrounds: the integer formula."""
    fg = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
    a = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
    rgb = np.dstack([fg, fg, fg])
    for value in (0, 1, 127, 128, 254, 255):
        out = render(rgb, a, job_options(background=f"rgb({value}, {value}, {value})"))
        want = (fg.astype(int) * a + value * (255 - a.astype(int)) + 127) // 255
        assert np.array_equal(np.asarray(decode(out.data))[..., 0], want), value


def test_files_never_carry_the_removed_background():
    rgb, alpha = scene(15)
    assert (alpha == 0).any() and rgb[alpha == 0].any()
    for fields in ({}, {"format": "webp"}, {"format": "webp", "quality": 90}, {"crop": True}):
        out = decode(render(rgb, alpha, job_options(**fields)).data).convert("RGBA")
        rgba = np.asarray(out)
        under = rgba[..., :3][rgba[..., 3] == 0].astype(int)
        if "quality" in fields:  # lossy: the codec's ringing from the subject, not the input
            original = rgb[alpha == 0].astype(int).ravel()
            assert abs(np.corrcoef(under.ravel(), original)[0, 1]) < 0.2, fields
        else:
            assert not under.any(), fields


def test_the_readmes_pictures_are_what_render_makes_today():
    """docs/pictures/ (the README's before/after table) regenerated through ben2q.render
    and compared pixel by pixel: a change of behaviour must come with new pictures."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, str(root / "scripts" / "make_pictures.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
