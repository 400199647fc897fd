"""The BEN2 network, its variants and its weights."""

from .network import BEN2, build_model
from .specs import SPECS, ModelSpec, get_spec
from .weights import (
    deterministic_state_dict,
    hub_weights_path,
    load_weights,
    read_state_dict,
    resolve_checkpoint,
)

__all__ = [
    "BEN2",
    "SPECS",
    "ModelSpec",
    "build_model",
    "deterministic_state_dict",
    "get_spec",
    "hub_weights_path",
    "load_weights",
    "read_state_dict",
    "resolve_checkpoint",
]
