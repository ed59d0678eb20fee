"""The Redis session store: one hash per session, leases and compare-and-set in Lua scripts."""

from __future__ import annotations

from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError, RedisError

from app.errors import ConflictError, UnavailableError
from app.sessions.record import SessionRecord
from app.sessions.store import SessionStore, busy, gone, lost

PREFIX = "rnnserve:session:"

# KEYS[1] session; ARGV token, lease ms. Returns {1, data} | {0} missing | {-1} leased to another.
# Idempotent for one token: a retry after a lost reply gets the lease it already holds.
ACQUIRE = """
local h = redis.call('HMGET', KEYS[1], 'data', 'lease', 'lease_until')
if not h[1] then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if h[2] and h[2] ~= '' and h[2] ~= ARGV[1] and tonumber(h[3] or '0') > now then return {-1} end
redis.call('HSET', KEYS[1], 'lease', ARGV[1], 'lease_until', now + tonumber(ARGV[2]))
return {1, h[1]}
"""

# KEYS[1] session; ARGV token, lease ms. Returns 1 renewed | 0 missing | -1 not leased to this token.
RENEW = """
local lease = redis.call('HGET', KEYS[1], 'lease')
if not lease then return 0 end
if lease ~= ARGV[1] then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
return 1
"""

# KEYS[1]; ARGV token, expected version, new version, data, ttl ms. Returns 1 | 0 missing | -1 conflict.
COMMIT = """
local h = redis.call('HMGET', KEYS[1], 'v', 'lease')
if not h[1] then return 0 end
if h[1] ~= ARGV[2] or h[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'data', ARGV[4], 'v', ARGV[3], 'lease', '', 'lease_until', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1]; ARGV data, version, ttl ms. Returns 1 | 0 exists.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'v', ARGV[2], 'lease', '', 'lease_until', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1]; ARGV token.
RELEASE = """
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'lease', '', 'lease_until', '0')
end
return 1
"""


def parse(session_id: str, blob: bytes) -> SessionRecord:
    try:
        return SessionRecord.from_bytes(blob)
    except ValueError as e:
        raise ConflictError(f"session {session_id} holds a corrupt record ({e})", param="session_id") from None


def ttl_ms(record: SessionRecord) -> int:
    return max(1, int((record.expires_at - record.updated_at) * 1000))


class RedisStore(SessionStore):
    """Sessions in Redis (or a Redis Cluster); each operation is one command or script on one key."""

    kind = "redis"

    def __init__(self, url: str, cluster: bool = False, timeout: float = 2.0, lease_seconds: float = 10.0) -> None:
        self.lease_seconds = lease_seconds
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": 10,
            # a pooled connection that died with a Redis restart is retried once on a fresh one
            "retry_on_error": [ConnectionError],
        }
        self.client: Any = (
            RedisCluster.from_url(url, **options) if cluster else aioredis.from_url(url, max_connections=256, **options)
        )
        self._acquire = self.client.register_script(ACQUIRE)
        self._renew = self.client.register_script(RENEW)
        self._commit = self.client.register_script(COMMIT)
        self._create = self.client.register_script(CREATE)
        self._release = self.client.register_script(RELEASE)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except RedisError as e:
            raise UnavailableError(f"session store (Redis) is unavailable: {type(e).__name__}: {e}") from e

    async def get(self, session_id: str) -> SessionRecord | None:
        data = await self._call(self.client.hget, PREFIX + session_id, "data")
        return parse(session_id, data) if data is not None else None

    async def create(self, record: SessionRecord) -> None:
        key = PREFIX + record.session_id
        created = await self._call(self._create, keys=[key], args=[record.to_bytes(), record.version, ttl_ms(record)])
        if not created:
            raise ConflictError(f"session {record.session_id} already exists", param="session_id")

    async def acquire(self, session_id: str, token: str) -> SessionRecord:
        out = await self._call(self._acquire, keys=[PREFIX + session_id], args=[token, self._lease_ms])
        if out[0] == 0:
            raise gone(session_id)
        if out[0] == -1:
            raise busy(session_id)
        return parse(session_id, out[1])

    async def renew(self, session_id: str, token: str) -> None:
        out = await self._call(self._renew, keys=[PREFIX + session_id], args=[token, self._lease_ms])
        if out == 0:
            raise gone(session_id)
        if out == -1:
            raise lost(session_id)

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    async def commit(self, record: SessionRecord, token: str) -> None:
        key = PREFIX + record.session_id
        args = [token, record.version - 1, record.version, record.to_bytes(), ttl_ms(record)]
        out = await self._call(self._commit, keys=[key], args=args)
        if out == 0:
            raise gone(record.session_id)
        if out == -1:
            raise busy(record.session_id)

    async def release(self, session_id: str, token: str) -> None:
        await self._call(self._release, keys=[PREFIX + session_id], args=[token])

    async def delete(self, session_id: str) -> bool:
        return bool(await self._call(self.client.delete, PREFIX + session_id))

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        await self.client.aclose()
