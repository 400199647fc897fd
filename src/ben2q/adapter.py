"""OpenTryOn-compatible API: ``BEN2BackgroundRemoverAdapter``.

A drop-in for ``tryon.api.ben2.BEN2BackgroundRemoverAdapter``: same constructor arguments,
``remove_background`` / ``remove_background_batch`` returning lists of RGBA PIL images, and
``load_image``. Differences that users gain from: EXIF orientation is honoured, inputs may
also be bytes, base64 or data URLs, URL fetches are guarded, and the batch call runs real
batched forward passes.

Bad items in a batch: every good item is still processed. By default the call then raises
``BatchFailed`` whose ``results`` hold the good images and, in the bad items' places, their
errors (each with a stable ``.code``); ``errors="return"`` returns that list instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from .config import Precision, Settings, get_settings
from .engine import Engine
from .errors import BatchFailed, BEN2QError
from .imageio import ImageSource
from .imageio import load_image as _load_image


class BEN2BackgroundRemoverAdapter:
    """Background removal with BEN2; the model is loaded once, at construction."""

    def __init__(
        self,
        weights_path: str | Path | None = None,
        device: str | None = None,
        *,
        model_spec: str | None = None,
        precision: Precision | None = None,
        max_batch: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.engine = Engine.load(
            weights=weights_path,
            spec=model_spec,
            device=device,
            precision=precision,
            max_batch=max_batch,
            settings=self.settings,
        )
        self.device = str(self.engine.device)

    @staticmethod
    def load_image(input_data: ImageSource, *, settings: Settings | None = None) -> Image.Image:
        """Decode any supported input into an upright RGB image (no model needed).

        Accepts a path, an ``http(s)``/``file://``/``data:`` URL, bytes, a base64 string, a
        file-like object or a PIL image. Raises ``InvalidImage``, ``ImageTooLarge``,
        ``ForbiddenURL`` or ``FetchFailed``.
        """
        return _load_image(input_data, settings=settings)

    def remove_background(self, image: ImageSource, refine: bool = False) -> list[Image.Image]:
        """One RGBA image of the input's (upright) size, in a list as OpenTryOn returns it."""
        rgb = _load_image(image, settings=self.settings)
        return self.engine.remove_background([rgb], refine=refine)

    def remove_background_batch(
        self,
        images: Sequence[ImageSource],
        refine: bool = False,
        *,
        errors: Literal["raise", "return"] = "raise",
    ) -> list[Image.Image]:
        """RGBA images in input order, run through the model in batches of ``max_batch``.

        A bad item fails alone: see the module docstring for ``errors``.
        """
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError("images must be a list of inputs")
        results: list[Image.Image | BEN2QError] = []
        decoded: list[tuple[int, Image.Image]] = []
        for i, item in enumerate(images):
            try:
                decoded.append((i, _load_image(item, settings=self.settings)))
                results.append(None)  # type: ignore[arg-type]  # filled below
            except BEN2QError as exc:
                results.append(exc)
            except Exception as exc:  # a decoder bug must not sink the other items
                results.append(BEN2QError(f"{type(exc).__name__}: {exc}"))
        outputs = self.engine.remove_background([img for _, img in decoded], refine=refine)
        for (i, _), out in zip(decoded, outputs, strict=True):
            results[i] = out
        failed = {i: r for i, r in enumerate(results) if isinstance(r, BEN2QError)}
        if failed and errors == "raise":
            raise BatchFailed(results, failed)
        return results  # type: ignore[return-value]
