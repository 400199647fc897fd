"""Tests of ben2q.imageio: every kind of source, the limits, errors, EXIF, modes and ICC.

All images are made here with Pillow; the only network traffic is to a loopback server.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, UnidentifiedImageError, features

from ben2q.config import Settings
from ben2q.errors import ForbiddenURL, ImageTooLarge, InvalidImage
from ben2q.imageio import configure_pillow, decode_image, load_image

DEFAULT = Settings()

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def gradient(width: int = 24, height: int = 16) -> np.ndarray:
    """A test pattern where every pixel differs, so any flip or shift is visible."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 10, y * 15, (x + y) * 5 + 3], axis=-1).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


SOURCE = gradient()
PNG = encode(Image.fromarray(SOURCE))


def assert_rgb_equal(img: Image.Image, expected: np.ndarray, tolerance: int = 0) -> None:
    assert img.mode == "RGB"
    assert img.size == (expected.shape[1], expected.shape[0])
    diff = np.abs(np.asarray(img).astype(int) - expected.astype(int))
    assert diff.max() <= tolerance, diff.max()


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width`` x ``height`` (a bomb header)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


class ReadOnly:
    """A file-like object with nothing but ``read()``."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._buf.read(size)


# --------------------------------------------------------------------------------------
# A loopback server for the http source
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = PNG if self.path == "/image.png" else b"not an image at all"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


PRIVATE = Settings(allow_private_urls=True, fetch_timeout=5.0)

# --------------------------------------------------------------------------------------
# Every kind of source
# --------------------------------------------------------------------------------------

SourceMaker = Callable[[Path, str], object]


def _path(tmp: Path, base: str) -> Path:
    path = tmp / "in put.png"  # a space, to exercise file: URL quoting
    path.write_bytes(PNG)
    return path


SOURCES: dict[str, SourceMaker] = {
    "path-str": lambda tmp, base: str(_path(tmp, base)),
    "path": lambda tmp, base: _path(tmp, base),
    "file-url": lambda tmp, base: _path(tmp, base).as_uri(),
    "http-url": lambda tmp, base: f"{base}/image.png",
    "bytes": lambda tmp, base: PNG,
    "bytearray": lambda tmp, base: bytearray(PNG),
    "memoryview": lambda tmp, base: memoryview(PNG),
    "base64": lambda tmp, base: base64.b64encode(PNG).decode(),
    "base64-newlines": lambda tmp, base: "\n" + base64.encodebytes(PNG).decode() + "  \n",
    "base64-urlsafe": lambda tmp, base: base64.urlsafe_b64encode(PNG).decode().rstrip("="),
    "data-url": lambda tmp, base: "data:image/png;base64," + base64.b64encode(PNG).decode(),
    "bytesio": lambda tmp, base: io.BytesIO(PNG),
    "read-only": lambda tmp, base: ReadOnly(PNG),
    "open-file": lambda tmp, base: _path(tmp, base).open("rb"),
    "pil": lambda tmp, base: Image.open(io.BytesIO(PNG)),
    "pil-rgba": lambda tmp, base: Image.fromarray(SOURCE).convert("RGBA"),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_source_kind(kind: str, tmp_path: Path, http_base: str) -> None:
    source = SOURCES[kind](tmp_path, http_base)
    img = load_image(source, settings=PRIVATE)  # type: ignore[arg-type]
    assert_rgb_equal(img, SOURCE)
    assert isinstance(img, Image.Image)
    img.load()  # detached: usable after the source is gone
    if hasattr(source, "close"):
        source.close()
    assert img.getpixel((5, 7)) == tuple(SOURCE[7, 5])


def test_pil_input_is_not_mutated() -> None:
    original = Image.fromarray(SOURCE).convert("RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6
    original.info["exif"] = exif.tobytes()
    before = (original.mode, original.size, original.tobytes(), dict(original.info))
    out = load_image(original)
    assert out is not original
    assert out.size == (16, 24)  # the orientation was applied to the copy...
    assert (original.mode, original.size, original.tobytes(), dict(original.info)) == before
    out.putpixel((0, 0), (1, 2, 3))  # ...and the result shares no pixels with the input
    assert original.getpixel((0, 0)) == (*SOURCE[0, 0], 255)


def test_http_url_refused_by_default(http_base: str) -> None:
    with pytest.raises(ForbiddenURL):
        load_image(f"{http_base}/image.png", settings=Settings())


def test_decode_image_directly() -> None:
    assert_rgb_equal(decode_image(PNG, settings=DEFAULT), SOURCE)


def test_base64_of_jpeg() -> None:
    jpeg = encode(Image.fromarray(SOURCE), "JPEG", quality=95)
    img = load_image(base64.b64encode(jpeg).decode())
    assert_rgb_equal(img, SOURCE, tolerance=40)


# --------------------------------------------------------------------------------------
# Errors and limits
# --------------------------------------------------------------------------------------


def _code(exc: pytest.ExceptionInfo[InvalidImage]) -> str:
    return exc.value.code


def test_empty_input() -> None:
    for empty in (b"", bytearray(), io.BytesIO(b"")):
        with pytest.raises(InvalidImage, match="empty input") as info:
            load_image(empty)
        assert _code(info) == "invalid_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated(fmt: str) -> None:
    data = encode(noise_image(), fmt)
    with pytest.raises(InvalidImage) as info:
        load_image(data[: len(data) // 2])
    assert _code(info) == "invalid_image"
    assert isinstance(info.value.__cause__, Exception)  # raised ``from`` Pillow's error


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n" * 10)
    with pytest.raises(InvalidImage, match="cannot decode") as info:
        load_image(path)
    assert _code(info) == "invalid_image"


def test_decompression_bomb_header() -> None:
    bomb = png_with_declared_size(12_000, 12_000)
    assert len(bomb) < 100
    limited = Settings(max_image_pixels=10_000_000)
    with pytest.raises(ImageTooLarge) as info:
        load_image(bomb, settings=limited)
    assert _code(info) == "image_too_large"
    assert "144000000" in str(info.value) or "decompression bomb" in str(info.value)
    with pytest.raises(ImageTooLarge):
        load_image(png_with_declared_size(100_000, 100_000))  # default limits


def test_pillow_guard_warning_and_error_become_image_too_large(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process-wide Pillow guard on its own (per-call limit set far higher)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    configure_pillow(Settings(max_image_pixels=1000))
    generous = Settings(max_image_pixels=10**9)
    # 40x40 = 1600 pixels: over the guard (Pillow warns), under twice it (no Pillow error).
    with pytest.raises(ImageTooLarge, match="decompression bomb") as info:
        decode_image(encode(Image.new("RGB", (40, 40))), settings=generous)
    assert isinstance(info.value.__cause__, Image.DecompressionBombWarning)
    # 50x50 = 2500 pixels: over twice the guard, Pillow's error.
    with pytest.raises(ImageTooLarge) as info:
        decode_image(encode(Image.new("RGB", (50, 50))), settings=generous)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_pixel_limit() -> None:
    limited = Settings(max_image_pixels=5000)
    with pytest.raises(ImageTooLarge, match="100x100 = 10000 pixels") as info:
        load_image(encode(Image.new("RGB", (100, 100))), settings=limited)
    assert _code(info) == "image_too_large"
    with pytest.raises(ImageTooLarge):
        load_image(Image.new("RGB", (100, 100)), settings=limited)  # PIL input too
    assert load_image(Image.new("RGB", (50, 100)), settings=limited).size == (50, 100)


def test_byte_limit(tmp_path: Path, http_base: str) -> None:
    limited = PRIVATE.model_copy(update={"max_image_bytes": len(PNG) - 1})
    path = tmp_path / "image.png"
    path.write_bytes(PNG)
    for source in (PNG, path, io.BytesIO(PNG), ReadOnly(PNG), f"{http_base}/image.png"):
        with pytest.raises(ImageTooLarge) as info:
            load_image(source, settings=limited)  # type: ignore[arg-type]
        assert _code(info) == "image_too_large"
    exact = PRIVATE.model_copy(update={"max_image_bytes": len(PNG)})
    assert load_image(path, settings=exact).size == (24, 16)


@pytest.mark.parametrize(
    "missing",
    [
        "/nonexistent/dir/photo.png",
        "photo.jpg",
        "/tmp/abcdefghijklmnopqrstuvwx",  # only base64 characters, length a multiple of 4
        "images/2024/holidays/beach",
    ],
)
def test_missing_path(missing: str) -> None:
    with pytest.raises(InvalidImage, match="no such file") as info:
        load_image(missing)
    assert missing in str(info.value)
    assert "base64" not in str(info.value)
    with pytest.raises(InvalidImage, match="no such file"):
        load_image(Path(missing))


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage, match="not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "s3://bucket/key.png", "ssh://x"])
def test_unsupported_scheme(url: str) -> None:
    scheme = url.split(":", 1)[0]
    with pytest.raises(InvalidImage, match=f"unsupported URI scheme '{scheme}'") as info:
        load_image(url)
    assert _code(info) == "invalid_image"


def test_bad_data_urls() -> None:
    payload = base64.b64encode(PNG).decode()
    for url in (
        "data:text/plain;base64," + payload,
        "data:image/png," + payload,  # not base64-flagged
        "data:image/png;base64,@@@not base64@@@@",
        "data:image/png;base64",
    ):
        with pytest.raises(InvalidImage):
            load_image(url)


def test_text_mode_file_and_unknown_type(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    with path.open("r", encoding="latin-1") as text, pytest.raises(InvalidImage, match="binary"):
        load_image(text)  # type: ignore[arg-type]
    with pytest.raises(InvalidImage, match="unsupported image source"):
        load_image(12345)  # type: ignore[arg-type]


def test_eps_is_refused() -> None:
    """EPS is not even identified (Pillow would run Ghostscript on it)."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # Pillow alone would accept it
    with pytest.raises(InvalidImage) as info:
        load_image(eps)
    assert isinstance(info.value.__cause__, UnidentifiedImageError)


