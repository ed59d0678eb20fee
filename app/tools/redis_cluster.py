"""A throwaway local Redis Cluster (masters with a replica each, on free ports) for tests and `rnnserve loadtest`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from app.tools.cluster import Child, redis_pong, spawn, wait_until

BUS_OFFSET = 10_000  # a cluster node's bus listens on its port + 10000


def cluster_ports(n: int) -> list[int]:
    """n ports that were free a moment ago, each with its bus port (+10000) free too."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
            port = s.getsockname()[1]
            if port + BUS_OFFSET > 65535:
                continue
            bus = socket.socket()
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                bus.close()
                continue
            held.append(bus)
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


@dataclass
class RedisCluster:
    """A running cluster: `url` for RNNSERVE_REDIS_URL (with RNNSERVE_REDIS_CLUSTER=true); `stop()` ends it."""

    directory: Path
    ports: list[int]
    nodes: dict[int, Child] = field(default_factory=dict)  # port -> its redis-server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, port: int) -> redis.Redis:
        """A plain (not cluster-aware) client of the node on `port`; close it after use."""
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)

    def query(self, port: int, *command: str) -> str:
        with self.client(port) as r:
            return str(r.execute_command(*command))

    def alive_ports(self) -> list[int]:
        return [p for p, child in self.nodes.items() if child.alive()]

    def roles(self) -> dict[int, str]:
        """Port -> "master" or "replica" of every node a live one knows of, failed ones left out."""
        found: dict[int, str] = {}
        for line in self.query(self.alive_ports()[0], "CLUSTER", "NODES").splitlines():
            flags = line.split()[2].split(",")
            if "fail" not in flags:
                node_port = int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                found[node_port] = "master" if "master" in flags else "replica"
        return found

    def masters(self) -> list[int]:
        return sorted(p for p, role in self.roles().items() if role == "master")

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot."""
        with self.client(self.alive_ports()[0]) as r:
            slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
            return next(int(s[2][1]) for s in r.execute_command("CLUSTER", "SLOTS") if s[0] <= slot <= s[1])

    def healthy(self) -> bool:
        """Every live node says the cluster is ok (every slot served by a master that is not failed)."""
        ports = self.alive_ports()
        return bool(ports) and all("cluster_state:ok" in self.query(p, "CLUSTER", "INFO") for p in ports)

    def in_sync(self, master: int) -> bool:
        """The master on `master` has a replica online that holds everything it wrote."""
        with self.client(master) as r:
            info = r.info("replication")
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return any(rep["state"] == "online" and rep["offset"] == info["master_repl_offset"] for rep in replicas)

    def replicas_in_sync(self) -> bool:
        masters = self.masters()
        return len(masters) == len(self.ports) // 2 and all(self.in_sync(m) for m in masters)

    def failed_over(self, port: int) -> bool:
        """The master that was on `port` is replaced: another node serves its slots, the cluster is ok."""
        try:
            return port not in self.masters() and self.healthy()
        except redis.RedisError:  # a node too busy to answer in time: not yet
            return False

    def wait(self, ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Polls `ready` (a node that does not answer yet counts as not ready) until it holds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not so after {timeout:.0f}s; logs in {self.directory}")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        """kill -9 of the node on `port`."""
        child = self.nodes[port]
        child.proc.kill()
        child.proc.wait(10)

    def stop(self) -> None:
        for child in self.nodes.values():
            child.stop(timeout=10)

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis_cluster(
    directory: Path, masters: int = 3, node_timeout_ms: int = 2000, durable: bool = True, timeout: float = 60.0
) -> RedisCluster:
    """Starts 2 x `masters` nodes and joins them, a replica per master; returns once every slot is served
    and every replica holds all its master wrote. `node_timeout_ms` is how long a silent master has
    before its replica takes over; `durable` nodes keep an append-only file, fsynced on every write."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("no redis-server or redis-cli on PATH")
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    cluster = RedisCluster(directory, cluster_ports(2 * masters))
    try:
        for port in cluster.ports:
            node_dir = directory / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), *persistence, "--save", "",
                    "--loglevel", "warning"]  # fmt: skip
            child = spawn(f"redis-{port}", args, node_dir / "redis.log")
            cluster.nodes[port] = child
            wait_until(lambda p=port: redis_pong(p), child, f"redis-server on {port}", 10)  # type: ignore[misc]
        create = [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in cluster.ports],
                  "--cluster-replicas", "1", "--cluster-yes"]  # fmt: skip
        created = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{(created.stdout + created.stderr)[-2000:]}")
        cluster.wait(lambda: cluster.healthy() and cluster.replicas_in_sync(), "every slot served, replicas in sync")
    except BaseException:
        cluster.stop()
        raise
    return cluster
