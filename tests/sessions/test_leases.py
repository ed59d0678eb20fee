"""Session leases with a short lease: renewed for as long as a continuation runs, freed when their holder
dies, and a generation whose lease was taken stops with an error and saves nothing. Each with the in-process
store, a redis-server and a Redis Cluster."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api import serving
from app.api.schemas import GenerateRequest
from app.api.serving import DoneEvent, ErrorEvent, StreamEvent, TokenEvent
from app.engine.engine import ModelEngine
from app.sessions.record import SessionRecord
from app.sessions.redis_store import PREFIX, RedisStore
from tests.api.conftest import error_of
from tests.api.test_stream import iter_sse, slow_down
from tests.conftest import RedisServer
from tests.sessions.conftest import STORES, ClientFactory, stored

LEASE = 2.0  # seconds; renewed every third of it, so a process stalled for over a third would lose it
STEP = 0.01  # seconds each engine step takes at least, once slowed down: n characters take n * STEP seconds or more
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[*STORES, "redis-cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def leased(store_kind: str, make_client: ClientFactory, request: pytest.FixtureRequest) -> TestClient:
    """An app over the tiny models whose leases last LEASE seconds, with a store of each kind."""
    if store_kind == "redis-cluster":
        return make_client(redis_url=request.getfixturevalue("redis_cluster").url, redis_cluster=True,
                           lease_seconds=LEASE)  # fmt: skip
    url = request.getfixturevalue("redis_server").url if store_kind == "redis" else None
    return make_client(redis_url=url, lease_seconds=LEASE)


def engine_of(client: TestClient, model: str) -> ModelEngine:
    engine: ModelEngine = client.app.state.services.engine.engines[model]  # type: ignore[attr-defined]
    return engine


def generate(client: TestClient | httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def session_chars(client: TestClient, session_id: str) -> int:
    response = client.get(f"/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()["chars"]


def holder(client: TestClient, session_id: str) -> tuple[str, float]:
    """The token holding the session's lease ("" if none) and when the lease runs out (epoch seconds)."""
    inner = client.app.state.services.store.inner  # type: ignore[attr-defined]

    async def read() -> tuple[str, float]:
        if isinstance(inner, RedisStore):
            lease, until = await inner.client.hmget(PREFIX + session_id, "lease", "lease_until")
            return (lease or b"").decode(), float(until or 0) / 1000
        entry = inner.entries.get(session_id)
        return (entry.lease, entry.lease_until) if entry else ("", 0.0)

    assert client.portal is not None
    return client.portal.call(read)


