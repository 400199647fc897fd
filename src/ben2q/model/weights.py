"""Finding and loading BEN2 checkpoints, safely.

Checkpoints are read with ``torch.load(..., weights_only=True)`` (``{"model_state_dict": ...}``
as published) or from ``.safetensors``; never with pickle's full power. Without an explicit
path the published ``BEN2_Base.pth`` comes through ``huggingface_hub``'s own cache, so
``HF_HOME``, ``HF_HUB_OFFLINE`` and a pre-populated cache work as for any hub model.
"""

from __future__ import annotations

import math
import os
import socket
import zlib
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import WeightsUnavailable
from .specs import ModelSpec


def how_to_supply(
    filename: str = "BEN2_Base.pth", fill: str = "hf download PramaLLC/BEN2 BEN2_Base.pth"
) -> str:
    """The fix, in one clause: the setting to point at a file, or the command that fills
    the Hugging Face cache."""
    return (
        f"set BEN2Q_WEIGHTS=/path/to/{filename} (.pth or .safetensors; weights_path= in "
        f"Python), or fill the Hugging Face cache where there is network: `{fill}`"
    )


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be asked at all (offline mode, or its host does not resolve), or
    None. Asking anyway would retry for about 20 s before giving the same answer."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    host = urlsplit(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return f"the hub cannot be reached ({host} does not resolve)"
    return None


def hub_weights_path(
    *, repo_id: str = "PramaLLC/BEN2", filename: str = "BEN2_Base.pth", revision: str | None = None
) -> Path:
    """The checkpoint's path in the hub cache, downloading it if allowed and needed.

    The error says in one line why there is none and what to do: the exact setting, and
    the command that fills the cache this process reads (``HF_HOME`` as it is here)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    unreachable = _hub_unreachable_reason()
    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, local_files_only=unreachable is not None
            )
        )
    except (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        EntryNotFoundError,
        RepositoryNotFoundError,
        HfHubHTTPError,
        OSError,
        ValueError,
    ) as exc:
        fill = f"hf download {repo_id} {filename}"
        if os.environ.get("HF_HOME"):
            fill = f"HF_HOME={os.environ['HF_HOME']} {fill}"
        if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
            why = unreachable or "the hub cannot be reached"
            detail = (
                f"{filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}"
            )
        else:
            first = str(exc).splitlines()[0] if str(exc) else "no detail"
            detail = f"the hub refused {repo_id}/{filename} ({type(exc).__name__}: {first})"
        raise WeightsUnavailable(
            f"no BEN2 weights: {detail}; {how_to_supply(filename, fill)}"
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file's state dict without executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"no checkpoint file at {path}; {how_to_supply()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = _torch_load(path)
    except Exception as exc:  # corrupt or hostile file: one clear error
        raise WeightsUnavailable(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsUnavailable(f"checkpoint {path} holds no state dict")
    return dict(obj)


def _torch_load(path: Path) -> object:
    """``torch.load`` with ``weights_only``, memory-mapped where the file's format allows
    (zip checkpoints, torch's default since 1.6): tensors are read straight from the page
    cache into the model's parameters instead of into a second full copy first."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy format


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Pure clean-up before strict loading: drop DataParallel/compile prefixes.

    The relative-position index buffers are a function of the window size; a checkpoint
    whose index differs from ours would silently scramble attention, so it is rejected.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    own = model.state_dict()
    for key, value in out.items():
        if key.endswith("relative_position_index") and key in own:
            if value.shape != own[key].shape or not torch.equal(value.long(), own[key]):
                raise WeightsUnavailable(f"checkpoint buffer {key} does not match the model")
    return out


def load_weights(
    model: nn.Module, path: str | Path, *, state: Mapping[str, Tensor] | None = None
) -> nn.Module:
    """Load a checkpoint into ``model`` with ``strict=True``; translate mismatches.

    ``state``: the file's state dict when the caller has read it already."""
    state = checkpoint_filter_fn(read_state_dict(path) if state is None else state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailable(
            f"checkpoint {path} does not fit this model: {str(exc)[:500]}"
        ) from exc
    return model


def deterministic_tensor(key: str, shape: tuple[int, ...]) -> Tensor:
    """The conformance recipe's weight for one tensor: a pure function of key and shape.

    Used by tests, benchmarks and the ``tiny`` spec, which has no published checkpoint.
    """
    rs = np.random.RandomState(zlib.crc32(key.encode("utf-8")))
    z = rs.standard_normal(size=shape).astype(np.float32)
    if len(shape) == 1:
        z = 1.0 + 0.1 * z if key.endswith("weight") else 0.05 * z
    elif key.endswith("relative_position_bias_table"):
        z = 0.02 * z
    else:
        z = z / math.sqrt(int(np.prod(shape[1:])))
    return torch.from_numpy(np.ascontiguousarray(z))


def deterministic_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A full state dict for ``model`` by the conformance recipe (index buffers kept)."""
    return {
        key: value.clone()
        if key.endswith("relative_position_index")
        else deterministic_tensor(key, tuple(value.shape))
        for key, value in model.state_dict().items()
    }


def resolve_checkpoint(spec: ModelSpec, weights: str | Path | None, settings) -> Path | None:
    """Where the weights come from: an explicit path, else the hub (None: deterministic).

    ``settings`` is a ``ben2q.config.Settings``; specs without published weights (``tiny``)
    use the deterministic recipe when no path is given.
    """
    if weights is not None:
        return Path(weights)
    if spec.hub_filename is None:
        return None
    return hub_weights_path(
        repo_id=settings.hf_repo_id,
        filename=settings.hf_filename or spec.hub_filename,
        revision=settings.hf_revision,
    )
