"""The SessionStore contract, run against the in-process store and against a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from app.errors import ConflictError, NotFoundError
from app.sessions.record import SessionRecord
from app.sessions.redis_store import PREFIX, RedisStore
from app.sessions.store import InMemoryStore, SessionStore
from tests.sessions.conftest import STORES

StoreFactory = Callable[..., SessionStore]
Body = Callable[[SessionStore], Awaitable[None]]


@pytest.fixture(params=[*STORES, "redis-cluster"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """A factory, called inside the test's event loop (a Redis client belongs to the loop it was made in)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        return lambda **options: RedisStore(url, **options)
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
        return lambda **options: RedisStore(url, cluster=True, **options)
    return InMemoryStore


def run(make_store: StoreFactory, body: Body) -> None:
    async def main() -> None:
        store = make_store()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def record(ttl: float = 600.0, **overrides: object) -> SessionRecord:
    """A fresh session (a unique id, so tests sharing one Redis never meet)."""
    now = time.time()
    fields: dict[str, object] = {
        "session_id": f"sess-test-{uuid.uuid4().hex}",
        "owner": "",
        "model": "tiny-lstm",
        "model_sha256": "a" * 64,
        "state": b"state-v1",
        "last": "x",
        "generator_state": b"gen-v1",
        "seed": 1,
        "chars": 10,
        "tail": "0123456789",
        "created_at": now,
        "updated_at": now,
        "expires_at": now + ttl,
        "version": 1,
        **overrides,
    }
    return SessionRecord(**fields)  # type: ignore[arg-type]


def next_version(rec: SessionRecord, ttl: float = 600.0) -> SessionRecord:
    now = time.time()
    return rec.evolve(
        state=b"state-v%d" % (rec.version + 1),
        chars=rec.chars + 5,
        tail=rec.tail + "abcde",
        updated_at=now,
        expires_at=now + ttl,
        version=rec.version + 1,
    )


