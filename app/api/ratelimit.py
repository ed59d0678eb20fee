"""Per-key request rate limit: a fixed one-minute window, counted in Redis (shared by all replicas) or in process."""

from __future__ import annotations

import logging
import time
from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from app.errors import OverloadedError

log = logging.getLogger(__name__)
WINDOW = 60

# KEYS[1] the window's counter; ARGV window seconds. Returns the count including this request.
INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RateLimiter:
    """At most `per_minute` requests per caller and minute; 429 with Retry-After beyond."""

    def __init__(self, per_minute: int, redis_url: str | None = None, cluster: bool = False) -> None:
        self.per_minute = per_minute
        self.counts: dict[tuple[str, int], int] = {}
        self.client: Any = None
        if redis_url:
            client_class: Any = RedisCluster if cluster else aioredis.Redis
            self.client = client_class.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self._incr = self.client.register_script(INCR) if self.client is not None else None

    async def hit(self, caller: str) -> None:
        now = time.time()
        window = int(now // WINDOW)
        count = await self._count(caller, window)
        if count > self.per_minute:
            retry = max(1, int((window + 1) * WINDOW - now))
            raise OverloadedError(
                f"rate limit of {self.per_minute} requests per minute reached; retry in {retry} s", retry_after=retry
            )

    async def _count(self, caller: str, window: int) -> int:
        if self._incr is not None:
            try:
                return int(await self._incr(keys=[f"rnnserve:rate:{caller}:{window}"], args=[WINDOW]))
            except RedisError as e:  # fail open: the limit must not take the service down with Redis
                log.warning("rate limit not checked, Redis unavailable: %s", type(e).__name__)
                return 0
        for key in [k for k in self.counts if k[1] < window]:
            del self.counts[key]
        self.counts[(caller, window)] = self.counts.get((caller, window), 0) + 1
        return self.counts[(caller, window)]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
