"""ben2q.png: what it writes is a valid PNG that decodes to exactly the input pixels."""

from __future__ import annotations

import io
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ben2q.png import encode_png

FIXTURES = Path(__file__).parent / "fixtures"


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, each CRC checked independently of Pillow."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        out.append((kind, payload))
        pos += 12 + length
    return out


def noisy(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rs = np.random.RandomState(seed)
    smooth = np.linspace(0, 200, shape[1], dtype=np.float32)[None, :]
    if len(shape) == 3:
        smooth = smooth[..., None]
    return np.clip(smooth + rs.normal(0, 20, shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("shape", "mode"),
    [
        ((37, 53), "L"),
        ((37, 53, 1), "L"),
        ((37, 53, 2), "LA"),
        ((37, 53, 3), "RGB"),
        ((37, 53, 4), "RGBA"),
        ((1, 1, 4), "RGBA"),
        ((1, 301, 3), "RGB"),
        ((301, 1, 4), "RGBA"),
    ],
)
def test_round_trip_is_exact(shape: tuple[int, ...], mode: str) -> None:
    pixels = noisy(shape)
    data = encode_png(pixels)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode
        assert im.size == (shape[1], shape[0])
    back = decode(data)
    assert np.array_equal(back.reshape(pixels.shape), pixels)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_bands_on_several_threads_make_one_valid_stream(threads: int) -> None:
    pixels = noisy((701, 389, 4), seed=threads)  # 1.1 MB of scanlines: several bands
    data = encode_png(pixels, threads=threads)
    parts = chunks(data)
    assert [k for k, _ in parts] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, colour = struct.unpack(">IIBB", parts[0][1][:10])
    assert (w, h, depth, colour) == (389, 701, 8, 6)
    raw = zlib.decompress(parts[1][1])  # checks the zlib header and the Adler-32 trailer
    assert len(raw) == 701 * (1 + 389 * 4)
    assert set(raw[:: 1 + 389 * 4]) == {2}  # every scanline uses the Up filter
    assert np.array_equal(decode(data), pixels)


def test_same_pixels_whatever_the_thread_count() -> None:
    pixels = noisy((600, 500, 3), seed=7)
    outputs = {encode_png(pixels, threads=t) for t in (1, 2, 4)}
    decoded = [decode(o) for o in outputs]
    assert all(np.array_equal(d, pixels) for d in decoded)


def test_a_forked_child_still_encodes_on_threads() -> None:
    pixels = noisy((700, 400, 4), seed=3)
    expected = encode_png(pixels, threads=2)  # the parent's encoder threads now exist
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the banded encode finishes and is right
        code = 1
        try:
            code = 0 if encode_png(pixels, threads=2) == expected else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's encode hung")


def test_non_contiguous_input() -> None:
    base = noisy((80, 120, 4))
    view = base[::2, ::3, :]  # strided
    assert np.array_equal(decode(encode_png(view)), view)


def test_size_close_to_pillows_adaptive_filtering_on_a_photo_cut_out() -> None:
    rgb = np.asarray(Image.open(FIXTURES / "b_photo.png").convert("RGB"))
    alpha = np.asarray(Image.open(FIXTURES / "b_photo_alpha.png").convert("L"))
    rgba = np.dstack([rgb, alpha])
    ours = encode_png(rgba)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1, compress_type=3)
    assert np.array_equal(decode(ours), rgba)
    assert len(ours) < 1.15 * len(buf.getvalue())
    assert len(ours) < 0.8 * rgba.nbytes  # it does compress


def test_a_flat_matte_compresses_to_almost_nothing() -> None:
    alpha = np.zeros((1024, 1024), np.uint8)
    alpha[200:800, 300:700] = 255
    data = encode_png(alpha)
    assert len(data) < 12_000
    assert np.array_equal(decode(data), alpha)


@pytest.mark.parametrize(
    ("pixels", "error", "words"),
    [
        (np.zeros((4, 4, 3), np.uint16), TypeError, "uint8"),
        (np.zeros((4, 4, 5), np.uint8), ValueError, "(H, W)"),
        (np.zeros((4,), np.uint8), ValueError, "(H, W)"),
        (np.zeros((0, 4, 3), np.uint8), ValueError, "at least one pixel"),
    ],
)
def test_rejects_what_it_cannot_write(pixels: np.ndarray, error: type, words: str) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        encode_png(pixels)


@pytest.mark.parametrize("base_channels", [1, 3])
def test_a_separate_alpha_plane_writes_the_same_bytes_as_the_combined_array(
    base_channels: int,
) -> None:
    rs = np.random.RandomState(base_channels)
    base = rs.randint(0, 256, (97, 130, base_channels), dtype=np.uint8)
    alpha = np.zeros((97, 130), np.uint8)
    alpha[20:70, 30:100] = 255
    alpha[40:50] = rs.randint(0, 256, (10, 130), dtype=np.uint8)
    combined = np.concatenate([base, alpha[:, :, None]], axis=2)
    for pixels in (base, base[:, :, 0] if base_channels == 1 else base):
        data = encode_png(pixels, alpha=alpha, threads=2)
        assert data == encode_png(combined, threads=2)
        assert np.array_equal(decode(data).reshape(combined.shape), combined)
    # non-contiguous planes (a crop of a larger image, a transposed alpha) are fine too
    big = rs.randint(0, 256, (200, 300, base_channels), dtype=np.uint8)
    crop, matte = big[50:147, 100:230], np.ascontiguousarray(alpha.T).T
    expected = np.concatenate([crop, matte[:, :, None]], axis=2)
    assert np.array_equal(decode(encode_png(crop, alpha=matte)).reshape(expected.shape), expected)


@pytest.mark.parametrize(
    ("pixels", "alpha", "error", "words"),
    [
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), ValueError, "alpha must"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 2), np.uint8), ValueError, "alpha must"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), TypeError, "uint8 alpha"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4), np.uint8), ValueError, "5 channels"),
    ],
)
def test_rejects_a_bad_alpha_plane(
    pixels: np.ndarray, alpha: np.ndarray, error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        encode_png(pixels, alpha=alpha)
