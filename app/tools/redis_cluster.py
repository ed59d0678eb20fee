"""A throwaway local Redis Cluster (masters with a replica each, on free ports) for tests and `rnnserve loadtest`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("no redis-cli on PATH")
    result = subprocess.run([cli, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout)
    return result.stdout


@dataclass
class RedisCluster:
    """A running cluster: `url` for RNNSERVE_REDIS_URL (with RNNSERVE_REDIS_CLUSTER=true); `stop()` ends it."""

    directory: Path
    ports: list[int]
    nodes: dict[int, Child] = field(default_factory=dict)  # port -> its redis-server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def alive_ports(self) -> list[int]:
        return [p for p, child in self.nodes.items() if child.alive()]

    def roles(self) -> dict[int, str]:
        """Port -> "master" or "replica" of every node the live ones know of, failed ones left out."""
        found: dict[int, str] = {}
        for port in self.alive_ports():
            for line in redis_cli(port, "cluster", "nodes").splitlines():
                fields = line.split()
                if len(fields) < 3 or "fail" in fields[2].split(","):
                    continue
                node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                found[node_port] = "master" if "master" in fields[2].split(",") else "replica"
            if found:
                return found
        return found

    def masters(self) -> list[int]:
        return sorted(p for p, role in self.roles().items() if role == "master")

    def healthy(self) -> bool:
        """Every live node says the cluster is ok (every slot served) and no node is marked failed."""
        ports = self.alive_ports()
        return bool(ports) and all("cluster_state:ok" in redis_cli(p, "cluster", "info") for p in ports)

    def failed_over(self, port: int) -> bool:
        """The master that was on `port` is replaced: another node serves its slots, the cluster is ok."""
        return port not in self.masters() and self.healthy()

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
    directory: Path, masters: int = 3, node_timeout_ms: int = 2000, timeout: float = 60.0
) -> RedisCluster:
    """Starts 2 x `masters` nodes (append-only, fsync on every write) and joins them, a replica per
    master; returns once every slot is served and every replica is in sync with its master.
    `node_timeout_ms` is how long a silent master has before its replica takes over."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("no redis-server on PATH")
    cluster = RedisCluster(directory, cluster_ports(2 * masters))
    try:
        for port in cluster.ports:
            node_dir = directory / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--appendonly", "yes",
                    "--appendfsync", "always", "--save", "", "--loglevel", "warning"]  # fmt: skip
            child = spawn(f"redis-{port}", args, node_dir / "redis.log")
            cluster.nodes[port] = child
            wait_until(lambda p=port: redis_pong(p), child, f"redis-server on {port}", 10)  # type: ignore[misc]
        addresses = [f"127.0.0.1:{p}" for p in cluster.ports]
        created = redis_cli(cluster.ports[0], "--cluster", "create", *addresses, "--cluster-replicas", "1",
                            "--cluster-yes", timeout=timeout)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (cluster.healthy() and replicas_in_sync(cluster)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ready after {timeout:.0f}s:\n{created[-2000:]}")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def replicas_in_sync(cluster: RedisCluster) -> bool:
    replicas = [p for p, role in cluster.roles().items() if role == "replica"]
    return len(replicas) == len(cluster.ports) // 2 and all(
        "master_link_status:up" in redis_cli(p, "info", "replication") for p in replicas
    )
