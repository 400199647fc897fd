"""Batched BEN2 inference: preprocessing, one forward per chunk, alpha and refinement.

An ``Engine`` owns one model on one device, loaded once. ``remove_background`` takes decoded
upright RGB images (see ``ben2q.imageio``) and returns RGBA images of the same sizes. Images
are stacked into batches of at most ``max_batch`` and go through the network as one tensor;
post-processing (mask resize, alpha, refinement) stays on the model's device.

The pipeline matches the reference implementation (see ``tests/fixtures`` and the
conformance tests): Lanczos resize to the model's square input, ImageNet normalisation,
sigmoid mask, bilinear resize back, min-max normalisation, truncation to 8 bits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import Precision, Settings, Warmup, get_settings
from .errors import DeviceUnavailable, InvalidImage
from .model import BEN2, build_model, deterministic_state_dict, get_spec, load_weights
from .model.alloc import keep_freed_memory as keep_freed_memory_
from .model.specs import ModelSpec
from .model.weights import read_state_dict, resolve_checkpoint
from .refine import refine_foreground_tensor

log = logging.getLogger(__name__)

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: the first CUDA device if there is one, else the CPU.

    A device that does not exist here (no CUDA in this PyTorch, no such GPU, a misspelt
    name) raises ``DeviceUnavailable`` now, not at the first job."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceUnavailable(
            f"BEN2Q_DEVICE={device} is not a device name (cpu, cuda, cuda:N): {exc}"
        ) from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = (
                "this PyTorch has no CUDA support"
                if torch.version.cuda is None
                else ("no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
            )
            raise DeviceUnavailable(f"BEN2Q_DEVICE={device}: {why}; use BEN2Q_DEVICE=cpu")
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailable(
                f"BEN2Q_DEVICE={device}: only {count} CUDA device(s) are visible"
            )
    elif dev.type != "cpu":
        raise DeviceUnavailable(f"BEN2Q_DEVICE={device}: only cpu and cuda are supported")
    return dev


_DEVICE_ERROR_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL")


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the device itself failed (a CUDA error: the context is gone
    and every later call fails too), as opposed to a bad input or running out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, torch.AcceleratorError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_ERROR_MARKERS)


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text


def cpu_runs_natively(dtype: torch.dtype) -> bool:
    """Whether oneDNN computes ``dtype`` natively on this CPU (bfloat16: AVX512-BF16 or AMX;
    float16: AVX-512 FP16 or AMX-FP16). Elsewhere it is emulated, several times slower
    than float32 (measured on an AVX2-only Zen 3: a bf16 forward over 4× the float32 one)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def cpu_matrix_units() -> str:
    """What this CPU multiplies bfloat16 with, for the logs: ``AMX``, ``AVX512-BF16``, or
    ``none`` (then bfloat16 would be emulated)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return "none"


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype the engine computes in, and why (what a worker logs at start)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_precision(precision: Precision, device: torch.device) -> PrecisionChoice:
    """``auto``: float16 autocast on CUDA (as the reference runs on GPUs), bfloat16 on a
    CPU that computes it natively (AVX512-BF16 or AMX: 1.7-2.7× faster, alpha within ±4 of
    float32 on over 99 % of pixels, see README), float32 on other CPUs.

    Reduced precision asked for on a CPU that would only emulate it falls back to float32
    (with a warning): the fast mode is for processors that have it."""
    if precision == "auto":
        if device.type == "cuda":
            return PrecisionChoice(torch.float16, "auto: float16 autocast on CUDA")
        if cpu_runs_natively(torch.bfloat16):
            units = cpu_matrix_units()
            how = f" ({units})" if units != "none" else ""
            return PrecisionChoice(
                torch.bfloat16, f"auto: this CPU computes bfloat16 natively{how}"
            )
        return PrecisionChoice(
            torch.float32, "auto: this CPU has no native bfloat16 (float32 is faster here)"
        )
    dtype = _DTYPES[precision]
    if device.type == "cpu" and not cpu_runs_natively(dtype):
        log.warning(
            "precision %s requested, but this CPU has no native %s: running float32, "
            "which is faster here",
            precision,
            precision,
        )
        return PrecisionChoice(
            torch.float32, f"{precision} asked for, but this CPU has no native {precision}"
        )
    return PrecisionChoice(dtype, f"{precision} asked for")


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype ``choose_precision`` picks."""
    return choose_precision(precision, device).dtype


