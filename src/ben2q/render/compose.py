"""From a matte and colours to the output's pixels: crop, resize, background, channels.

Compositing is in sRGB (gamma-encoded values, straight alpha), the way browsers, CSS and
image editors composite by default: a JPEG rendered on white here looks exactly like the
transparent PNG placed on a white page, and BEN2's mattes were learnt from images
composited that way. For an opaque background each channel is
``round((fg·a + bg·(255 − a)) / 255)``, computed exactly in integers.

Encoded files never carry the removed background: colours under fully transparent pixels
are written as 0 (``encode``). The composed arrays keep them, as the reference's PIL images
do (the adapter's ``remove_background`` returns those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageTooLarge
from ..jobs import CONTENT_TYPES, EXTENSIONS, MAX_SIDE, Box, Encoding, OutputOptions
from .encode import encode
from .matte import clean_matte, subject_box

Mode = Literal["RGBA", "RGB", "L"]


@dataclass(frozen=True)
class Composed:
    """An output's pixels before encoding, and what the record says about them."""

    mode: Mode
    """``RGBA`` (transparent or semi-transparent background), ``RGB`` (opaque) or ``L``
    (``channels=alpha``)."""
    color: np.ndarray | None
    """(H, W, 3) uint8 colours (None for ``L``)."""
    alpha: np.ndarray
    """(H, W) uint8: the output's matte, after clean-up, crop and resize (what ``mask``
    writes; for RGBA outputs also their alpha channel)."""
    box: Box | None
    """The subject's box in output pixels; None: no subject."""
    opacity: np.ndarray | None = None
    """(H, W) uint8: the RGBA output's alpha channel where it is not the matte (over a
    semi-transparent background colour); None: the matte is the alpha channel."""

    @property
    def channel(self) -> np.ndarray:
        """The alpha channel the output is written with."""
        return self.alpha if self.opacity is None else self.opacity

    @property
    def width(self) -> int:
        return int(self.alpha.shape[1])

    @property
    def height(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def subject(self) -> bool:
        return self.box is not None

    def pixels(self) -> np.ndarray:
        """The output as one (H, W, C) or (H, W) uint8 array."""
        if self.mode == "L":
            return self.alpha
        if self.mode == "RGB":
            return self.color  # type: ignore[return-value]
        return np.dstack([self.color, self.channel])

    def image(self) -> Image.Image:
        """The output as a PIL image (mode ``RGBA``, ``RGB`` or ``L``)."""
        return Image.fromarray(self.pixels(), mode=self.mode)


@dataclass(frozen=True)
class Rendered(Composed):
    """A composed output and its encoded bytes."""

    data: bytes = b""
    encoding: Encoding = "png"

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.encoding]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.encoding]


def output_size(width: int, height: int, options: OutputOptions) -> tuple[int, int]:
    """The size after ``max_side`` or ``scale`` (each side rounded, at least 1 pixel)."""
    if options.scale is not None:
        factor = options.scale
    elif options.max_side is not None and max(width, height) > options.max_side:
        factor = options.max_side / max(width, height)
    else:
        return width, height
    return max(1, _round(width * factor)), max(1, _round(height * factor))


def crop_rect(box: Box, options: OutputOptions) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the crop: the box grown by ``crop_margin``; it may
    reach beyond the image (that space is transparent, or the background)."""
    amount, percent = options.margin
    mx = _round(amount * box.width / 100) if percent else int(amount)
    my = _round(amount * box.height / 100) if percent else int(amount)
    return box.left - mx, box.top - my, box.left + box.width + mx, box.top + box.height + my


def compose(
    rgb: np.ndarray,
    alpha: np.ndarray,
    options: OutputOptions,
    *,
    background: Image.Image | None = None,
    max_pixels: int | None = None,
) -> Composed:
    """Apply ``options`` to an RGB image (H, W, 3) and its matte (H, W), both uint8.

    ``background``: the decoded background image when ``options.background`` is a URI
    (the caller fetches it). ``max_pixels``: an output larger than this (a big margin, an
    upscale) raises ``ImageTooLarge`` before it is allocated.
    """
    if options.background_uri is not None and background is None:
        raise ValueError("options name a background image: pass it decoded as background=")
    alpha = clean_matte(alpha, smooth=options.mask_smooth, threshold=options.mask_threshold)
    color: np.ndarray | None = None if options.channels == "alpha" else rgb
    if options.crop:
        box = subject_box(alpha)
        if box is not None:  # no subject: the whole image, flagged by box=None
            rect = crop_rect(box, options)
            _check_size(rect[2] - rect[0], rect[3] - rect[1], max_pixels)
            alpha = _crop(alpha, rect)
            color = None if color is None else _crop(color, rect)
    height, width = alpha.shape
    size = output_size(width, height, options)
    if size != (width, height):
        _check_size(*size, max_pixels)
        color, alpha = _resize(color, alpha, size)
    box = subject_box(alpha)
    if color is None:
        return Composed("L", None, alpha, box)
    if options.background_uri is not None:
        fitted = ImageOps.fit(background.convert("RGB"), size, Image.Resampling.LANCZOS)
        return Composed("RGB", over_opaque(color, alpha, fitted), alpha, box)
    bg = options.background_color
    if bg is None:
        return Composed("RGBA", color, alpha, box)
    if bg[3] == 255:
        plane = Image.new("RGB", size, bg[:3])
        return Composed("RGB", over_opaque(color, alpha, plane), alpha, box)
    out_rgb, out_alpha = over_color(color, alpha, bg)
    return Composed("RGBA", out_rgb, alpha, box, opacity=out_alpha)


def render(
    rgb: np.ndarray,
    alpha: np.ndarray,
    options: OutputOptions,
    *,
    background: Image.Image | None = None,
    max_pixels: int | None = None,
) -> Rendered:
    """``compose`` then ``encode``: the output's bytes and its description."""
    composed = compose(rgb, alpha, options, background=background, max_pixels=max_pixels)
    return encoded(composed, options)


