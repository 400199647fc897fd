"""What one API process holds: its settings and its clients of Redis, the queue and storage.

Built once in the app's lifespan and shared by every request; nothing here is about one
job (records, keys, limits and idempotency all live in Redis), so replicas are
interchangeable behind a load balancer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aredis

from ..client import AsyncClient
from ..config import Settings
from ..keys import AsyncKeyStore
from ..status import AsyncStatusStore
from ..storage import Storage


@dataclass
class Services:
    settings: Settings
    client: AsyncClient
    keys: AsyncKeyStore
    storage: Storage
    started_at: float
    broker_redis: aredis.Redis
    """The broker's Redis (queue lengths); the status Redis when they are the same."""
    io_limit: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(16))
    """Blocking storage calls in flight (uploads, presigning) at most."""

    @property
    def store(self) -> AsyncStatusStore:
        return self.client.store

    @property
    def redis(self) -> aredis.Redis:
        return self.client.store.redis

    @classmethod
    def build(cls, settings: Settings, started_at: float) -> Services:
        client = AsyncClient(settings=settings, max_connections=settings.api_redis_connections)
        broker = (
            client.store.redis
            if settings.broker_url == settings.status_url
            else aredis.Redis.from_url(settings.broker_url, max_connections=4)
        )
        return cls(
            broker_redis=broker,
            settings=settings,
            client=client,
            keys=AsyncKeyStore(client.store.redis),
            storage=Storage(settings),
            started_at=started_at,
        )

    async def aclose(self) -> None:
        if self.broker_redis is not self.client.store.redis:
            await self.broker_redis.aclose()
        await self.client.aclose()
        await asyncio.to_thread(self.storage.close)
