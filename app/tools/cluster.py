"""The docker-compose topology as supervised local processes: Redis, API replicas and nginx (`rnnserve cluster`).

Redis runs with appendonly on in a working directory of its own; each replica is `rnnserve serve`
(the Docker image's command: one uvicorn worker) with RNNSERVE_REDIS_URL pointing at it, on cores
of its own where the host has enough; nginx runs deploy/nginx.conf with its upstream, listen address
and log paths rewritten. A process that exits is restarted on the same address after a back-off, by
a small supervisor thread rather than supervisord: the tests, `rnnserve loadtest` and `rnnserve
bench` drive the same `Cluster` object in process (its children's pids, readiness), and supervisord
gives a process up for good after a few failed starts.
"""

from __future__ import annotations

import contextlib
import functools
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.procs import stop

REPO_ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
# a restart waits 1 s, then twice as long after each exit that came within STABLE_SECONDS of its start
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0


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
    """A child process that can be started again with the same command; its output goes to `log`."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] = field(init=False)
    started: float = 0.0  # monotonic time of the last start
    restarts: int = 0
    backoff: float = BACKOFF_FIRST

    def start(self) -> None:
        # a session of its own: a Ctrl-C in the terminal reaches only `rnnserve cluster`, which then
        # stops the children in order (nginx, replicas, Redis)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def reap_group(self) -> None:
        """Kills what the exited process left in its session (nginx's workers outlive a killed master)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 30.0) -> None:  # > RNNSERVE_SHUTDOWN_GRACE_SECONDS: replicas drain
        stop(self.proc, timeout)
        self.reap_group()


def spawn(name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    child = Child(name, args, log, env)
    child.start()
    return child


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


def redis_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# -- CPUs per replica --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuShare:
    """What one replica may use: cores of its own (`cpus`), or `threads` on cores the replicas share."""

    cpus: tuple[int, ...] = ()
    threads: int = 0

    def describe(self) -> str:
        if self.cpus:
            return f"cpus {','.join(map(str, self.cpus))}"
        return f"RNNSERVE_TORCH_THREADS={self.threads}" if self.threads else "every cpu"


def cpu_shares(replicas: int, cpus: Sequence[int], pin: bool = True) -> list[CpuShare]:
    """Each replica its own cores when there are at least as many as replicas (the first ones one more
    when they do not divide evenly), else a thread budget of cores // replicas (at least 1) each:
    replicas that each size their pools to the whole host spin against each other."""
    ordered = sorted(cpus)
    if pin and len(ordered) >= replicas:
        per, extra = divmod(len(ordered), replicas)
        shares, first = [], 0
        for i in range(replicas):
            n = per + (i < extra)
            shares.append(CpuShare(cpus=tuple(ordered[first : first + n])))
            first += n
        return shares
    return [CpuShare(threads=max(1, len(ordered) // replicas))] * replicas


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


# -- nginx with deploy/nginx.conf --------------------------------------------------------------------


TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_nginx_conf(text: str, listen: str, backends: list[tuple[str, int]], logs: Path, temp: Path) -> str:
    """deploy/nginx.conf for local processes: these backends and listen address, logs and temp files here.

    Everything else (retries, failure marking, buffering, timeouts, WebSocket headers, body limit)
    stays as written, the upstream server's parameters included (less `resolve`: the addresses are
    fixed). Raises ValueError when a line it rewrites is no longer in the file.
    """

    def servers(m: re.Match[str]) -> str:
        params = "".join(f" {p}" for p in m[2].split() if p != "resolve")
        return "\n".join(f"{m[1]}server {h}:{p}{params};" for h, p in backends)

    temp_paths = "".join(f"\n    {kind}_temp_path {temp / kind};" for kind in TEMP_KINDS)
    access_log = logs / "access.log"
    rewrites: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"^([ \t]*)server[ \t]+api:8000\b([^;]*);[ \t]*$", servers),
        (r"^([ \t]*)listen[ \t]+8000;", lambda m: f"{m[1]}listen {listen};"),
        (r"^([ \t]*)access_log[ \t]+/dev/stdout[ \t]+upstream;", lambda m: f"{m[1]}access_log {access_log} upstream;"),
        (r"^http[ \t]*\{", lambda m: "http {" + temp_paths),
    ]
    for pattern, replace in rewrites:
        text, count = re.subn(pattern, replace, text, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"nginx.conf: expected one line matching {pattern!r}, found {count}")
    return text


def find_nginx() -> str:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if nginx is None:
        raise RuntimeError("rnnserve cluster needs nginx (Debian/Ubuntu: apt-get install nginx)")
    return nginx


def nginx_child(host: str, port: int, backends: list[tuple[str, int]], prefix: Path, temp: Path) -> Child:
    """nginx running deploy/nginx.conf in front of `backends`, its configuration and logs in `prefix`.

    Its temp files go to `temp`, a directory where nginx's workers (nobody, when started as root)
    can reach them.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    for kind in TEMP_KINDS:
        (temp / kind).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(NGINX_CONF.read_text(), f"{host}:{port}", backends, prefix, temp))
    directives = f"daemon off; pid {prefix / 'nginx.pid'};"
    if os.geteuid() == 0:
        import grp
        import pwd

        nobody = pwd.getpwnam("nobody")
        temp.chmod(0o711)
        for kind in TEMP_KINDS:
            os.chown(temp / kind, nobody.pw_uid, nobody.pw_gid)
        directives += f" user {nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name};"
    args = [find_nginx(), "-e", "stderr", "-p", str(prefix), "-c", str(conf), "-g", directives]
    return spawn("nginx", args, prefix / "nginx.log")


# -- the whole topology ------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"rnnserve cluster: {message}", file=sys.stderr, flush=True)


@dataclass
class Cluster:
    """A running twin of docker-compose.yml whose processes are restarted when they exit;
    `stop()` ends every process and removes a temporary workdir."""

    url: str
    replica_urls: list[str]
    redis_url: str
    workdir: Path
    shares: list[CpuShare]
    children: list[Child] = field(default_factory=list)  # Redis, the replicas, nginx: the order of starting
    remove_workdir: bool = False
    temp: Path | None = None  # nginx's temp files
    events: list[str] = field(default_factory=list)  # every exit and restart, as logged
    log: Callable[[str], None] = say
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _supervisor: threading.Thread | None = field(default=None, init=False)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    @property
    def replicas(self) -> list[Child]:
        return [c for c in self.children if c.name.startswith("api-")]

    def backend_hits(self) -> dict[str, int]:
        """Per replica URL: requests nginx sent it, from the access log's upstream= field."""
        log = self.workdir / "nginx" / "access.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        counts = Counter(re.findall(r"(?:upstream=|, )(\d+\.\d+\.\d+\.\d+:\d+)", text))
        return {url: counts[url.removeprefix("http://")] for url in self.replica_urls}

    def dead(self) -> list[str]:
        """Names of the processes not running at this moment (a restart may be due)."""
        return [c.name for c in self.children if not c.alive()]

    def supervise(self) -> None:
        self._supervisor = threading.Thread(target=self._supervise, name="rnnserve-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        due: dict[str, float] = {}  # child name -> monotonic time of its restart
        while not self._stopping.wait(0.1):
            now = time.monotonic()
            for child in self.children:
                if child.alive():
                    if now - child.started > STABLE_SECONDS:
                        child.backoff = BACKOFF_FIRST
                elif child.name not in due:
                    child.reap_group()
                    due[child.name] = now + child.backoff
                    self.note(f"{child.name} exited with {child.proc.returncode}; restarting in {child.backoff:g} s")
                elif now >= due[child.name]:
                    del due[child.name]
                    child.start()
                    child.restarts += 1
                    child.backoff = min(2 * child.backoff, BACKOFF_MAX)
                    self.note(f"{child.name} restarted (pid {child.proc.pid}, restart {child.restarts})")

    def note(self, message: str) -> None:
        self.events.append(message)
        self.log(message)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        # in reverse order of starting: nginx, the replicas, then Redis (which fsyncs its append-only file)
        for child in reversed(self.children):
            child.stop()
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
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
    env: dict[str, str] | None = None,
    workdir: Path | None = None,
    startup_timeout: float = 120.0,
    split_cpus: bool = True,
    log: Callable[[str], None] = say,
) -> Cluster:
    """Starts Redis, the replicas, a training worker and nginx, each once the one before is ready, then supervises them.

    `env` adds to (or overrides) the replicas' environment; RNNSERVE_REDIS_URL is always the
    cluster's Redis. With `split_cpus` each replica runs on cores of its own (`cpu_shares`); a
    RNNSERVE_TORCH_THREADS given in `env` or the environment is kept. Ports left out are free ones
    on 127.0.0.1. A temporary workdir holds Redis' files and every log, and goes away on stop(); a
    given one is kept.
    """
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    find_nginx()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("no redis-server on PATH")
    if api_ports is not None and len(api_ports) != replicas:
        raise ValueError(f"{replicas} replicas need {replicas} API ports, got {len(api_ports)}")
    ports = free_ports(replicas + 1)
    redis_port = redis_port or ports[0]
    api_ports = api_ports or ports[1:]
    taskset = shutil.which("taskset")
    shares = cpu_shares(replicas, usable_cpus(), pin=split_cpus and taskset is not None)
    if not split_cpus:
        shares = [CpuShare()] * replicas

    remove = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="rnnserve-cluster-")) if workdir is None else workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        url=f"http://{host}:{port}",
        replica_urls=[f"http://127.0.0.1:{p}" for p in api_ports],
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        workdir=workdir,
        shares=shares,
        remove_workdir=remove,
        log=log,
    )
    try:
        redis_dir = workdir / "redis"
        redis_dir.mkdir(mode=0o700, exist_ok=True)
        redis_args = [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
                      "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]  # fmt: skip
        redis = spawn("redis", redis_args, workdir / "redis.log")
        cluster.children.append(redis)
        wait_until(lambda: redis_pong(redis_port), redis, "redis-server", 10)

        base_env = {**os.environ, **(env or {}), "RNNSERVE_REDIS_URL": cluster.redis_url}
        for i, (api_port, share) in enumerate(zip(api_ports, shares, strict=True), 1):
            child_env = dict(base_env)
            if share.threads and "RNNSERVE_TORCH_THREADS" not in base_env:
                child_env["RNNSERVE_TORCH_THREADS"] = str(share.threads)
            # the image's command: one uvicorn worker, graceful shutdown, the WebSocket frame limit
            args = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(api_port),
                    "--log-level", child_env.get("RNNSERVE_LOG_LEVEL", "info")]  # fmt: skip
            if share.cpus and taskset is not None:
                args = [taskset, "--cpu-list", ",".join(map(str, share.cpus)), *args]
            cluster.children.append(spawn(f"api-{i}", args, workdir / f"api-{i}.log", child_env))
        # training jobs (POST /trainings) run here, niced below the replicas, as compose's `trainer`
        trainer = [shutil.which("nice") or "nice", "-n", "10", sys.executable, "-m", "app.cli", "worker"]
        cluster.children.append(spawn("trainer", trainer, workdir / "trainer.log", base_env))
        for url, child in zip(cluster.replica_urls, cluster.replicas, strict=True):
            wait_until(functools.partial(http_ok, f"{url}/readyz"), child, f"{child.name} ({url})", startup_timeout)

        cluster.temp = Path(tempfile.mkdtemp(prefix="rnnserve-nginx-"))
        backends = [("127.0.0.1", p) for p in api_ports]
        nginx = nginx_child(host, port, backends, workdir / "nginx", cluster.temp)
        cluster.children.append(nginx)
        wait_until(lambda: accepts(host, port), nginx, "nginx", 10)
    except BaseException:
        cluster.stop()
        raise
    cluster.supervise()
    return cluster


def serve(port: int, host: str, replicas: int, redis_port: int | None, workdir: Path | None, split_cpus: bool) -> int:
    """`rnnserve cluster`: start everything, print where it is, restart what exits until Ctrl-C or SIGTERM."""
    # SIGTERM as Ctrl-C, so that both stop the children, also while they are starting
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cluster = start_cluster(
            port=port, host=host, replicas=replicas, redis_port=redis_port, workdir=workdir, split_cpus=split_cpus
        )
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"rnnserve cluster: {exc}", file=sys.stderr)
        return 1
    with cluster:
        print(f"load balancer  {cluster.url}  (nginx, deploy/nginx.conf, per request)", flush=True)
        for i, (url, child, share) in enumerate(
            zip(cluster.replica_urls, cluster.replicas, cluster.shares, strict=True), 1
        ):
            print(f"replica {i}      {url}  ({share.describe()}; log {child.log})")
        print(f"redis          {cluster.redis_url}  (appendonly, in {cluster.workdir / 'redis'})")
        print(f"trainer        rnnserve worker  (training jobs; log {cluster.workdir / 'trainer.log'})")
        print("A process that exits is restarted; Ctrl-C stops them all.", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping", flush=True)
            return 0
