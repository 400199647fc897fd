"""Encoders, chosen for speed at the quality a cut-out needs (figures: bench/render.py).

* **PNG**: ``ben2q.png`` (Up filter, zlib-ng ``Z_RLE``, deflated in bands on a few
  threads): lossless, 25-30× faster than Pillow's default for 4-7 % more bytes.
* **JPEG**: Pillow's libjpeg-turbo (SIMD), quality 90 by default (Pillow's own default is
  75: visible ringing on the hard edges of a cut-out on a flat colour), 4:2:0 chroma (4:4:4
  costs +46 % time for +20 % bytes), no ``optimize`` pass (+84 % time for −1 % bytes).
* **WebP**: Pillow's libwebp. Lossless (the default) at ``method=0``: 13× faster than
  Pillow's default (``method=4``) for about 17 % more bytes; lossy (with ``quality``) at
  ``method=2`` and ``alpha_quality=90`` (half the time of a lossless alpha plane; the
  alpha is then off by at most 1 on under 1 % of pixels).

Every file is written without the removed background: the colours under fully transparent
pixels become 0 (the input's colours there are the background itself, recoverable by
anyone who drops the alpha channel; zeroing them also makes a PNG about 40 % smaller).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import ImageTooLarge
from ..jobs import OutputOptions
from ..png import encode_png

JPEG_QUALITY = 90
WEBP_METHOD = 2
WEBP_LOSSLESS_METHOD = 0
WEBP_LOSSLESS_EFFORT = 25
WEBP_ALPHA_QUALITY = 90
WEBP_MAX_SIDE = 16383


def encode(mode: str, color: np.ndarray | None, alpha: np.ndarray, options: OutputOptions) -> bytes:
    """The bytes of an output of ``mode`` (``RGBA``, ``RGB`` or ``L``) in ``options``'s
    format (``auto`` resolved)."""
    encoding = options.encoding
    if mode == "RGBA":
        color = hide_background(color, alpha)  # type: ignore[arg-type]
    if encoding == "png":
        if mode == "L":
            return encode_png(alpha)
        if mode == "RGB":
            return encode_png(color)  # type: ignore[arg-type]
        return encode_png(color, alpha=alpha)  # type: ignore[arg-type]  # no RGBA copy
    image = _image(mode, color, alpha)
    buf = io.BytesIO()
    if encoding == "jpeg":
        image.save(buf, format="JPEG", quality=options.quality or JPEG_QUALITY)
        return buf.getvalue()
    if max(image.size) > WEBP_MAX_SIDE:
        raise ImageTooLarge(f"WebP images are at most {WEBP_MAX_SIDE} pixels per side")
    if options.quality is None:
        image.save(
            buf,
            format="WEBP",
            lossless=True,
            quality=WEBP_LOSSLESS_EFFORT,
            method=WEBP_LOSSLESS_METHOD,
        )
    else:
        image.save(
            buf,
            format="WEBP",
            quality=options.quality,
            method=WEBP_METHOD,
            alpha_quality=WEBP_ALPHA_QUALITY,
        )
    return buf.getvalue()


def hide_background(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``color`` with 0 wherever ``alpha`` is 0 (a new array)."""
    return color * (alpha != 0)[..., None]


def encode_matte(alpha: np.ndarray) -> bytes:
    """A matte as an 8-bit grayscale PNG (the ``mask`` file)."""
    return encode_png(alpha)


def _image(mode: str, color: np.ndarray | None, alpha: np.ndarray) -> Image.Image:
    if mode == "L":
        return Image.fromarray(alpha, "L")
    if mode == "RGB":
        return Image.fromarray(color, "RGB")
    return Image.fromarray(np.dstack([color, alpha]), "RGBA")
