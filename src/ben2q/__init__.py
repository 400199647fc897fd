"""ben2q: background removal at scale with BEN2."""

__version__ = "0.1.0"