# --------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------


def _marked(width: int = 40, height: int = 20) -> Image.Image:
    """Blue with a red top-left corner block."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[...] = (0, 0, 255)
    arr[:8, :8] = (255, 0, 0)
    return Image.fromarray(arr)


def _corner_colours(img: Image.Image) -> dict[str, tuple[int, ...]]:
    w, h = img.size
    return {
        "tl": img.getpixel((2, 2)),
        "tr": img.getpixel((w - 3, 2)),
        "bl": img.getpixel((2, h - 3)),
        "br": img.getpixel((w - 3, h - 3)),
    }


def _is_red(pixel: tuple[int, ...]) -> bool:
    return pixel[0] > 200 and pixel[2] < 60


@pytest.mark.parametrize(
    "orientation,size,red_corner",
    [
        (1, (40, 20), "tl"),
        (3, (40, 20), "br"),  # rotated 180
        (6, (20, 40), "tr"),  # displayed rotated 90 degrees clockwise
        (8, (20, 40), "bl"),  # displayed rotated 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_applied(orientation: int, size: tuple[int, int], red_corner: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = encode(_marked(), "JPEG", quality=95, exif=exif.tobytes())
    img = load_image(jpeg)
    assert img.mode == "RGB"
    assert img.size == size
    corners = _corner_colours(img)
    assert [name for name, pixel in corners.items() if _is_red(pixel)] == [red_corner]
    assert "exif" not in img.info  # the orientation no longer applies to these pixels


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_broken_exif_is_ignored() -> None:
    jpeg = encode(_marked(), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff")
    img = load_image(jpeg)
    assert img.size == (40, 20)


# --------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------


def test_cmyk() -> None:
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red ink-wise
    img = load_image(encode(cmyk, "TIFF"))
    assert_rgb_equal(img, np.full((6, 8, 3), (255, 0, 0), np.uint8))
    jpeg = load_image(encode(cmyk, "JPEG", quality=95))
    assert_rgb_equal(jpeg, np.full((6, 8, 3), (255, 0, 0), np.uint8), tolerance=8)


def test_16bit_grey_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    img = load_image(encode(source, "PNG"))
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (1, 1, 1),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_32bit_int_and_float_grey() -> None:
    ints = Image.fromarray(np.array([[0, 32768, 65535, 100_000]], np.int32))
    assert ints.mode == "I"
    out = load_image(ints)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 255]
    floats = Image.fromarray(np.array([[-5.0, 100.4, 254.6, 300.0]], np.float32))
    assert floats.mode == "F"
    out = load_image(floats)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 255, 255]


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((5, 3), 1)
    pal.info["transparency"] = 0  # index 0 (red) is transparent
    img = load_image(encode(pal, "PNG"))
    assert img.getpixel((0, 0)) == (255, 0, 0)  # the colour is kept, the alpha dropped
    assert img.getpixel((5, 3)) == (0, 255, 0)


def test_la_and_rgba_drop_alpha() -> None:
    la = Image.new("LA", (3, 3), (100, 0))
    assert_rgb_equal(load_image(encode(la, "PNG")), np.full((3, 3, 3), 100, np.uint8))
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert_rgb_equal(load_image(encode(rgba, "PNG")), np.full((3, 3, 3), (10, 20, 30), np.uint8))


def test_one_bit() -> None:
    bits = np.indices((4, 6)).sum(axis=0) % 2 == 0  # checkerboard
    img = load_image(encode(Image.fromarray(bits), "PNG"))
    expected = np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
    assert_rgb_equal(img, expected)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_first_frame(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow without WebP")
    frames = [Image.new("RGB", (10, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 50}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    img = load_image(data)
    assert_rgb_equal(img, np.full((8, 10, 3), (255, 0, 0), np.uint8))


# --------------------------------------------------------------------------------------
# ICC profiles
# --------------------------------------------------------------------------------------


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def rgb_matrix_profile(description: str, red: tuple, green: tuple, blue: tuple) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix + gamma 2.2 curves)."""
    ascii_desc = description.encode() + b"\0"
    tags = {
        b"desc": b"desc\0\0\0\0"
        + struct.pack(">I", len(ascii_desc))
        + ascii_desc
        + b"\0" * 8
        + b"\0\0\0"
        + b"\0" * 67,
        b"cprt": b"text\0\0\0\0no copyright\0",
        b"wtpt": _xyz(0.9642, 1.0, 0.8249),
        b"rXYZ": _xyz(*red),
        b"gXYZ": _xyz(*green),
        b"bXYZ": _xyz(*blue),
        b"rTRC": b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0",
    }
    tags[b"gTRC"] = tags[b"bTRC"] = tags[b"rTRC"]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags.items():
        padded = data + b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += padded
    size = 128 + table_size + len(body)
    header = (
        struct.pack(">I", size)
        + b"\0" * 4
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + b"\0" * 4
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
    )
    header += b"\0" * (128 - len(header))
    return header + table + body


