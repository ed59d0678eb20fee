"""SIGTERM on a real `rnnserve serve` process: running streams end with `done`, sessions are saved, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.api.conftest import write_tiny_models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_drains_streams_and_exits_zero(tmp_path: Path, redis_server) -> None:  # type: ignore[no-untyped-def]
    write_tiny_models(tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "RNNSERVE_MODELS_DIR": str(tmp_path),
        "RNNSERVE_DEFAULT_MODEL": "tiny-rnn",
        "RNNSERVE_REDIS_URL": redis_server.url,
        "RNNSERVE_SHUTDOWN_GRACE_SECONDS": "1",
        "RNNSERVE_MAX_TOKENS_LIMIT": "100000000",  # a generation the tiny model cannot finish in the grace period
    }
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        events: list[tuple[str, dict]] = []
        body = {"prompt": "A", "max_tokens": 100_000_000, "stream": True, "strategy": "greedy"}
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=30) as r:
            name = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if len(events) == 3:
                        proc.send_signal(signal.SIGTERM)
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
        done = events[-1][1]
        streamed = "".join(d["text"] for k, d in events if k == "token")
        assert done["text"] == streamed
        assert done["finish_reason"] == "cancelled"
        assert 0 < len(streamed) < 100_000_000
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the cancelled generation's session was saved before the process exited
    import redis

    client = redis.Redis.from_url(redis_server.url)
    assert done["session_id"]
    assert client.exists(f"rnnserve:session:{done['session_id']}")
    client.close()
