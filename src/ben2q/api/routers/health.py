"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (it can do its job)."""

from __future__ import annotations

import time

from fastapi import APIRouter
from pydantic import BaseModel

from ..deps import ServicesDep
from ..problems import Problem

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    uptime_s: float


class Ready(BaseModel):
    status: str
    workers: int
    """Image workers with a heartbeat within ``BEN2Q_HEARTBEAT_MAX_AGE``."""


@router.get("/healthz", response_model=Health)
async def healthz(svc: ServicesDep) -> Health:
    """Liveness: the process is serving requests (no dependency is checked)."""
    return Health(status="ok", uptime_s=round(time.time() - svc.started_at, 3))


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"description": "Redis unreachable, or no worker seen recently"}},
)
async def readyz(svc: ServicesDep) -> Ready:
    """Readiness: Redis answers and at least ``BEN2Q_API_READY_MIN_WORKERS`` image workers
    (default 1) beat recently."""
    try:
        await svc.redis.ping()
        workers = await svc.store.workers_seen(svc.settings.heartbeat_max_age)
    except Exception as exc:
        raise Problem(
            503,
            "unavailable",
            f"Redis is unreachable: {type(exc).__name__}",
            headers={"Retry-After": "5"},
        ) from exc
    wanted = svc.settings.api_ready_min_workers
    if workers < wanted:
        raise Problem(
            503,
            "unavailable",
            "no image worker has been seen recently"
            if workers == 0
            else f"{workers} image workers seen recently, fewer than {wanted}",
            headers={"Retry-After": "5"},
        )
    return Ready(status="ready", workers=workers)