# sRGB's primaries adapted to D50, as in every sRGB ICC profile.
SRGB_RED, SRGB_GREEN, SRGB_BLUE = (
    (0.4361, 0.2225, 0.0139),
    (0.3851, 0.7169, 0.0971),
    (0.1431, 0.0606, 0.7141),
)


def test_srgb_tagged_image_unchanged() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = load_image(encode(Image.fromarray(SOURCE), "PNG", icc_profile=icc))
    assert_rgb_equal(img, SOURCE)
    assert "icc_profile" not in img.info


def test_non_srgb_profile_converted() -> None:
    """A profile with red and green primaries swapped: stored red is displayed green."""
    icc = rgb_matrix_profile("Swapped primaries test", SRGB_GREEN, SRGB_RED, SRGB_BLUE)
    ImageCms.ImageCmsProfile(io.BytesIO(icc))  # the test profile itself is valid
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    img = load_image(encode(red, "PNG", icc_profile=icc))
    r, g, b = img.getpixel((1, 1))
    assert g > 200 and r < 40 and b < 40, (r, g, b)
    assert "icc_profile" not in img.info
    # The same primaries as sRGB under another name: colours stay (almost) the same.
    same = rgb_matrix_profile("Display test", SRGB_RED, SRGB_GREEN, SRGB_BLUE)
    img = load_image(encode(Image.fromarray(SOURCE), "PNG", icc_profile=same))
    assert_rgb_equal(img, SOURCE, tolerance=12)


