"""Encoders, chosen for speed at the quality a cut-out needs (figures: bench/render.py).

* **PNG**: ``ben2q.png`` (Up filter, zlib-ng ``Z_RLE`` level 1, deflated in bands on a
  few threads): lossless, several times faster than Pillow's default.
* **JPEG**: Pillow's libjpeg-turbo (SIMD), quality 90 by default (Pillow's own default is
  75: visible ringing on the hard edges of a cut-out on a flat colour), 4:2:0 chroma,
  no ``optimize`` pass (it costs a second Huffman pass for 2-5 % fewer bytes).
* **WebP**: Pillow's libwebp. Lossless (the default) at ``method=2``, ``quality=50``
  (effort, not fidelity: the bytes decode to the same pixels at any setting) with
  ``exact`` so colours under transparent pixels survive; lossy with ``quality`` at
  ``method=2`` (Pillow's default is 4, the slower search gains a few per cent in size).
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
WEBP_LOSSLESS_EFFORT = 50
WEBP_MAX_SIDE = 16383


def encode(mode: str, color: np.ndarray | None, alpha: np.ndarray, options: OutputOptions) -> bytes:
    """The bytes of an output of ``mode`` (``RGBA``, ``RGB`` or ``L``) in ``options``'s
    format (``auto`` resolved)."""
    encoding = options.encoding
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
            exact=True,
            quality=WEBP_LOSSLESS_EFFORT,
            method=WEBP_METHOD,
        )
    else:
        image.save(buf, format="WEBP", quality=options.quality, method=WEBP_METHOD)
    return buf.getvalue()


def encode_matte(alpha: np.ndarray) -> bytes:
    """A matte as an 8-bit grayscale PNG (the ``mask`` file)."""
    return encode_png(alpha)


def _image(mode: str, color: np.ndarray | None, alpha: np.ndarray) -> Image.Image:
    if mode == "L":
        return Image.fromarray(alpha, "L")
    if mode == "RGB":
        return Image.fromarray(color, "RGB")
    return Image.fromarray(np.dstack([color, alpha]), "RGBA")
