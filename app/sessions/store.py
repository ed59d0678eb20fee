"""The session store interface and the in-process implementation (bounded, LRU + TTL)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from app import metrics
from app.errors import ConflictError, NotFoundError, UnavailableError
from app.sessions.record import SessionRecord

T = TypeVar("T")


def busy(session_id: str) -> ConflictError:
    return ConflictError(f"session {session_id} is being continued by another request; retry when it is done",
                         param="session_id")  # fmt: skip


def lost(session_id: str) -> ConflictError:
    return ConflictError(f"session {session_id} was taken by another request after this one's lease ran out; "
                         "this generation was stopped and not saved", param="session_id")  # fmt: skip


def gone(session_id: str) -> NotFoundError:
    return NotFoundError(f"session {session_id} not found (it may have expired)", param="session_id")


class SessionStore(ABC):
    """Every operation touches one session's single key, so a sharded store needs no coordination.

    A continuation `acquire`s a session (a lease of `lease_seconds` with a random token), `renew`s
    the lease while it runs, then `commit`s the new record (compare-and-set on the version and the
    token) or `release`s it: two concurrent continuations cannot both succeed, and no update is
    lost. A lease that is not renewed expires, so the session of a holder that died is free again
    after one lease, at its last committed state; a holder whose lease expired and was taken learns
    it from `renew`, and its `commit` is refused.
    """

    kind = "abstract"
    lease_seconds = 10.0

    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    async def create(self, record: SessionRecord) -> None:
        """Store a new session; ConflictError if the id exists."""

    @abstractmethod
    async def acquire(self, session_id: str, token: str) -> SessionRecord:
        """Lease the session to `token`; NotFoundError if missing, ConflictError if leased to another."""

    @abstractmethod
    async def renew(self, session_id: str, token: str) -> None:
        """Extend `token`'s lease by `lease_seconds` from now; NotFoundError if missing, ConflictError if not leased
        to `token` (it expired and was taken, or was ended)."""

    @abstractmethod
    async def commit(self, record: SessionRecord, token: str) -> None:
        """Replace the leased session with `record` (whose version is the stored one + 1) and end the lease."""

    @abstractmethod
    async def release(self, session_id: str, token: str) -> None:
        """End the lease without changing the session."""

    @abstractmethod
    async def delete(self, session_id: str) -> bool: ...

    @abstractmethod
    async def ping(self) -> bool: ...

    async def close(self) -> None:
        return None


@dataclass
class _Entry:
    record: SessionRecord
    lease: str = ""
    lease_until: float = 0.0


class InMemoryStore(SessionStore):
    """The default store: this process only, at most `max_sessions` (least recently used dropped first)."""

    kind = "in-process"

    def __init__(self, max_sessions: int = 10_000, lease_seconds: float = 10.0) -> None:
        self.max_sessions = max_sessions
        self.lease_seconds = lease_seconds
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def _live(self, session_id: str) -> _Entry | None:
        entry = self.entries.get(session_id)
        if entry is None:
            return None
        if entry.record.expires_at <= time.time():
            del self.entries[session_id]
            return None
        self.entries.move_to_end(session_id)
        return entry

    async def get(self, session_id: str) -> SessionRecord | None:
        entry = self._live(session_id)
        return entry.record if entry else None

    async def create(self, record: SessionRecord) -> None:
        if self._live(record.session_id) is not None:
            raise ConflictError(f"session {record.session_id} already exists", param="session_id")
        self.entries[record.session_id] = _Entry(record)
        while len(self.entries) > self.max_sessions:
            self.entries.popitem(last=False)

    async def acquire(self, session_id: str, token: str) -> SessionRecord:
        entry = self._live(session_id)
        if entry is None:
            raise gone(session_id)
        now = time.time()
        if entry.lease and entry.lease_until > now:
            raise busy(session_id)
        entry.lease, entry.lease_until = token, now + self.lease_seconds
        return entry.record

    async def renew(self, session_id: str, token: str) -> None:
        entry = self._live(session_id)
        if entry is None:
            raise gone(session_id)
        if entry.lease != token:
            raise lost(session_id)
        entry.lease_until = time.time() + self.lease_seconds

    async def commit(self, record: SessionRecord, token: str) -> None:
        entry = self._live(record.session_id)
        if entry is None:
            raise gone(record.session_id)
        if entry.lease != token or entry.record.version != record.version - 1:
            raise busy(record.session_id)
        self.entries[record.session_id] = _Entry(record)

    async def release(self, session_id: str, token: str) -> None:
        entry = self.entries.get(session_id)
        if entry is not None and entry.lease == token:
            entry.lease, entry.lease_until = "", 0.0

    async def delete(self, session_id: str) -> bool:
        return self.entries.pop(session_id, None) is not None

    async def ping(self) -> bool:
        return True


class MeteredStore(SessionStore):
    """Counts a store's hits, misses, conflicts and errors, and the size of what it stores."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.lease_seconds = inner.lease_seconds

    async def _count(self, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except ConflictError:
            metrics.SESSIONS.labels("conflict").inc()
            raise
        except NotFoundError:
            metrics.SESSIONS.labels("miss").inc()
            raise
        except UnavailableError:
            metrics.SESSIONS.labels("error").inc()
            raise

    async def get(self, session_id: str) -> SessionRecord | None:
        record = await self._count(self.inner.get(session_id))
        metrics.SESSIONS.labels("hit" if record is not None else "miss").inc()
        return record

    async def create(self, record: SessionRecord) -> None:
        metrics.STATE_BYTES.observe(len(record.state) + len(record.generator_state))
        await self._count(self.inner.create(record))

    async def acquire(self, session_id: str, token: str) -> SessionRecord:
        return await self._count(self.inner.acquire(session_id, token))

    async def renew(self, session_id: str, token: str) -> None:
        await self._count(self.inner.renew(session_id, token))

    async def commit(self, record: SessionRecord, token: str) -> None:
        metrics.STATE_BYTES.observe(len(record.state) + len(record.generator_state))
        await self._count(self.inner.commit(record, token))

    async def release(self, session_id: str, token: str) -> None:
        await self._count(self.inner.release(session_id, token))

    async def delete(self, session_id: str) -> bool:
        return await self._count(self.inner.delete(session_id))

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
