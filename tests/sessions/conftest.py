"""Session fixtures: apps over the tiny checkpoints with either store, a Redis of a test's own, a Redis Cluster."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.sessions.record import SessionRecord
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


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port in taken or port + 10_000 > 65_535 or port == 6379:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port


class RedisClusterNodes:
    """A throwaway Redis Cluster of 3 masters and 3 replicas on free ports, without persistence.

    A replica takes over a master that did not answer for `node_timeout_ms`.
    """

    def __init__(self, directory: Path, node_timeout_ms: int = 15_000) -> None:
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        ports: set[int] = set()
        for _ in range(6):
            ports.add(free_cluster_port(ports))
        self.ports = sorted(ports)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for port in self.ports:
            args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                    "--loglevel", "warning"]  # fmt: skip
            with open(self.directory / f"redis-{port}.log", "ab") as log:
                self.procs[port] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        self.wait(lambda: all(self.ping(p) for p in self.ports), "the nodes did not start")
        create = ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                  "--cluster-replicas", "1", "--cluster-yes"]  # fmt: skip
        out = subprocess.run(create, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        self.wait(lambda: all(self.info(p).get("cluster_state") == "ok" for p in self.ports), "the cluster is not ok")
        self.wait(lambda: all(self.in_sync(p) for p in self.masters()), "the replicas did not sync")

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)

    def kill(self, port: int) -> None:
        """`kill -9` the node on `port`."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def client(self, port: int) -> Any:
        import redis

        return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)

    def ping(self, port: int) -> bool:
        import redis

        try:
            with self.client(port) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    def info(self, port: int) -> dict[str, str]:
        """CLUSTER INFO of one node, as a dict."""
        with self.client(port) as r:
            text: str = r.execute_command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def live(self) -> list[int]:
        return [p for p in self.ports if p in self.procs]

    def masters(self) -> list[int]:
        with self.client(self.live()[0]) as r:
            return sorted({int(s[2][1]) for s in r.execute_command("CLUSTER", "SLOTS")})

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot."""
        with self.client(self.live()[0]) as r:
            slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
            return next(int(s[2][1]) for s in r.execute_command("CLUSTER", "SLOTS") if s[0] <= slot <= s[1])

    def in_sync(self, master: int) -> bool:
        """The master has a replica that has everything it wrote."""
        with self.client(master) as r:
            info = r.info("replication")
        offset = info.get("master_repl_offset")
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return any(rep.get("state") == "online" and rep.get("offset") == offset for rep in replicas)

    def wait(self, ready: Callable[[], bool], what: str, timeout: float = 30) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout} s; logs in {self.directory}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A Redis Cluster of the test session's own (tests that kill a node use `own_redis_cluster`).

    Its nodes' timeout is Redis's default, so a busy machine does not make a replica take over.
    """
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A Redis Cluster for this test alone, whose replicas take over a killed master within seconds."""
    cluster = RedisClusterNodes(tmp_path, node_timeout_ms=2000)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
