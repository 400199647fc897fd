"""OpenTryOn-compatible API: ``BEN2BackgroundRemoverAdapter``.

A drop-in for ``tryon.api.ben2.BEN2BackgroundRemoverAdapter``: same constructor arguments,
``remove_background`` / ``remove_background_batch`` returning lists of RGBA PIL images, and
``load_image``. Differences that users gain from: EXIF orientation is honoured, inputs may
also be bytes, base64 or data URLs, URL fetches are guarded, and the batch call runs real
batched forward passes.

Output options (``ben2q.jobs.OutputOptions``: ``background``, ``crop``, ``max_side``,
``channels``...) are keyword arguments of every method and go through the same
``ben2q.render`` step as queue jobs: ``remove_background(img, background="white",
crop=True)`` returns the composed image; ``render`` also gives the encoded bytes and the
subject's box.

Bad items in a batch: every good item is still processed. By default the call then raises
``BatchFailed`` whose ``results`` hold the good images and, in the bad items' places, their
errors (each with a stable ``.code``); ``errors="return"`` returns that list instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from PIL import Image

from .config import Precision, Settings, get_settings
from .engine import Engine, Prediction
from .errors import BatchFailed, BEN2QError
from .imageio import ImageSource, decode_image
from .imageio import load_image as _load_image
from .jobs import OutputOptions, job_options
from .render import Composed, Rendered, compose
from .render.compose import encoded


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
        self._backgrounds: dict[str, Image.Image] = {}

    @staticmethod
    def load_image(input_data: ImageSource, *, settings: Settings | None = None) -> Image.Image:
        """Decode any supported input into an upright RGB image (no model needed).

        Accepts a path, an ``http(s)``/``file://``/``data:`` URL, bytes, a base64 string, a
        file-like object or a PIL image. Raises ``InvalidImage``, ``ImageTooLarge``,
        ``ForbiddenURL`` or ``FetchFailed``.
        """
        return _load_image(input_data, settings=settings)

    def remove_background(
        self, image: ImageSource, refine: bool = False, **options: Any
    ) -> list[Image.Image]:
        """One image of the input's (upright) size, in a list as OpenTryOn returns it:
        RGBA by default; with output options, as they make it (``RGB`` on an opaque
        background, ``L`` for ``channels="alpha"``, cropped, resized)."""
        opts = output_options(options)
        rgb = _load_image(image, settings=self.settings)
        [pred] = self.engine.predict([rgb], refine=refine)
        return [self._compose(pred, opts).image()]

    def render(self, image: ImageSource, *, refine: bool = False, **options: Any) -> Rendered:
        """The encoded output of one image and what a job record says of it: ``.data``
        (bytes), ``.encoding``, ``.width``, ``.height``, ``.box`` (the subject's box in
        output pixels, None when there is none), ``.image()``."""
        opts = output_options(options)
        rgb = _load_image(image, settings=self.settings)
        [pred] = self.engine.predict([rgb], refine=refine)
        return encoded(self._compose(pred, opts), opts)

    def remove_background_batch(
        self,
        images: Sequence[ImageSource],
        refine: bool = False,
        *,
        errors: Literal["raise", "return"] = "raise",
        **options: Any,
    ) -> list[Image.Image]:
        """Images in input order (see ``remove_background``), run through the model in
        batches of ``max_batch``. A bad item fails alone: see the module docstring."""
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError("images must be a list of inputs")
        opts = output_options(options)
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
        preds = self.engine.predict([img for _, img in decoded], refine=refine)
        for (i, _), pred in zip(decoded, preds, strict=True):
            try:
                results[i] = self._compose(pred, opts).image()
            except BEN2QError as exc:
                results[i] = exc
        failed = {i: r for i, r in enumerate(results) if isinstance(r, BEN2QError)}
        if failed and errors == "raise":
            raise BatchFailed(results, failed)
        return results  # type: ignore[return-value]

    def _compose(self, pred: Prediction, options: OutputOptions) -> Composed:
        return compose(
            pred.rgb,
            pred.alpha,
            options,
            background=self._background(options),
            max_pixels=self.settings.max_image_pixels,
        )

    def _background(self, options: OutputOptions) -> Image.Image | None:
        """The background image of ``options``, loaded once per URI by this adapter."""
        uri = options.background_uri
        if uri is None:
            return None
        cached = self._backgrounds.get(uri)
        if cached is None:
            cached = load_background(uri, self.settings)
            self._backgrounds = {uri: cached}  # the last one: a batch shares one backdrop
        return cached


def output_options(options: dict[str, Any]) -> OutputOptions:
    """Keyword output options (or ``options=OutputOptions(...)``) as a validated model."""
    given = options.pop("options", None)
    opts = job_options(given, **options)
    if opts.refine or opts.mask:
        raise TypeError("refine is an argument of its own here, and mask is for jobs")
    return opts


def load_background(uri: str, settings: Settings) -> Image.Image:
    """A background image by URI: ``s3://`` through ``Storage``; ``http(s)://`` and
    ``file://`` as any input (guarded fetch, limits, EXIF)."""
    if urlsplit(uri).scheme.lower() == "s3":
        from .storage import Storage

        with Storage(settings) as storage:
            return decode_image(storage.read(uri), settings=settings)
    return _load_image(uri, settings=settings)
