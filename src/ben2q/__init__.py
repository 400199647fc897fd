"""ben2q: background removal at scale with BEN2 (Background Erase Network 2).

``from ben2q import BEN2BackgroundRemoverAdapter`` gives the OpenTryOn-compatible library
API; heavy modules (torch) are imported on first use so that ``ben2q.errors`` or
``ben2q.config`` stay cheap to import for producers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["BEN2BackgroundRemoverAdapter", "Engine", "Settings", "__version__"]

if TYPE_CHECKING:
    from .adapter import BEN2BackgroundRemoverAdapter
    from .config import Settings
    from .engine import Engine

_LAZY = {
    "BEN2BackgroundRemoverAdapter": "ben2q.adapter",
    "Engine": "ben2q.engine",
    "Settings": "ben2q.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ben2q' has no attribute {name!r}")
