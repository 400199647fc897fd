"""Uploads (multipart/form-data) for ``POST /v1/jobs`` and ``/v1/remove``."""

from __future__ import annotations

from fastapi import Request

from ..jobs import JobRequest
from ..keys import ApiKey
from .problems import Problem
from .state import Services


async def receive(request: Request, svc: Services, key: ApiKey) -> JobRequest:
    raise Problem(415, "unsupported_media_type", "uploads are not available yet")
