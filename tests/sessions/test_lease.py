"""The lease heartbeat: it outlives a store that does not answer, and reports a lease that was taken once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from app.errors import ConflictError, UnavailableError
from app.sessions.lease import Lease
from app.sessions.store import InMemoryStore
from tests.sessions.test_store import record


class Flaky(InMemoryStore):
    """Renewals fail with `error` while it is set."""

    error: Exception | None = None

    async def renew(self, session_id: str, token: str) -> None:
        if self.error is not None:
            raise self.error
        await super().renew(session_id, token)


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("error", [UnavailableError("store down"), RuntimeError("unexpected")], ids=["down", "bug"])
def test_the_heartbeat_outlives_failed_renewals_and_reports_a_taken_lease_once(error: Exception) -> None:
    async def main() -> None:
        store = Flaky(lease_seconds=0.3)
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        calls: list[int] = []
        lease = Lease(store, rec.session_id, "token-a")
        lease.on_lost = lambda: calls.append(1)
        lease.start()
        store.error = error
        await asyncio.sleep(0.25)  # a beat or two fail
        store.error = None
        back = time.time()
        await until(lambda: store.entries[rec.session_id].lease_until > back + 0.1)  # renewed since
        assert lease.lost is None and not calls

        store.entries[rec.session_id].lease_until = 0.0  # as if it ran out
        await store.acquire(rec.session_id, "token-b")
        await until(lambda: lease.lost is not None)
        assert isinstance(lease.lost, ConflictError)
        assert rec.session_id in lease.lost.message
        await asyncio.sleep(0.3)
        assert calls == [1]
        assert store.entries[rec.session_id].lease == "token-b"
        lease.stop()
        lease.stop()  # twice is harmless

    asyncio.run(main())


def test_a_stopped_lease_is_no_longer_renewed() -> None:
    async def main() -> None:
        store = InMemoryStore(lease_seconds=0.2)
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        lease = Lease(store, rec.session_id, "token-a")
        lease.start()
        await asyncio.sleep(0.3)
        lease.stop()
        stopped = time.time()
        await asyncio.sleep(0.3)
        assert store.entries[rec.session_id].lease_until <= stopped + 0.2
        assert await store.acquire(rec.session_id, "token-b") == rec  # it ran out

    asyncio.run(main())