def wait_until_leased(client: TestClient, session_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (token := holder(client, session_id)[0]):
        assert time.monotonic() < deadline, "the continuation never took the session"
        time.sleep(0.01)
    return token


def take_over(client: TestClient, session_id: str) -> SessionRecord:
    """Another writer, as if the lease had run out: it takes the session and commits its own next version."""
    store = client.app.state.services.store  # type: ignore[attr-defined]

    async def take() -> SessionRecord:
        if isinstance(store.inner, RedisStore):
            await store.inner.client.hset(PREFIX + session_id, "lease_until", 0)
        else:
            store.inner.entries[session_id].lease_until = 0.0
        record = await store.acquire(session_id, "another-writer")
        theirs: SessionRecord = record.evolve(version=record.version + 1, tail="another writer's", chars=1)
        await store.commit(theirs, "another-writer")
        return theirs

    assert client.portal is not None
    return client.portal.call(take)


def continue_until_served(client: TestClient, session_id: str, deadline: float) -> dict[str, Any]:
    """Continue the session (3 characters) until a replica lets us, failing at `deadline`."""
    while True:
        response = client.post("/generate", json={"session_id": session_id, "max_tokens": 3})
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 409, response.text
        assert error_of(response)["type"] == "conflict_error"
        assert time.monotonic() < deadline, "the session was not freed in time"
        time.sleep(0.1)


# -- renewed while it runs ------------------------------------------------------------------------


def test_a_generation_that_runs_for_many_leases_is_never_joined_and_commits_at_the_end(
    leased: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = generate(leased, model="tiny-rnn", prompt=PROMPT, max_tokens=5)
    sid, before = made["session_id"], made["usage"]["session_chars"]
    slow_down(monkeypatch, engine_of(leased, "tiny-rnn"), STEP)
    n = int(4 * LEASE / STEP)  # runs four leases at least
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        long = pool.submit(leased.post, "/generate", json={"session_id": sid, "max_tokens": n})
        token = wait_until_leased(leased, sid)
        _, first_until = holder(leased, sid)
        tries = 0
        # the long generation cannot end before start + 4 leases: every try here meets it
        while time.monotonic() < start + 3 * LEASE:
            other = leased.post("/generate", json={"session_id": sid, "max_tokens": 1, "save_session": False})
            assert other.status_code == 409, other.text
            assert error_of(other)["type"] == "conflict_error"
            assert holder(leased, sid)[0] == token  # the same lease all along, never taken over
            tries += 1
            time.sleep(LEASE / 10)
        _, last_until = holder(leased, sid)
        response = long.result(timeout=120)
    assert tries
    assert last_until > first_until + LEASE  # renewed
    assert time.monotonic() - start >= 4 * LEASE
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["session_chars"] == before + n
    assert session_chars(leased, sid) == before + n
    assert holder(leased, sid)[0] == ""  # the commit ended the lease
    assert generate(leased, session_id=sid, max_tokens=2)["usage"]["session_chars"] == before + n + 2


def test_a_stream_read_slowly_for_many_leases_keeps_its_session_and_commits_at_the_end(leased: TestClient) -> None:
    """The generation is done long before its reader is: the lease lives until the done event, not the engine."""
    whole = generate(leased, prompt=PROMPT, strategy="greedy", max_tokens=40)
    first = generate(leased, prompt=PROMPT, strategy="greedy", max_tokens=20)
    sid = first["session_id"]
    svc = leased.app.state.services  # type: ignore[attr-defined]
    assert leased.portal is not None
    portal = leased.portal

    async def start() -> Any:
        req = GenerateRequest(session_id=sid, strategy="greedy", max_tokens=20, stream=True)
        job, stream = await serving.start_stream(req, svc, "")
        return serving.stream_events(job, stream, svc)

    events = portal.call(start)
    received: list[StreamEvent | None] = [portal.call(events.__anext__)]
    begun = time.monotonic()
    while time.monotonic() < begun + 3 * LEASE:  # the reader dawdles for three leases
        refused = leased.post("/generate", json={"session_id": sid, "max_tokens": 1, "save_session": False})
        assert refused.status_code == 409, refused.text
        time.sleep(LEASE / 5)
    while not isinstance(received[-1], DoneEvent | ErrorEvent):
        received.append(portal.call(events.__anext__))
    done = received[-1]
    assert isinstance(done, DoneEvent), done
    text = "".join(ev.text for ev in received if isinstance(ev, TokenEvent))
    assert first["text"] + text == whole["text"]
    assert done.response.usage.session_chars == len(PROMPT) + 40
    assert session_chars(leased, sid) == len(PROMPT) + 40


# -- lost when not --------------------------------------------------------------------------------


def test_a_lease_that_is_not_renewed_frees_the_session_at_its_last_committed_state(leased: TestClient) -> None:
    made = generate(leased, prompt=PROMPT, max_tokens=5)
    sid, before = made["session_id"], made["usage"]["session_chars"]
    store = leased.app.state.services.store  # type: ignore[attr-defined]
    assert leased.portal is not None
    start = time.monotonic()
    leased.portal.call(store.acquire, sid, "a-replica-that-died")  # and never renews
    refused = leased.post("/generate", json={"session_id": sid, "max_tokens": 3})
    assert refused.status_code == 409
    out = continue_until_served(leased, sid, deadline=start + 3 * LEASE + 5)
    assert time.monotonic() - start >= LEASE * 0.9  # not before the lease ran out
    assert out["usage"]["session_chars"] == before + 3


REPLICA = """
import sys, time
import pytest
from app.config import Settings
from tests.api.conftest import LiveServer
from tests.api.test_stream import engine_of, slow_down

models, url, lease, step = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
settings = Settings(models_dir=models, default_model="tiny-rnn", redis_url=url, lease_seconds=lease)
server = LiveServer(settings).__enter__()
slow_down(pytest.MonkeyPatch(), engine_of(server, "tiny-rnn"), step)
print(server.url, flush=True)
time.sleep(3600)
"""


@pytest.fixture
def replica(tiny_models_dir: Path, redis_server: RedisServer) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A replica in a process of its own (sharing the test Redis, its engine slowed down), and its URL."""
    args = [sys.executable, "-c", REPLICA, str(tiny_models_dir), redis_server.url, str(LEASE), str(STEP)]
    proc = subprocess.Popen(args, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), f"the replica did not start (exit {proc.poll()})"
        yield proc, url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_replica_killed_mid_continuation_frees_its_session_for_another_within_three_leases(
    replica: tuple[subprocess.Popen[str], str], make_client: ClientFactory, redis_server: RedisServer
) -> None:
    proc, url = replica
    other = make_client(redis_url=redis_server.url, lease_seconds=LEASE)
    made = generate(other, model="tiny-rnn", prompt=PROMPT, max_tokens=5)
    sid, before = made["session_id"], made["usage"]["session_chars"]
    body = {"session_id": sid, "max_tokens": 5000, "stream": True}  # fifty seconds at least
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = iter_sse(response)  # kept open: closing it would hang up on the replica
        streamed = next(data for name, data in events if name == "token")
        begun = time.monotonic()
        while time.monotonic() < begun + 2 * LEASE:  # the live replica renews its lease
            refused = other.post("/generate", json={"session_id": sid, "max_tokens": 1})
            assert refused.status_code == 409, refused.text
            time.sleep(LEASE / 5)
        proc.kill()  # kill -9, mid-stream
        killed = time.monotonic()
        proc.wait(timeout=30)
    out = continue_until_served(other, sid, deadline=killed + 3 * LEASE + 5)
    assert streamed["text"]
    # the characters the dead replica streamed never reached the session
    assert out["usage"]["session_chars"] == before + 3


# -- taken by another writer ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_generation_whose_lease_was_taken_stops_with_a_conflict_and_saves_nothing(
    leased: TestClient, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    sid = generate(leased, model="tiny-rnn", prompt=PROMPT, max_tokens=5)["session_id"]
    slow_down(monkeypatch, engine_of(leased, "tiny-rnn"), STEP)
    n = 5000  # fifty seconds at least, unless it stops
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        running = pool.submit(leased.post, "/generate", json={"session_id": sid, "max_tokens": n, "stream": stream})
        wait_until_leased(leased, sid)
        theirs = take_over(leased, sid)
        response = running.result(timeout=120)
    assert time.monotonic() - start < n * STEP  # it stopped early
    if stream:
        assert response.status_code == 200
        events = list(iter_sse(response))  # type: ignore[arg-type]
        names = [name for name, _ in events if name != "comment"]
        assert names[-1] == "error" and "done" not in names, names
        error = events[-1][1]["error"]
        assert sum(len(data["text"]) for name, data in events if name == "token") < n
    else:
        assert response.status_code == 409, response.text
        error = error_of(response)
    assert error["type"] == "conflict_error"
    assert error["param"] == "session_id"
    assert sid in error["message"]
    assert stored(leased, sid) == theirs  # the other writer's version, not overwritten
    # and the session goes on from the other writer's version
    assert generate(leased, session_id=sid, max_tokens=2)["usage"]["session_chars"] == theirs.chars + 2
