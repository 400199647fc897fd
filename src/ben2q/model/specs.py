"""Per-variant hyperparameters as data (timm style): one ``ModelSpec`` per named variant.

``base`` is the published BEN2 Base (Swin-B-like backbone, 94.1 M parameters, 1024² input);
its state dict matches ``PramaLLC/BEN2``'s ``BEN2_Base.pth`` key for key. ``tiny`` has the
same architecture with small widths and depths so that everything above the model (engine,
queue, CLI) can be tested in seconds; it has no published weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Hyperparameters of one BEN2 variant."""

    name: str
    input_size: int
    """Side of the square the image is resized to; the model sees 4 patches + 1 global view
    of ``input_size // 2`` each."""
    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    window_size: int
    mlp_ratio: float = 4.0
    decoder_dim: int
    """Channels of every decoder feature map (128 in BEN2 Base)."""
    head_dim: int
    """Hidden channels of the instance-mask head (384 in BEN2 Base)."""
    decoder_heads: int = 1
    mclm_pool_ratios: tuple[int, ...] = (1, 4, 8)
    mcrm_pool_ratios: tuple[int, ...] = (2, 4, 8)
    hub_filename: str | None = None
    """Checkpoint file in the Hugging Face repository; None: no published weights."""


SPECS: dict[str, ModelSpec] = {
    "base": ModelSpec(
        name="base",
        input_size=1024,
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=12,
        decoder_dim=128,
        head_dim=384,
        hub_filename="BEN2_Base.pth",
    ),
    "tiny": ModelSpec(
        name="tiny",
        input_size=512,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        window_size=12,
        decoder_dim=16,
        head_dim=32,
    ),
}


def get_spec(spec: str | ModelSpec) -> ModelSpec:
    """Look a spec up by name (``"base"``, ``"tiny"``) or pass a ``ModelSpec`` through."""
    if isinstance(spec, ModelSpec):
        return spec
    try:
        return SPECS[spec]
    except KeyError:
        raise ValueError(f"unknown model spec {spec!r}; expected one of {sorted(SPECS)}") from None
