"""32 concurrent continuations of one session over real sockets, with Redis or a Redis Cluster: no update is lost."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.sessions.record import TAIL_CHARS
from app.tools.redis_cluster import RedisCluster
from tests.api.conftest import LiveServer, error_of
from tests.conftest import RedisServer

CLIENTS = 32


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_32_concurrent_continuations(tiny_models_dir: Path, cluster: bool, request: pytest.FixtureRequest) -> None:
    redis: RedisServer | RedisCluster = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    settings = Settings(
        models_dir=tiny_models_dir, default_model="tiny-gru", redis_url=redis.url, redis_cluster=cluster
    )
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        made = http.post("/generate", json={"prompt": "Speak.", "max_tokens": 10})
        sid, chars = made.json()["session_id"], made.json()["usage"]["session_chars"]
        barrier = threading.Barrier(CLIENTS)

        def continue_it(i: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                barrier.wait()
                return own.post("/generate", json={"session_id": sid, "max_tokens": 200 + i, "seed": i})

        for _ in range(3):
            with ThreadPoolExecutor(CLIENTS) as pool:
                responses = list(pool.map(continue_it, range(CLIENTS)))
            winners = [r.json() for r in responses if r.status_code == 200]
            losers = [r for r in responses if r.status_code != 200]
            assert winners, "somebody must win"
            for r in losers:
                assert r.status_code == 409 and error_of(r)["type"] == "conflict_error"
            # winners that did not overlap ran one after another: each counted from the one before
            chars += sum(w["usage"]["completion_chars"] for w in winners)
            after = http.get(f"/sessions/{sid}").json()
            assert after["chars"] == chars
            last = max(winners, key=lambda w: w["usage"]["session_chars"])
            assert last["usage"]["session_chars"] == chars
            assert after["tail"] == (last["text"])[-TAIL_CHARS:]