def test_create_then_get(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        assert await store.get(rec.session_id) is None
        await store.create(rec)
        assert await store.get(rec.session_id) == rec
        assert await store.get(rec.session_id + "-other") is None
        assert await store.ping() is True

    run(make_store, body)


def test_creating_an_existing_id_conflicts_and_keeps_the_first(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        with pytest.raises(ConflictError) as err:
            await store.create(rec.evolve(chars=99, state=b"other"))
        assert rec.session_id in err.value.message
        assert await store.get(rec.session_id) == rec

    run(make_store, body)


def test_acquire_is_exclusive_until_the_holder_commits(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        assert await store.acquire(rec.session_id, "token-a") == rec
        for _ in range(2):  # stays refused, however often B asks
            with pytest.raises(ConflictError) as err:
                await store.acquire(rec.session_id, "token-b")
            assert err.value.param == "session_id"
            assert "another request" in err.value.message
        new = next_version(rec)
        await store.commit(new, "token-a")
        assert await store.acquire(rec.session_id, "token-b") == new

    run(make_store, body)


def test_acquire_is_exclusive_until_the_holder_releases(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        with pytest.raises(ConflictError):
            await store.acquire(rec.session_id, "token-b")
        await store.release(rec.session_id, "token-a")
        assert await store.get(rec.session_id) == rec  # released: unchanged
        assert await store.acquire(rec.session_id, "token-b") == rec

    run(make_store, body)


def test_acquire_of_a_missing_session_is_not_found(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        with pytest.raises(NotFoundError) as err:
            await store.acquire("sess-test-missing", "token-a")
        assert err.value.param == "session_id"
        assert "sess-test-missing" in err.value.message

    run(make_store, body)


def test_commit_with_the_lease_and_next_version_replaces_and_clears_the_lease(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        v2 = next_version(rec)
        await store.commit(v2, "token-a")
        assert await store.get(rec.session_id) == v2
        # the lease is gone: anyone may continue, and the next commit builds on version 2
        assert await store.acquire(rec.session_id, "token-b") == v2
        v3 = next_version(v2)
        await store.commit(v3, "token-b")
        assert await store.get(rec.session_id) == v3
        with pytest.raises(ConflictError):  # committing again without a new lease
            await store.commit(next_version(v3), "token-b")

    run(make_store, body)


def test_commit_with_a_wrong_token_conflicts_and_changes_nothing(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        with pytest.raises(ConflictError):
            await store.commit(next_version(rec), "token-b")
        assert await store.get(rec.session_id) == rec
        with pytest.raises(ConflictError):  # A still holds it
            await store.acquire(rec.session_id, "token-c")
        v2 = next_version(rec)
        await store.commit(v2, "token-a")
        assert await store.get(rec.session_id) == v2

    run(make_store, body)


def test_commit_of_a_stale_or_skipped_version_conflicts_and_changes_nothing(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        stale = next_version(rec).evolve(version=1)
        skipped = next_version(rec).evolve(version=3)
        for bad in (stale, skipped):
            with pytest.raises(ConflictError):
                await store.commit(bad, "token-a")
            assert await store.get(rec.session_id) == rec
        with pytest.raises(ConflictError):  # the lease survived the refused commits
            await store.acquire(rec.session_id, "token-b")
        v2 = next_version(rec)
        await store.commit(v2, "token-a")
        assert await store.get(rec.session_id) == v2

    run(make_store, body)


def test_commit_without_a_lease_conflicts(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        with pytest.raises(ConflictError):
            await store.commit(next_version(rec), "token-a")
        assert await store.get(rec.session_id) == rec

    run(make_store, body)


def test_release_with_a_wrong_token_keeps_the_lease(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        await store.release(rec.session_id, "token-b")
        with pytest.raises(ConflictError):
            await store.acquire(rec.session_id, "token-c")
        await store.release(rec.session_id, "token-a")
        await store.release(rec.session_id, "token-a")  # twice is harmless
        await store.release("sess-test-missing", "token-a")  # so is a missing session
        assert await store.get("sess-test-missing") is None
        assert await store.acquire(rec.session_id, "token-c") == rec

    run(make_store, body)


def test_a_renewed_lease_outlasts_many_leases(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        start = time.monotonic()
        while time.monotonic() - start < 3 * store.lease_seconds:
            await asyncio.sleep(store.lease_seconds / 3)
            await store.renew(rec.session_id, "token-a")
            with pytest.raises(ConflictError):
                await store.acquire(rec.session_id, "token-b")
        v2 = next_version(rec)
        await store.commit(v2, "token-a")
        assert await store.get(rec.session_id) == v2

    run(lambda: make_store(lease_seconds=1.0), body)


def test_renew_by_another_token_or_of_a_missing_session_fails_and_keeps_the_lease(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        with pytest.raises(ConflictError):
            await store.renew(rec.session_id, "token-a")  # not leased at all
        await store.acquire(rec.session_id, "token-a")
        with pytest.raises(ConflictError) as err:
            await store.renew(rec.session_id, "token-b")
        assert err.value.param == "session_id"
        assert rec.session_id in err.value.message
        with pytest.raises(NotFoundError):
            await store.renew("sess-test-missing", "token-a")
        with pytest.raises(ConflictError):
            await store.acquire(rec.session_id, "token-c")
        await store.renew(rec.session_id, "token-a")
        await store.commit(next_version(rec), "token-a")
        with pytest.raises(ConflictError):
            await store.renew(rec.session_id, "token-a")  # a commit ends the lease

    run(make_store, body)


def test_a_lease_that_ran_out_is_taken_and_its_holder_can_neither_renew_nor_commit(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        await asyncio.sleep(store.lease_seconds * 1.2)
        await store.renew(rec.session_id, "token-a")  # ran out, but nobody took it: still the holder's
        await asyncio.sleep(store.lease_seconds * 1.2)
        assert await store.acquire(rec.session_id, "token-b") == rec
        with pytest.raises(ConflictError):
            await store.renew(rec.session_id, "token-a")
        with pytest.raises(ConflictError):
            await store.commit(next_version(rec), "token-a")
        theirs = next_version(rec).evolve(tail="theirs")
        await store.commit(theirs, "token-b")
        assert await store.get(rec.session_id) == theirs

    run(lambda: make_store(lease_seconds=0.3), body)


def test_delete(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec, other = record(), record()
        await store.create(rec)
        await store.create(other)
        assert await store.delete(rec.session_id) is True
        assert await store.get(rec.session_id) is None
        assert await store.delete(rec.session_id) is False
        with pytest.raises(NotFoundError):
            await store.acquire(rec.session_id, "token-a")
        assert await store.get(other.session_id) == other
        await store.create(rec)  # the id is free again
        assert await store.get(rec.session_id) == rec

    run(make_store, body)


def test_commit_after_delete_is_not_found(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        rec = record()
        await store.create(rec)
        await store.acquire(rec.session_id, "token-a")
        assert await store.delete(rec.session_id) is True
        with pytest.raises(NotFoundError):
            await store.commit(next_version(rec), "token-a")
        assert await store.get(rec.session_id) is None  # not resurrected

    run(make_store, body)


def test_sessions_expire(make_store: StoreFactory) -> None:
    async def body(store: SessionStore) -> None:
        short = record(ttl=1.0)
        committed_short = record()
        long = record()
        for rec in (short, committed_short, long):
            await store.create(rec)
        await store.acquire(committed_short.session_id, "token-a")
        # a commit sets the expiry of the new version
        await store.commit(next_version(committed_short, ttl=1.0), "token-a")
        if isinstance(store, RedisStore):  # the key's TTL is expires_at - updated_at
            for rec in (short, committed_short):
                assert 0 < await store.client.pttl(PREFIX + rec.session_id) <= 1000
            assert 590_000 < await store.client.pttl(PREFIX + long.session_id) <= 600_000
        assert await store.get(short.session_id) == short
        await asyncio.sleep(1.2)
        assert await store.get(short.session_id) is None
        assert await store.get(committed_short.session_id) is None
        with pytest.raises(NotFoundError):
            await store.acquire(short.session_id, "token-b")
        assert await store.get(long.session_id) == long
        await store.create(short.evolve(expires_at=time.time() + 60))  # an expired id is free again

    run(make_store, body)


def test_in_process_store_keeps_the_most_recently_used() -> None:
    async def body(store: SessionStore) -> None:
        a, b, c, d, e = (record() for _ in range(5))
        for rec in (a, b, c):
            await store.create(rec)
        assert await store.get(a.session_id) == a  # a is now more recent than b
        await store.create(d)  # evicts b, the least recently used
        assert await store.get(b.session_id) is None
        await store.acquire(c.session_id, "token-c")  # acquiring uses c too
        await store.get(a.session_id)
        await store.create(e)  # evicts d
        assert await store.get(d.session_id) is None
        for rec in (a, c, e):
            assert await store.get(rec.session_id) == rec
        assert isinstance(store, InMemoryStore) and len(store.entries) == 3

    run(lambda: InMemoryStore(max_sessions=3), body)
