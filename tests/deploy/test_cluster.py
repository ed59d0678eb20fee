"""`rnnserve cluster`, the supervised process twin of docker-compose.yml: sessions move between replicas, nginx
spreads and retries, replicas get cores of their own, a killed process comes back on its address."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.sync.client import connect

from app.tools.cluster import Cluster, CpuShare, accepts, cpu_shares, free_ports, http_ok, start_cluster
from tests.api.conftest import write_tiny_models
from tests.conftest import require_redis_server
from tests.deploy.conftest import ROOT

PROMPT = "First Citizen:\n"


def tiny_env(models: Path) -> dict[str, str]:
    return {"RNNSERVE_MODELS_DIR": str(models), "RNNSERVE_DEFAULT_MODEL": "tiny-lstm", "RNNSERVE_TORCH_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cluster-models")
    write_tiny_models(directory)
    return directory


@pytest.fixture(scope="module")
def cluster(nginx: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_redis_server()
    workdir = tmp_path_factory.mktemp("cluster")
    c = start_cluster(port=free_ports(1)[0], env=tiny_env(tiny_models), workdir=workdir)
    try:
        yield c
    finally:
        c.stop()
    # stop() leaves nothing running and nothing listening
    assert all(child.proc.returncode is not None for child in c.children)
    for url in [c.url, *c.replica_urls, c.redis_url]:
        host, port = re.search(r"//([\d.]+):(\d+)", url).groups()  # type: ignore[union-attr]
        assert not accepts(host, int(port)), url


def post(url: str, **body: Any) -> dict[str, Any]:
    """One request on a connection of its own."""
    response = httpx.post(f"{url}/generate", json=body, timeout=60, trust_env=False)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_topology(cluster: Cluster) -> None:
    assert [c.name for c in cluster.children] == ["redis", "api-1", "api-2", "trainer", "nginx"]
    assert len(cluster.replica_urls) == 2 and cluster.url not in cluster.replica_urls
    port = int(cluster.redis_url.rsplit(":", 1)[1].split("/")[0])
    with redis.Redis(port=port) as r:
        assert r.config_get("appendonly") == {"appendonly": "yes"}
    for url in cluster.replica_urls:
        ready = httpx.get(f"{url}/readyz", trust_env=False).json()
        assert ready["store"] == "redis" and ready["store_ok"] is True, ready
    assert cluster.dead() == []


def test_greedy_session_continues_exactly_on_the_other_replica(cluster: Cluster) -> None:
    one, two = cluster.replica_urls
    first = post(one, prompt=PROMPT, strategy="greedy", max_tokens=30)
    second = post(two, session_id=first["session_id"], strategy="greedy", max_tokens=30)
    whole = post(cluster.url, prompt=PROMPT, strategy="greedy", max_tokens=60, save_session=False)
    assert first["text"] + second["text"] == whole["text"]
    assert second["session_id"] == first["session_id"]
    info = httpx.get(f"{one}/sessions/{first['session_id']}", trust_env=False).json()
    assert info["chars"] == second["usage"]["session_chars"] == len(PROMPT) + 60


def test_seeded_sampled_session_continues_exactly_on_the_other_replica(cluster: Cluster) -> None:
    one, two = cluster.replica_urls
    first = post(two, prompt=PROMPT, seed=7, max_tokens=40)
    second = post(one, session_id=first["session_id"], max_tokens=40)  # no seed: the stored generator goes on
    whole = post(one, prompt=PROMPT, seed=7, max_tokens=80, save_session=False)
    assert len(set(whole["text"])) > 5  # a sample, not one character over and over
    assert first["text"] + second["text"] == whole["text"]


def test_balancer_sends_requests_to_both_replicas(cluster: Cluster) -> None:
    before = cluster.backend_hits()
    first = post(cluster.url, prompt=PROMPT, seed=3, max_tokens=20)
    texts = [first["text"]]
    session = first["session_id"]
    for _ in range(5):
        texts.append(post(cluster.url, session_id=session, max_tokens=20)["text"])
    whole = post(cluster.url, prompt=PROMPT, seed=3, max_tokens=120, save_session=False)
    assert "".join(texts) == whole["text"]
    deadline = time.monotonic() + 10  # nginx logs a request once its response is sent: a moment after we read it
    while True:
        after = cluster.backend_hits()
        spread = {url: after[url] - before[url] for url in cluster.replica_urls}
        if sum(spread.values()) >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(spread.values()) == 7 and all(n >= 3 for n in spread.values()), spread


def test_sse_streams_through_the_balancer(cluster: Cluster) -> None:
    body = {"prompt": PROMPT, "seed": 11, "max_tokens": 50, "stream": True, "save_session": False}
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("POST", f"{cluster.url}/generate", json=body, timeout=60, trust_env=False) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event is not None:
                events.append((event, json.loads(line.removeprefix("data: "))))
    assert [e for e, _ in events][-1] == "done" and {e for e, _ in events[:-1]} == {"token"}
    streamed = "".join(data["text"] for _, data in events[:-1])
    plain = post(cluster.url, prompt=PROMPT, seed=11, max_tokens=50, save_session=False)
    assert streamed == events[-1][1]["text"] == plain["text"]


def test_websocket_through_the_balancer_continues_its_session(cluster: Cluster) -> None:
    ws_url = cluster.url.replace("http://", "ws://") + "/ws/generate"
    texts = []
    session = None
    with connect(ws_url, open_timeout=30) as ws:
        for request in ({"prompt": PROMPT, "seed": 5, "max_tokens": 25}, {"max_tokens": 25}):
            ws.send(json.dumps({"type": "generate", **request, **({"session_id": session} if session else {})}))
            tokens = []
            while (message := json.loads(ws.recv(timeout=60)))["type"] == "token":
                tokens.append(message["text"])
            assert message["type"] == "done", message
            assert "".join(tokens) == message["text"]
            texts.append(message["text"])
            session = message["session_id"]
    whole = post(cluster.url, prompt=PROMPT, seed=5, max_tokens=50, save_session=False)
    assert "".join(texts) == whole["text"]


def test_body_over_the_limit_is_413_in_the_error_shape(cluster: Cluster) -> None:
    body = b'{"prompt": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = httpx.post(
        f"{cluster.url}/generate", content=body, headers={"content-type": "application/json"}, trust_env=False
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "payload_too_large_error" and "2097152" in error["message"]


def test_cli_runs_until_sigterm_and_stops_everything(nginx: str, tiny_models: Path, tmp_path: Path) -> None:
    require_redis_server()
    port = free_ports(1)[0]
    args = [sys.executable, "-m", "app.cli", "cluster", "--port", str(port), "--replicas", "1",
            "--workdir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, **tiny_env(tiny_models)}
    with subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True)
        reader.start()
        output = []
        try:
            deadline = time.monotonic() + 120
            while not output or "Ctrl-C stops them all." not in output[-1]:
                assert proc.poll() is None and time.monotonic() < deadline, "".join(output)
                with contextlib.suppress(queue.Empty):
                    output.append(lines.get(timeout=1))
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False).status_code == 200
            # nginx killed: its orphaned workers go too, and it is back on the same port, logged
            os.kill(int((tmp_path / "nginx" / "nginx.pid").read_text()), signal.SIGKILL)
            while "nginx restarted" not in "".join(output) or not http_ok(f"http://127.0.0.1:{port}/readyz"):
                assert proc.poll() is None and time.monotonic() < deadline + 60, "".join(output)
                with contextlib.suppress(queue.Empty):
                    output.append(lines.get(timeout=1))
            assert "nginx exited with -9; restarting in 1 s" in "".join(output)
            text = "".join(output)
            ports = [port, *map(int, re.findall(r"(?:replica 1|redis) +\w+://127\.0\.0\.1:(\d+)", text))]
            assert len(ports) == 3, text
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(timeout=10)
    assert all(not accepts("127.0.0.1", p) for p in ports)
    assert (tmp_path / "redis" / "appendonlydir").is_dir()  # a given workdir is kept, with Redis' files


def test_replicas_get_cores_of_their_own_when_there_are_enough() -> None:
    assert cpu_shares(2, [0, 1, 2, 3]) == [CpuShare(cpus=(0, 1)), CpuShare(cpus=(2, 3))]
    assert cpu_shares(2, [5, 1, 3]) == [CpuShare(cpus=(1, 3)), CpuShare(cpus=(5,))]
    assert cpu_shares(3, [0, 1]) == [CpuShare(threads=1)] * 3  # too few: a thread budget each, never 0
    assert cpu_shares(2, [0, 1, 2, 3, 4], pin=False) == [CpuShare(threads=2)] * 2


def test_each_replica_runs_on_its_share(cluster: Cluster) -> None:
    assert cluster.shares == cpu_shares(2, sorted(os.sched_getaffinity(0)))
    for child, share in zip(cluster.replicas, cluster.shares, strict=True):
        if share.cpus:
            assert os.sched_getaffinity(child.proc.pid) == set(share.cpus)
        else:
            assert (child.env or {})["RNNSERVE_TORCH_THREADS"] == "1"  # tiny_env's, kept over the budget


def test_a_killed_redis_is_restarted_with_its_sessions(cluster: Cluster) -> None:
    session = post(cluster.url, prompt=PROMPT, max_tokens=5)["session_id"]
    time.sleep(1.5)  # appendfsync everysec: on disk within a second
    redis_child = cluster.child("redis")
    old_pid = redis_child.proc.pid
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the replicas reconnect by themselves: 503 until then
        response = httpx.get(f"{cluster.url}/sessions/{session}", timeout=30, trust_env=False)
        if response.status_code == 200:
            break
        assert response.status_code == 503 and time.monotonic() < deadline, response.text
        time.sleep(0.2)
    assert response.json()["chars"] == len(PROMPT) + 5
    assert redis_child.proc.pid != old_pid and redis_child.restarts == 1
    assert any(e.startswith("redis exited with -9") for e in cluster.events), cluster.events


def test_a_replica_killed_under_load_is_restarted_while_nginx_answers(cluster: Cluster) -> None:
    """kill -9 of one replica under a light steady load: nginx answers at least 99% of the requests sent
    while it is down with 200 (the window runs from the kill until the replica is back and at least
    100 requests were sent), of those in flight at the kill only the ones the dead replica had
    received fail, the replica is back on its address within 60 s, and the cluster keeps running."""
    victim, address = cluster.replicas[0], cluster.replica_urls[0]
    old_pid = victim.proc.pid
    done: list[tuple[float, float, int]] = []  # (sent, answered, status; 0: no HTTP answer)
    stop = threading.Event()

    def client(c: int) -> None:
        session = None
        with httpx.Client(timeout=60, trust_env=False) as http:
            for i in range(10**6):
                if stop.is_set():
                    return
                body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 4, "strategy": "greedy"}
                if i % 3 == 0:
                    body["save_session"] = False
                elif session is not None:
                    body = {"session_id": session, "max_tokens": 4, "strategy": "greedy"}
                sent = time.monotonic()
                try:
                    response = http.post(f"{cluster.url}/generate", json=body)
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                done.append((sent, time.monotonic(), status))
                # a session whose continuation died with its replica stays leased: take a new one
                session = response.json().get("session_id") if status == 200 else None

    clients = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(2)]
    for t in clients:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while len(done) < 20:
            assert time.monotonic() < deadline, "no steady load before the kill"
            time.sleep(0.1)
        killed = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        while not http_ok(f"{address}/readyz"):
            assert time.monotonic() - killed < 60, f"replica not back on {address}: {cluster.events}"
            time.sleep(0.2)
        back = time.monotonic() - killed
        while sum(sent >= killed for sent, _, _ in done) < 100:
            assert time.monotonic() < killed + 300, "too few requests after the kill"
            time.sleep(0.1)
        end = time.monotonic()
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=70)
    window = [status for sent, _, status in done if killed <= sent <= end]
    ok = sum(status == 200 for status in window)
    assert ok >= 0.99 * len(window), (f"{ok}/{len(window)} answered 200", sorted(set(window)))
    in_flight = [status for sent, answered, status in done if sent < killed <= answered]
    assert sum(status != 200 for status in in_flight) <= len(clients)  # each client had one request out
    assert back < 60 and victim.proc.pid != old_pid and victim.restarts == 1
    assert any(e.startswith("api-1 exited with -9") for e in cluster.events), cluster.events
    assert cluster.dead() == []
