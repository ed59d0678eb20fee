"""Session fixtures: apps over the tiny checkpoints with either store, a Redis of a test's own, a Redis Cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.sessions.record import SessionRecord
from app.tools.redis_cluster import RedisCluster, start_redis_cluster
from tests.api.conftest import tiny_models_dir  # noqa: F401  (the session-scoped tiny checkpoints)
from tests.conftest import RedisServer

STORES = ("memory", "redis")
CELLS = ("tiny-lstm", "tiny-gru", "tiny-rnn")

ClientFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(tiny_models_dir: Path) -> Iterator[ClientFactory]:  # noqa: F811
    """A factory: make_client(redis_url=..., **settings) -> a started TestClient, closed at teardown."""
    with ExitStack() as stack:

        def make(models_dir: Path = tiny_models_dir, **overrides: Any) -> TestClient:
            settings = Settings(models_dir=models_dir, default_model="tiny-lstm", **overrides)
            return stack.enter_context(TestClient(create_app(settings)))

        yield make


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def api(store_kind: str, make_client: ClientFactory, request: pytest.FixtureRequest) -> TestClient:
    """A TestClient over the tiny models, with the in-process store or the test Redis."""
    if store_kind == "redis":
        return make_client(redis_url=request.getfixturevalue("redis_server").url)
    return make_client()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone (outage tests kill and restart it)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def stored(client: TestClient, session_id: str) -> SessionRecord | None:
    """The record as the app's own store holds it (run on the app's event loop)."""
    store = client.app.state.services.store  # type: ignore[attr-defined]
    assert client.portal is not None
    return client.portal.call(store.get, session_id)


def session_count(client: TestClient) -> int:
    """How many sessions the app's store holds (in Redis: keys under the session prefix)."""
    from app.sessions.redis_store import PREFIX, RedisStore

    store = client.app.state.services.store.inner  # type: ignore[attr-defined]  # inside MeteredStore
    if not isinstance(store, RedisStore):
        return len(store.entries)

    async def count() -> int:
        return len([key async for key in store.client.scan_iter(match=PREFIX + "*")])

    assert client.portal is not None
    return client.portal.call(count)


# -- a throwaway Redis Cluster ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster of the test session's own (tests that kill a node use `own_redis_cluster`).

    Its nodes' timeout is Redis's default, so a busy machine does not make a replica take over.
    """
    directory = tmp_path_factory.mktemp("redis-cluster")
    with start_redis_cluster(directory, node_timeout_ms=15_000, durable=False) as cluster:
        yield cluster


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster for this test alone, whose replicas take over a killed master within seconds."""
    with start_redis_cluster(tmp_path, node_timeout_ms=2000, durable=False) as cluster:
        yield cluster
