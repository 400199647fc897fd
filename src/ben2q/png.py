"""Fast PNG encoding of 8-bit images: the output path of every job.

Why not Pillow: its PNG encoder picks a filter per row by trying all five, in one thread,
through the system zlib. On a 640×480 RGBA cut-out that is 45-60 ms even at level 1 (30 ms
at level 0, so mostly filtering), the largest part of a lone job's overhead in the queue.

Here: every row gets the *Up* filter (one vectorised subtraction; on photographs' cut-outs
with the run-length strategy it compresses within 1-9 % of Pillow's adaptive choice), and
the rows are deflated by zlib-ng (level 1, ``Z_RLE``) in horizontal bands on a few
threads. Each band is a raw deflate stream ended by a sync flush (byte-aligned, not final)
and the last by a final block, so their concatenation is one valid zlib stream (the
technique of pigz); the Adler-32 trailer covers all the filtered bytes. Any PNG decoder reads
the result; tests/test_png.py checks it against Pillow's decoder bit for bit.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from zlib_ng import zlib_ng

__all__ = ["encode_png"]

_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (L, LA, RGB, RGBA)
_FILTER_UP = 2
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BAND_BYTES = 256 * 1024  # below this a band is not worth a thread hand-off
_MAX_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_THREADS, cpus))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="ben2q-png")
        return _pool


def _forget_pool_in_child() -> None:
    # a forked child (Celery's prefork pool) inherits the executor but not its threads:
    # work submitted to it would wait forever
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib_ng.crc32(data, zlib_ng.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _filter_up(planes: list[np.ndarray]) -> np.ndarray:
    """(H, W, c) uint8 planes, side by side -> (H, 1 + W·Σc) uint8 scanlines, each led by
    the Up filter byte. The planes are interleaved as they are filtered: an RGB image and
    its alpha need no RGBA copy first."""
    h, w = planes[0].shape[:2]
    channels = sum(plane.shape[2] for plane in planes)
    out = np.empty((h, 1 + w * channels), dtype=np.uint8)
    out[:, 0] = _FILTER_UP
    pixels = out[:, 1:].reshape(h, w, channels)
    start = 0
    for plane in planes:
        end = start + plane.shape[2]
        pixels[0, :, start:end] = plane[0]  # above the first row is zero
        # uint8 arithmetic wraps mod 256
        np.subtract(plane[1:], plane[:-1], out=pixels[1:, :, start:end])
        start = end
    return out


def _deflate(band: memoryview, *, level: int, final: bool) -> bytes:
    comp = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 9, zlib_ng.Z_RLE)
    return comp.compress(band) + comp.flush(zlib_ng.Z_FINISH if final else zlib_ng.Z_SYNC_FLUSH)


def _zlib_stream(scanlines: np.ndarray, *, level: int, threads: int) -> bytes:
    data = memoryview(scanlines.reshape(-1))
    rows, row_bytes = scanlines.shape
    bands = max(1, min(threads, len(data) // _BAND_BYTES, rows))
    step = -(-rows // bands) * row_bytes
    spans = [(start, min(start + step, len(data))) for start in range(0, len(data), step)]
    last = len(spans) - 1
    if last == 0:
        body = _deflate(data, level=level, final=True)
    else:
        futures = [
            _executor().submit(_deflate, data[a:b], level=level, final=i == last)
            for i, (a, b) in enumerate(spans)
        ]
        body = b"".join(f.result() for f in futures)
    header = b"\x78\x01"  # deflate, 32 KiB window, fastest-level flag; (0x7801 % 31 == 0)
    return header + body + struct.pack(">I", zlib_ng.adler32(data))


def encode_png(
    pixels: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    level: int = 1,
    threads: int | None = None,
) -> bytes:
    """Encode ``pixels`` (H, W) or (H, W, C) uint8, C = 1 (L), 2 (LA), 3 (RGB), 4 (RGBA).

    ``alpha`` (H, W) uint8, if given, is appended to ``pixels`` as its last channel (L
    becomes LA, RGB becomes RGBA) without building the combined array first.
    ``threads`` bounds the deflate bands (default: usable CPUs, at most 4); small images
    are deflated in the calling thread.
    """
    planes = [_plane(pixels, "pixels")]
    if alpha is not None:
        a = _plane(alpha, "alpha")
        if a.shape[2] != 1 or a.shape[:2] != planes[0].shape[:2]:
            raise ValueError(
                f"encode_png: alpha must be (H, W) = {planes[0].shape[:2]}, got {alpha.shape}"
            )
        planes.append(a)
    h, w = planes[0].shape[:2]
    c = sum(plane.shape[2] for plane in planes)
    if c not in _COLOR_TYPES:
        raise ValueError(f"encode_png wants (H, W) or (H, W, 1-4) pixels, got {c} channels")
    if h == 0 or w == 0:
        raise ValueError("encode_png: an image has at least one pixel")
    scanlines = _filter_up(planes)
    idat = _zlib_stream(scanlines, level=level, threads=threads or _threads())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _plane(pixels: np.ndarray, name: str) -> np.ndarray:
    """``pixels`` as (H, W, C) uint8 (a view), or TypeError/ValueError."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"encode_png wants uint8 {name}, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOR_TYPES:
        raise ValueError(f"encode_png wants (H, W) or (H, W, 1-4) {name}, got {pixels.shape}")
    return pixels
