"""Output options: the one pure step from the engine's matte and colours to the bytes the
user asked for. ``compose`` applies clean-up, crop, resize, background and channels;
``encode`` writes PNG, WebP or JPEG; ``render`` does both. The adapter, the CLI and the
job runner all call it, so an option means the same everywhere.
"""

from .compose import Composed, Rendered, compose, output_size, render
from .encode import encode, encode_matte
from .matte import SUBJECT_ALPHA, clean_matte, smooth_matte, subject_box

__all__ = [
    "SUBJECT_ALPHA",
    "Composed",
    "Rendered",
    "clean_matte",
    "compose",
    "encode",
    "encode_matte",
    "output_size",
    "render",
    "smooth_matte",
    "subject_box",
]
