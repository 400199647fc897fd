"""The matte's own steps: optional clean-up, and where the subject is.

A *subject pixel* has alpha >= ``SUBJECT_ALPHA`` (8 of 255, about 3 %): low enough to keep
faint hair, high enough to ignore the near-zero haze a soft matte leaves on a background.
The subject's box, ``crop`` and the ``mask_smooth`` clean-up all use this one definition.
"""

from __future__ import annotations

import numpy as np

from ..jobs import Box

SUBJECT_ALPHA = 8
SOLID_ALPHA = 248
"""Alpha at or above which a pixel counts as solid subject when looking for holes."""
SPECK_FRACTION = 0.0005
"""``mask_smooth`` clears specks and fills holes smaller than this share of the image."""
SPECK_MIN_PIXELS = 16


def speck_pixels(height: int, width: int) -> int:
    """The area below which ``mask_smooth`` treats a blob or a hole as noise."""
    return max(SPECK_MIN_PIXELS, round(SPECK_FRACTION * height * width))


def smooth_matte(alpha: np.ndarray) -> np.ndarray:
    """Clear specks and fill pinholes of ``alpha`` (H, W) uint8; returns a new array.

    * A speck is an 8-connected blob of subject pixels (alpha >= 8) smaller than
      ``speck_pixels`` (0.05 % of the image, at least 16 pixels), other than the largest
      blob: every pixel of it becomes 0, its soft fringe included.
    * A pinhole is a 4-connected region of non-solid pixels (alpha < 248) that does not
      touch the image's border and is smaller than the same area: it becomes 255.

    Soft edges elsewhere are left as they are (unlike a blur-and-threshold clean-up).
    """
    from scipy import ndimage

    out = alpha.copy()
    limit = speck_pixels(*alpha.shape)
    labels, count = ndimage.label(alpha >= SUBJECT_ALPHA, structure=np.ones((3, 3), bool))
    if count > 1:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        small = sizes < limit
        small[0] = False
        small[int(np.argmax(sizes))] = False  # the subject itself, however small
        out[small[labels]] = 0
    labels, count = ndimage.label(out < SOLID_ALPHA)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        fill = sizes < limit
        fill[0] = False
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        fill[np.unique(border)] = False
        out[fill[labels]] = 255
    return out


def clean_matte(alpha: np.ndarray, *, smooth: bool, threshold: int | None) -> np.ndarray:
    """``mask_smooth`` then ``mask_threshold`` (alpha >= t becomes 255, the rest 0);
    ``alpha`` itself when neither is asked for (no copy)."""
    if smooth:
        alpha = smooth_matte(alpha)
    if threshold is not None:
        alpha = np.where(alpha >= threshold, np.uint8(255), np.uint8(0))
    return alpha


def subject_box(alpha: np.ndarray) -> Box | None:
    """The bounding box of the subject pixels of ``alpha`` (H, W); None when there are none."""
    rows = np.flatnonzero(alpha.max(axis=1) >= SUBJECT_ALPHA)
    if rows.size == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(alpha[top:bottom].max(axis=0) >= SUBJECT_ALPHA)
    left, right = int(cols[0]), int(cols[-1]) + 1
    return Box(left=left, top=top, width=right - left, height=bottom - top)
