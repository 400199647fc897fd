"""Shared fixtures: the conformance data, deterministic models and small test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_engine():
    """A float32 CPU engine of the tiny spec with deterministic weights."""
    from ben2q.config import Settings
    from ben2q.engine import Engine

    return Engine.load(settings=Settings(model_spec="tiny", device="cpu", max_batch=4))


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colourful image with a bright ellipse 'object' and a little noise."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [40 + 150 * xx / max(width, 1), 60 + 120 * yy / max(height, 1), 90 + 0 * xx], axis=-1
    )
    inside = ((xx - width / 2) / (width / 3 + 1)) ** 2 + ((yy - height / 2) / (height / 3 + 1)) ** 2
    base[inside <= 1] = (230, 200, 60)
    base += rs.normal(0, 4, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture()
def make_image():
    return synthetic_image


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    torch.set_num_threads(2)
