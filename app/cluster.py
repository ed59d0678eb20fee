"""The docker-compose topology as local processes: Redis, API replicas and a load balancer (`rnnserve cluster`).

Redis runs with appendonly on in a working directory of its own; each replica is `rnnserve serve`
(the Docker image's command: one uvicorn worker) with RNNSERVE_REDIS_URL pointing at it; the load
balancer is nginx running deploy/nginx.conf (its upstream, listen address and log paths rewritten)
when an nginx binary exists, else `TcpBalancer`, a round-robin TCP proxy that balances per
connection and so passes SSE and WebSocket through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
LbKind = Literal["auto", "nginx", "python"]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (held together, so never the same twice)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Child:
    """A child process, its output going to `log`."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:  # > RNNSERVE_SHUTDOWN_GRACE_SECONDS: replicas drain
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def spawn(name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    # A session of its own: a Ctrl-C in the terminal reaches only `rnnserve cluster`, which then
    # stops the children in order (balancer, replicas, Redis).
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Child(name, proc, log)


def wait_until(ready: Callable[[], bool], child: Child, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not child.alive():
            raise RuntimeError(f"{what} exited with {child.proc.returncode}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{child.tail()}")
        time.sleep(0.1)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- the pure-Python balancer ------------------------------------------------------------------------


class TcpBalancer:
    """Round-robin TCP proxy in a thread: each client connection goes, whole, to the next backend.

    Per connection, not per request: a keep-alive client stays on one replica, and an SSE stream
    or a WebSocket passes through byte for byte, unbuffered. A backend that refuses the connection
    is skipped; with none left the client gets a 503 in the API's error shape.
    """

    def __init__(self, host: str, port: int, backends: list[tuple[str, int]]) -> None:
        self.host, self.port, self.backends = host, port, backends
        self.connections: Counter[str] = Counter()  # "host:port" of a backend -> connections sent to it
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rnnserve-balancer", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"balancer did not start on {self.host}:{self.port}: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); a thread has no caller to raise to
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self._proxy(reader, writer)
            finally:
                tasks.discard(task)

        server = await asyncio.start_server(handle, self.host, self.port, reuse_address=True)
        self._started.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            host, port = self.backends[self._next]
            self._next = (self._next + 1) % len(self.backends)
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=5)
            except (OSError, TimeoutError):
                continue
            self.connections[f"{host}:{port}"] += 1
            return upstream
        return None

    async def _proxy(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            body = json.dumps(
                {"error": {"type": "service_unavailable_error", "message": "no API replica answers", "param": None}}
            ).encode()
            head = f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            client_w.write(head.encode() + b"\r\nconnection: close\r\n\r\n" + body)
            with contextlib.suppress(OSError):
                await client_w.drain()
            client_w.close()
            return
        up_r, up_w = upstream
        pipes = [asyncio.create_task(pipe(client_r, up_w)), asyncio.create_task(pipe(up_r, client_w))]
        try:
            # both directions to their end (a half-close is passed on); a reset ends both
            _done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            for task in pipes:
                task.cancel()
            for w in (client_w, up_w):
                w.close()


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copies src to dst as the bytes arrive, then half-closes dst."""
    while data := await src.read(65536):
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof() and not dst.is_closing():
        dst.write_eof()


# -- nginx with deploy/nginx.conf --------------------------------------------------------------------


TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_nginx_conf(text: str, listen: str, backends: list[tuple[str, int]], logs: Path, temp: Path) -> str:
    """deploy/nginx.conf for local processes: these backends and listen address, logs and temp files here.

    Everything else (buffering, timeouts, WebSocket headers, body limit) stays as written. Raises
    ValueError when a line it rewrites is no longer in the file.
    """
    servers = "\n".join(f"        server {h}:{p} max_fails=1 fail_timeout=5s;" for h, p in backends)
    temp_paths = "".join(f"\n    {kind}_temp_path {temp / kind};" for kind in TEMP_KINDS)
    access_log = logs / "access.log"
    rewrites: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"^[ \t]*server[ \t]+api:8000\b[^;]*;[ \t]*$", lambda m: servers),
        (r"^([ \t]*)listen[ \t]+8000;", lambda m: f"{m[1]}listen {listen};"),
        (r"^([ \t]*)access_log[ \t]+/dev/stdout[ \t]+upstream;", lambda m: f"{m[1]}access_log {access_log} upstream;"),
        (r"^http[ \t]*\{", lambda m: "http {" + temp_paths),
    ]
    for pattern, replace in rewrites:
        text, count = re.subn(pattern, replace, text, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"nginx.conf: expected one line matching {pattern!r}, found {count}")
    return text


class NginxBalancer:
    """nginx running deploy/nginx.conf in front of local backends; round robin per request.

    Its configuration and logs go to `prefix`; its temp files to a directory of their own under the
    system's temp directory, where nginx's workers (nobody, when started as root) can reach them.
    """

    def __init__(self, nginx: str, host: str, port: int, backends: list[tuple[str, int]], prefix: Path) -> None:
        self.nginx, self.host, self.port, self.backends, self.prefix = nginx, host, port, backends, prefix
        self.temp: Path | None = None
        self.child: Child | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.temp = Path(tempfile.mkdtemp(prefix="rnnserve-nginx-"))
        for kind in TEMP_KINDS:
            (self.temp / kind).mkdir()
        conf = self.prefix / "nginx.conf"
        listen = f"{self.host}:{self.port}"
        conf.write_text(render_nginx_conf(NGINX_CONF.read_text(), listen, self.backends, self.prefix, self.temp))
        directives = f"daemon off; pid {self.prefix / 'nginx.pid'};"
        if os.geteuid() == 0:
            directives += self._unprivileged_workers(self.temp)
        args = [self.nginx, "-e", "stderr", "-p", str(self.prefix), "-c", str(conf), "-g", directives]
        self.child = spawn("nginx", args, self.prefix / "nginx.log")
        wait_until(lambda: accepts(self.host, self.port), self.child, "nginx", timeout)

    @staticmethod
    def _unprivileged_workers(temp: Path) -> str:
        import grp
        import pwd

        nobody = pwd.getpwnam("nobody")
        temp.chmod(0o711)
        for kind in TEMP_KINDS:
            os.chown(temp / kind, nobody.pw_uid, nobody.pw_gid)
        return f" user {nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name};"

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    @property
    def connections(self) -> Counter[str]:
        """Requests per backend "host:port", from the access log's upstream= field."""
        log = self.prefix / "access.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return Counter(re.findall(r"(?:upstream=|, )(\d+\.\d+\.\d+\.\d+:\d+)", text))


# -- the whole topology ------------------------------------------------------------------------------


@dataclass
class Cluster:
    """A running twin of docker-compose.yml; `stop()` ends every process and removes a temporary workdir."""

    url: str
    replica_urls: list[str]
    redis_url: str
    workdir: Path
    lb: str
    balancer: TcpBalancer | NginxBalancer | None = None
    children: list[Child] = field(default_factory=list)
    remove_workdir: bool = False

    def backend_hits(self) -> dict[str, int]:
        """Per replica URL: connections (python balancer) or requests (nginx) the balancer sent it."""
        counts = self.balancer.connections if self.balancer is not None else Counter()
        return {url: counts[url.removeprefix("http://")] for url in self.replica_urls}

    def dead(self) -> list[str]:
        """Names of the processes (and balancer) that are no longer running."""
        names = [c.name for c in self.children if not c.alive()]
        if self.balancer is not None and not self.balancer.alive():
            names.append(f"balancer ({self.lb})")
        return names

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        # in reverse order of starting: the replicas, then Redis (which fsyncs its append-only file)
        for child in reversed(self.children):
            child.stop()
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(
    port: int = 8000,
    host: str = "127.0.0.1",
    replicas: int = 2,
    redis_port: int | None = None,
    api_ports: list[int] | None = None,
    lb: LbKind = "auto",
    env: dict[str, str] | None = None,
    workdir: Path | None = None,
    startup_timeout: float = 120.0,
) -> Cluster:
    """Starts Redis, the replicas and the balancer, each once the one before is ready.

    `env` adds to (or overrides) the replicas' environment; RNNSERVE_REDIS_URL is always the
    cluster's Redis. Ports left out are free ones on 127.0.0.1. A temporary workdir holds Redis'
    files and every log, and goes away on stop(); a given one is kept.
    """
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    nginx = shutil.which("nginx") if lb in ("auto", "nginx") and NGINX_CONF.exists() else None
    if lb == "nginx" and nginx is None:
        raise RuntimeError("--lb nginx: no nginx binary on PATH (or no deploy/nginx.conf)")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("no redis-server on PATH")
    if api_ports is not None and len(api_ports) != replicas:
        raise ValueError(f"{replicas} replicas need {replicas} API ports, got {len(api_ports)}")
    ports = free_ports(replicas + 1)
    redis_port = redis_port or ports[0]
    api_ports = api_ports or ports[1:]

    remove = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="rnnserve-cluster-")) if workdir is None else workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        url=f"http://{host}:{port}",
        replica_urls=[f"http://127.0.0.1:{p}" for p in api_ports],
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        workdir=workdir,
        lb="nginx" if nginx else "python",
        remove_workdir=remove,
    )
    try:
        redis_dir = workdir / "redis"
        redis_dir.mkdir(mode=0o700, exist_ok=True)
        redis_args = [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
                      "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]  # fmt: skip
        redis = spawn("redis", redis_args, workdir / "redis.log")
        cluster.children.append(redis)
        wait_until(lambda: redis_pong(redis_port), redis, "redis-server", 10)

        child_env = {**os.environ, **(env or {}), "RNNSERVE_REDIS_URL": cluster.redis_url}
        for i, api_port in enumerate(api_ports, 1):
            # the image's command: one uvicorn worker, graceful shutdown, the WebSocket frame limit
            args = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(api_port),
                    "--log-level", child_env.get("RNNSERVE_LOG_LEVEL", "info")]  # fmt: skip
            cluster.children.append(spawn(f"api-{i}", args, workdir / f"api-{i}.log", child_env))
        for url, child in zip(cluster.replica_urls, cluster.children[1:], strict=True):
            wait_until(functools.partial(http_ok, f"{url}/readyz"), child, f"{child.name} ({url})", startup_timeout)

        backends = [("127.0.0.1", p) for p in api_ports]
        cluster.balancer = (
            NginxBalancer(nginx, host, port, backends, workdir / "nginx")
            if nginx
            else TcpBalancer(host, port, backends)
        )
        cluster.balancer.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def redis_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def serve(port: int, host: str, replicas: int, redis_port: int | None, lb: LbKind, workdir: Path | None) -> int:
    """`rnnserve cluster`: start everything, print where it is, run until Ctrl-C or SIGTERM."""
    # SIGTERM as Ctrl-C, so that both stop the children, also while they are starting
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cluster = start_cluster(port=port, host=host, replicas=replicas, redis_port=redis_port, lb=lb, workdir=workdir)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"rnnserve cluster: {exc}", file=sys.stderr)
        return 1
    with cluster:
        how = "nginx, deploy/nginx.conf, per request" if cluster.lb == "nginx" else "python, per connection"
        print(f"load balancer  {cluster.url}  ({how})", flush=True)
        for i, (url, child) in enumerate(zip(cluster.replica_urls, cluster.children[1:], strict=True), 1):
            print(f"replica {i}      {url}  (log {child.log})")
        print(f"redis          {cluster.redis_url}  (appendonly, in {cluster.workdir / 'redis'})")
        print("Ctrl-C stops them all.", flush=True)
        try:
            while not (dead := cluster.dead()):
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping", flush=True)
            return 0
        print(f"rnnserve cluster: {', '.join(dead)} exited; stopping the others", file=sys.stderr)
        return 1