def encoded(composed: Composed, options: OutputOptions) -> Rendered:
    """``composed`` with its bytes in ``options``'s format."""
    data = encode(composed.mode, composed.color, composed.channel, options)
    return Rendered(
        composed.mode,
        composed.color,
        composed.alpha,
        composed.box,
        composed.opacity,
        data=data,
        encoding=options.encoding,
    )


# --- the operations ------------------------------------------------------------------------


def over_opaque(fg: np.ndarray, alpha: np.ndarray, bg: Image.Image) -> np.ndarray:
    """``fg`` (H, W, 3) with straight alpha over the opaque RGB image ``bg`` (changed in
    place), in sRGB: ``round((fg·a + bg·(255 − a)) / 255)``, exactly (no tie can occur with a
    denominator of 255). Pillow's masked paste computes exactly this, in C, about four
    times faster than numpy (tests/test_render.py checks every value)."""
    bg.paste(Image.fromarray(fg, "RGB"), (0, 0), Image.fromarray(alpha, "L"))
    return np.asarray(bg)


def over_color(
    fg: np.ndarray, alpha: np.ndarray, color: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``fg`` (straight alpha) over a semi-transparent ``color``: Porter-Duff *over* in
    sRGB, ``αo = a + b·(1 − a)``, ``Co = (F·a + B·b·(1 − a)) / αo``, each rounded half up
    (exactly, in integers); RGB 0 where ``αo`` is 0."""
    a = alpha.astype(np.uint32)
    b = np.uint32(color[3])
    rest = b * (255 - a)  # the background's share, in 255ths of 255ths
    den = a * 255 + rest  # αo · 255²
    out_alpha = ((den + 127) // 255).astype(np.uint8)  # den ≤ 255², so this is exact
    safe = np.maximum(den, 1)[..., None]
    num = fg.astype(np.uint32) * (a * 255)[..., None]
    num += np.asarray(color[:3], np.uint32) * rest[..., None]
    rgb = (2 * num + safe) // (2 * safe)
    rgb[den == 0] = 0
    return rgb.astype(np.uint8), out_alpha


def _crop(plane: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """``plane[top:bottom, left:right]``, zero-padded where the rect leaves the image."""
    left, top, right, bottom = rect
    height, width = plane.shape[:2]
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return plane[top:bottom, left:right]
    out = np.zeros((bottom - top, right - left, *plane.shape[2:]), plane.dtype)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(right, width), min(bottom, height)
    out[y0 - top : y1 - top, x0 - left : x1 - left] = plane[y0:y1, x0:x1]
    return out


def _resize(
    color: np.ndarray | None, alpha: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Lanczos resize with Pillow; RGBA is resampled with premultiplied alpha (Pillow's
    own handling), so no colour bleeds from transparent pixels."""
    lanczos = Image.Resampling.LANCZOS
    if color is None:
        return None, np.asarray(Image.fromarray(alpha, "L").resize(size, lanczos))
    rgba = np.asarray(Image.fromarray(np.dstack([color, alpha]), "RGBA").resize(size, lanczos))
    return rgba[..., :3], rgba[..., 3]


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if max(width, height) > MAX_SIDE or (max_pixels is not None and width * height > max_pixels):
        raise ImageTooLarge(
            f"the output would be {width}x{height} pixels, over the limit of "
            f"{max_pixels or 'any'} pixels or {MAX_SIDE} per side"
        )


def _round(value: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(math.floor(value + 0.5))