def test_broken_profile_ignored() -> None:
    img = load_image(encode(Image.fromarray(SOURCE), "PNG", icc_profile=b"garbage" * 20))
    assert_rgb_equal(img, SOURCE)


# --------------------------------------------------------------------------------------
# Fuzzing: arbitrary and mutated bytes give an RGB image or an InvalidImage, nothing else
# --------------------------------------------------------------------------------------

FUZZ_SETTINGS = Settings(max_image_pixels=1_000_000, max_image_bytes=1_000_000)


def _seeds() -> list[bytes]:
    small = noise_image(16, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(small, "PNG"),
        encode(small, "JPEG", exif=exif.tobytes()),
        encode(small.convert("P"), "GIF"),
        encode(small, "BMP"),
        encode(small, "TIFF"),
        encode(small, "WEBP") if features.check("webp") else encode(small, "PNG"),
        encode(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 999), "PNG"),
    ]


SEEDS = _seeds()


def _check_fuzz(data: bytes) -> None:
    try:
        img = load_image(data, settings=FUZZ_SETTINGS)
    except InvalidImage:
        return
    assert img.mode == "RGB"
    assert img.width * img.height <= FUZZ_SETTINGS.max_image_pixels


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "corrupt metadata" notes
@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_fuzz(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "corrupt metadata" notes
@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzz_mutated_images(seed: bytes, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _check_fuzz(bytes(data))