@dataclass(frozen=True)
class Prediction:
    """One image's result: its upright RGB input, the 8-bit alpha and optional refined RGB."""

    rgb: np.ndarray
    """(H, W, 3) uint8: the colours of the output (refined when asked)."""
    alpha: np.ndarray
    """(H, W) uint8."""

    def rgba(self) -> np.ndarray:
        """The RGBA result, (H, W, 4) uint8."""
        return np.dstack([self.rgb, self.alpha])

    def to_image(self) -> Image.Image:
        """The RGBA result as a PIL image."""
        return Image.fromarray(self.rgba(), mode="RGBA")


class Engine:
    """A warm BEN2 model on one device with batched inference."""

    def __init__(
        self,
        model: BEN2,
        *,
        device: str | torch.device | None = None,
        precision: Precision = "auto",
        max_batch: int = 4,
        keep_freed_memory: bool = False,
        forward_batch: int | None = None,
    ) -> None:
        """``keep_freed_memory``: tell glibc malloc, process-wide, to keep freed memory for
        reuse (see ``ben2q.model.alloc``): CPU forwards then stop paying for page faults on
        their large temporaries, at the price of a higher resident peak.

        ``forward_batch``: images per network call within a chunk of ``max_batch``; default
        ``max_batch`` on accelerators and 1 on the CPU. On the CPU one BEN2 Base image is
        already 2,151 GFLOP of large GEMMs and convolutions, so stacking images gains no
        arithmetic efficiency, while the temporaries grow with the batch (measured, 2
        cores: a batch of 2 took 2.06× one image, peak RSS 3.9 GB instead of 2.6 GB); the
        chunk still shares pre- and post-processing and the job pipeline."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if keep_freed_memory:
            keep_freed_memory_()
        self.device = resolve_device(device)
        self.precision = choose_precision(precision, self.device)
        self.max_batch = max_batch
        if forward_batch is None:
            forward_batch = 1 if self.device.type == "cpu" else max_batch
        if forward_batch < 1:
            raise ValueError("forward_batch must be at least 1")
        self.forward_batch = forward_batch
        try:
            self.model = model.eval().requires_grad_(False).to(self.device)
        except Exception as exc:
            if is_out_of_memory(exc) or is_device_failure(exc):
                raise DeviceUnavailable(
                    f"cannot put the model on {self.device}: {_first_line(exc)}"
                ) from exc
            raise
        self.model.pack_weights(self.device.type == "cpu" and self.dtype == torch.float32)
        self.spec: ModelSpec = model.spec
        self._mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def load(
        cls,
        *,
        weights: str | Path | None = None,
        spec: str | ModelSpec | None = None,
        device: str | torch.device | None = None,
        precision: Precision | None = None,
        max_batch: int | None = None,
        keep_freed_memory: bool | None = None,
        settings: Settings | None = None,
    ) -> Engine:
        """Build the network and load its weights; arguments override ``settings``.

        Weights: ``weights``, else ``settings.weights`` (``BEN2Q_WEIGHTS``), else the hub
        cache (``PramaLLC/BEN2``). The ``tiny`` spec without a path uses deterministic
        weights. Raises ``WeightsUnavailable`` with instructions when none can be had.
        """
        s = settings or get_settings()
        model_spec = get_spec(spec or s.model_spec)
        started = time.perf_counter()
        path = resolve_checkpoint(model_spec, weights or s.weights, s)
        state = None if path is None else read_state_dict(path)
        read = time.perf_counter() - started
        model = build_model(model_spec)
        if state is None:
            model.load_state_dict(deterministic_state_dict(model), strict=True)
        else:
            load_weights(model, path, state=state)
        log.info(
            "loaded BEN2 %s weights from %s (read in %.2f s) in %.2f s",
            model_spec.name,
            path or "the deterministic recipe",
            read,
            time.perf_counter() - started,
        )
        return cls(
            model,
            device=device if device is not None else s.device,
            precision=precision or s.precision,
            max_batch=max_batch or s.max_batch,
            keep_freed_memory=(
                keep_freed_memory if keep_freed_memory is not None else s.keep_freed_memory
            ),
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network computes in (``precision.dtype``)."""
        return self.precision.dtype

    # --- stages ------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> Tensor:
        """RGB image -> (3, S, S) uint8 CPU tensor, Lanczos-resized (normalised later)."""
        if image.mode != "RGB":
            raise InvalidImage(f"expected an RGB image, got mode {image.mode}")
        size = self.spec.input_size
        resized = image.resize((size, size), resample=Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def forward(self, batch: Tensor) -> Tensor:
        """(B, 3, S, S) uint8 -> (B, 1, S, S) float32 foreground probability on the device."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True).float().div_(255.0)
        x = (x - self._mean) / self._std
        try:
            with torch.inference_mode(), self._autocast():
                parts = [self.model(part).float() for part in x.split(self.forward_batch)]
        except Exception as exc:
            if is_device_failure(exc):
                raise DeviceUnavailable(f"{self.device} failed: {_first_line(exc)}") from exc
            raise
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def mask_to_alpha(mask: Tensor, height: int, width: int) -> Tensor:
        """(1, S, S) probability -> (H, W) uint8 alpha: bilinear resize, min-max, truncate.

        A constant mask (no contrast to stretch) maps to its own value instead of NaN.
        """
        m = F.interpolate(mask[None], size=(height, width), mode="bilinear", align_corners=False)
        m = m[0, 0]
        lo, hi = m.min(), m.max()
        span = hi - lo
        m = torch.where(span > 0, (m - lo) / torch.where(span > 0, span, 1.0), m)
        return (m * 255.0).clamp_(0, 255).to(torch.uint8)

    def postprocess(self, image: Image.Image, mask: Tensor, refine: bool = False) -> Prediction:
        """(1, S, S) mask of ``image`` -> its alpha (and refined colours when asked)."""
        width, height = image.size
        alpha = self.mask_to_alpha(mask, height, width)
        rgb_np = np.asarray(image)
        if not refine:
            return Prediction(rgb=rgb_np, alpha=alpha.cpu().numpy())
        rgb = torch.from_numpy(rgb_np.copy()).to(self.device).permute(2, 0, 1).float() / 255.0
        fg = refine_foreground_tensor(rgb[None], alpha[None, None].float() / 255.0)[0]
        refined = (fg * 255.0).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Prediction(rgb=refined, alpha=alpha.cpu().numpy())

    # --- public API --------------------------------------------------------------------

    def chunks(self, n: int) -> Iterator[range]:
        """Index ranges of the batches that ``n`` images are run in."""
        for start in range(0, n, self.max_batch):
            yield range(start, min(n, start + self.max_batch))

    def predict(
        self, images: Sequence[Image.Image], *, refine: bool | Sequence[bool] = False
    ) -> list[Prediction]:
        """Run upright RGB images through the model in batches of at most ``max_batch``.

        ``refine`` is one flag for all images or one per image (jobs with and without
        refinement share forward passes).
        """
        flags = [refine] * len(images) if isinstance(refine, bool) else list(refine)
        if len(flags) != len(images):
            raise ValueError("refine needs one flag per image")
        results: list[Prediction] = []
        for idx in self.chunks(len(images)):
            batch = torch.stack([self.preprocess(images[i]) for i in idx])
            masks = self.forward(batch)
            results.extend(
                self.postprocess(images[i], masks[j], flags[i]) for j, i in enumerate(idx)
            )
        return results

    def remove_background(
        self, images: Sequence[Image.Image], *, refine: bool = False
    ) -> list[Image.Image]:
        """RGBA images (input size, input colours or refined ones) for upright RGB images."""
        return [p.to_image() for p in self.predict(images, refine=refine)]

    def warmup(self, mode: Warmup = "full") -> float:
        """One forward on a blank image before any job is taken; the seconds it took.

        ``full``: at the model's input size, so the first real job pays no first-call costs
        (allocation, kernel set-up, weight packing) and a device that cannot hold the model
        says so now (``DeviceUnavailable``, out of memory included). ``quick``: at a quarter
        of the side (1/16 of the pixels): every kernel is loaded and checked in a fraction
        of the time. ``none``: nothing. ``auto``: full on CUDA, quick on the CPU, where a
        full forward takes as long as a job and would double the time to the first output
        of a worker started for waiting jobs."""
        if mode == "auto":
            mode = "full" if self.device.type == "cuda" else "quick"
        if mode == "none":
            return 0.0
        started = time.perf_counter()
        size = self.spec.input_size if mode == "full" else self.spec.input_size // 4
        try:
            self.forward(torch.zeros((1, 3, size, size), dtype=torch.uint8))
        except DeviceUnavailable:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise DeviceUnavailable(
                    f"out of memory in the warm-up forward on {self.device} "
                    f"({_first_line(exc)}); free the device or give the worker more memory"
                ) from exc
            raise
        return time.perf_counter() - started


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
