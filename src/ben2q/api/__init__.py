"""The HTTP API: ``create_app(settings)`` and ``serve`` (``ben2q api``)."""

from .app import create_app

__all__ = ["create_app"]
