"""Training jobs end to end: the API over a real redis-server, a real `rnnserve worker` process, the model served."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.procs import stop
from tests.api.conftest import ROOT, error_of, write_tiny_models
from tests.conftest import TINY_TEXT, RedisServer

WAIT_S = 180.0  # a generous bound for a job of seconds on a loaded machine (torch's import included)
ADMIN, OTHER_ADMIN, USER = "admin-key-1", "admin-key-2", "user-key-1"
# about 12 kB, enough for a corpus with held-out splits
TEXT = "\n".join(f"{i}. {line}" for i in range(12) for line in TINY_TEXT.splitlines() if line) + "\n"


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Worker:
    """`rnnserve worker` in a subprocess, on the test Redis."""

    def __init__(self, url: str, models_dir: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
        env.update(PYTHONPATH=str(ROOT), RNNSERVE_REDIS_URL=url, RNNSERVE_MODELS_DIR=str(models_dir),
                   RNNSERVE_TRAINING_THREADS="1", RNNSERVE_LOG_LEVEL="info")  # fmt: skip
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    url = redis_server.url.rsplit("/", 1)[0] + "/6"  # a database of its own
    yield url
    with redis.Redis.from_url(url) as r:
        r.flushdb()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("train-models")
    write_tiny_models(directory)
    return directory


@pytest.fixture(scope="module")
def worker(redis_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(redis_url, models_dir, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield w
    finally:
        w.stop()


def make_client(models_dir: Path, redis_url: str | None, **settings: Any) -> TestClient:
    fields: dict[str, Any] = {"models_dir": models_dir, "default_model": "tiny-lstm", "redis_url": redis_url,
                              "models_poll_seconds": 0.5, "max_training_text_bytes": 20_000,
                              "max_training_minutes": 5, "max_training_hidden_size": 64, "max_training_layers": 2,
                              "sse_keepalive_seconds": 1, **settings}  # fmt: skip
    return TestClient(create_app(Settings(**fields)))


@pytest.fixture(scope="module")
def client(models_dir: Path, redis_url: str, worker: Worker) -> Iterator[TestClient]:
    with make_client(models_dir, redis_url, admin_keys=f"{ADMIN},{OTHER_ADMIN}", api_keys=USER) as c:
        yield c


def auth(key: str = ADMIN) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def job(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "text": TEXT, "arch": "gru", "hidden_size": 16, "num_layers": 1, "minutes": 0.05, **fields}


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def events(client: TestClient, job_id: str, key: str = ADMIN) -> list[tuple[str, dict[str, Any]]]:
    """The job's SSE events until `done`."""
    out: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/trainings/{job_id}/events", headers=auth(key) if key else {}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                assert event is not None
                out.append((event, json.loads(line[6:])))
    return out


def status_of(client: TestClient, job_id: str, key: str = ADMIN) -> dict[str, Any]:
    r = client.get(f"/trainings/{job_id}", headers=auth(key) if key else {})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_a_job_runs_to_success_and_its_model_is_served(client: TestClient, models_dir: Path) -> None:
    name = unique("mine")
    r = client.post("/trainings", json=job(name), headers=auth())
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["name"] == name and body["progress"]["step"] == 0
    seen = events(client, body["id"])
    kinds = [e for e, _ in seen]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"progress"}
    statuses = [d["status"] for _, d in seen]
    assert "running" in statuses, statuses
    done = seen[-1][1]
    assert done["status"] == "succeeded", done
    assert done["error"] is None and done["progress"]["step"] > 0 and done["progress"]["chars"] > 0
    assert done["progress"]["train_loss"] is not None and done["progress"]["val_loss"] is not None
    assert done["metrics"]["val_nats_per_char"] > 0 and done["metrics"]["test_nats_per_char"] > 0
    assert done["curve"] and done["curve"][-1]["step"] == done["progress"]["step"]
    meta = json.loads((models_dir / name / "meta.json").read_text())
    assert meta["training_job"] == body["id"] and meta["owner"] and meta["metrics"] == done["metrics"]
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")], "the workspace is left behind"
    # the registry picks the new directory up; the model serves at once
    wait_for(lambda: client.get(f"/models/{name}", headers=auth()).status_code == 200, "the model to be served")
    g = client.post("/generate", json={"model": name, "prompt": "All:", "max_tokens": 20}, headers=auth(USER))
    assert g.status_code == 200, g.text
    assert len(g.json()["text"]) == 20
    assert body["id"] in [t["id"] for t in client.get("/trainings", headers=auth()).json()["trainings"]]
    # the model is its maker's: only that key may replace it, and only when it asks to
    again = client.post("/trainings", json=job(name), headers=auth())
    assert again.status_code == 409 and "overwrite" in error_of(again)["message"]
    theirs = client.post("/trainings", json=job(name, overwrite=True), headers=auth(OTHER_ADMIN))
    assert theirs.status_code == 409 and "another key" in error_of(theirs)["message"]
    sha = meta["sha256"]
    replaced = client.post("/trainings", json=job(name, overwrite=True, arch="lstm"), headers=auth())
    assert replaced.status_code == 202, replaced.text
    assert events(client, replaced.json()["id"])[-1][1]["status"] == "succeeded"
    meta = json.loads((models_dir / name / "meta.json").read_text())
    assert meta["training_job"] == replaced.json()["id"] and meta["sha256"] != sha
    wait_for(lambda: client.get(f"/models/{name}", headers=auth()).json()["arch"] == "lstm", "the new weights")


def test_cancel_stops_a_running_job_and_a_queued_one(client: TestClient, models_dir: Path, redis_url: str) -> None:
    running_name, queued_name = unique("long"), unique("next")
    first = client.post("/trainings", json=job(running_name, minutes=5), headers=auth()).json()
    second = client.post("/trainings", json=job(queued_name, minutes=5), headers=auth()).json()
    wait_for(lambda: status_of(client, first["id"])["progress"]["step"] > 0, "the first job to train")
    assert status_of(client, second["id"])["status"] == "queued"  # one worker: the second waits
    r = client.delete(f"/trainings/{second['id']}", headers=auth())
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"/trainings/{first['id']}", headers=auth())
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    cancelled_at = time.monotonic()
    # the work horse is gone within seconds: the worker is idle again and no workspace is left
    from rq import Worker as RqWorker

    with redis.Redis.from_url(redis_url) as conn:

        def idle() -> bool:
            workers = RqWorker.all(connection=conn)
            return bool(workers) and all(w.get_state() == "idle" for w in workers)

        wait_for(idle, "the worker to stop the job", timeout=30)
    assert time.monotonic() - cancelled_at < 30
    assert not (models_dir / running_name).exists() and not (models_dir / queued_name).exists()
    wait_for(lambda: not [p for p in models_dir.iterdir() if p.name.startswith(".training-")], "workspace removal")
    assert status_of(client, first["id"])["status"] == "cancelled"
    again = client.delete(f"/trainings/{first['id']}", headers=auth())
    assert again.status_code == 409 and error_of(again)["param"] == "id"


def test_a_job_that_cannot_train_fails_with_its_reason(client: TestClient) -> None:
    r = client.post("/trainings", json=job(unique("small"), text="Too small a text.\n"), headers=auth())
    assert r.status_code == 202, r.text
    done = events(client, r.json()["id"])[-1][1]
    assert done["status"] == "failed" and done["error"], done
    assert "characters" in done["error"] or "small" in done["error"], done["error"]


def test_a_text_can_be_uploaded_as_a_file(client: TestClient) -> None:
    name = unique("upload")
    r = client.post(
        "/trainings",
        data={"name": name, "arch": "rnn", "hidden_size": "16", "num_layers": "1", "minutes": "3"},
        files={"text": ("book.txt", TEXT.encode(), "text/plain")},
        headers=auth(),
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["arch"] == "rnn" and body["text_chars"] == len(TEXT) and body["minutes"] == 3
    assert client.delete(f"/trainings/{body['id']}", headers=auth()).json()["status"] == "cancelled"
    bad = client.post("/trainings", data={"name": name}, files={"text": ("b.bin", b"\xff\xfe\x00", "x")},
                      headers=auth())  # fmt: skip
    assert bad.status_code == 422 and error_of(bad)["param"] == "text"


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"name": "../../etc"}, 422, "name"),
        ({"name": ".hidden"}, 422, "name"),
        ({"name": "a" * 65}, 422, "name"),
        ({"arch": "transformer"}, 422, "arch"),
        ({"hidden_size": 65}, 422, "hidden_size"),
        ({"num_layers": 3}, 422, "num_layers"),
        ({"minutes": 6}, 422, "minutes"),
        ({"minutes": 0}, 422, "minutes"),
        ({"text": "x" * 20_001}, 413, "text"),
        ({"text": ""}, 422, "text"),
        ({"name": "tiny-lstm"}, 409, "name"),  # exists, no overwrite asked
        ({"name": "tiny-lstm", "overwrite": True}, 409, "name"),  # not this key's model
        ({"epochs": 3}, 422, "epochs"),
    ],
)
def test_limits_answer_in_the_error_shape_naming_the_field(
    client: TestClient, fields: dict[str, Any], status: int, param: str
) -> None:
    r = client.post("/trainings", json={**job("limits"), **fields}, headers=auth())
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["param"] == param and param in err["message"]


def test_jobs_per_key_are_limited(models_dir: Path, redis_url: str, worker: Worker) -> None:
    with make_client(models_dir, redis_url, max_trainings_per_key=1) as c:
        first = c.post("/trainings", json=job(unique("one"), minutes=5))
        assert first.status_code == 202
        try:
            second = c.post("/trainings", json=job(unique("two")))
            assert second.status_code == 429 and "1" in error_of(second)["message"]
            assert "Retry-After" in second.headers
            same = c.post("/trainings", json=job(first.json()["name"], minutes=5))
            assert same.status_code in (409, 429)
        finally:
            assert c.delete(f"/trainings/{first.json()['id']}").status_code == 200


def test_a_job_and_its_model_belong_to_the_key_that_made_it(client: TestClient) -> None:
    r = client.post("/trainings", json=job(unique("owned"), minutes=5), headers=auth(ADMIN))
    job_id = r.json()["id"]
    try:
        assert client.get(f"/trainings/{job_id}", headers=auth(OTHER_ADMIN)).status_code == 404
        assert client.delete(f"/trainings/{job_id}", headers=auth(OTHER_ADMIN)).status_code == 404
        assert client.get(f"/trainings/{job_id}/events", headers=auth(OTHER_ADMIN)).status_code == 404
        listed = client.get("/trainings", headers=auth(OTHER_ADMIN)).json()["trainings"]
        assert job_id not in [t["id"] for t in listed]
    finally:
        assert client.delete(f"/trainings/{job_id}", headers=auth(ADMIN)).status_code == 200


@pytest.mark.parametrize(
    ("keys", "key", "status"),
    [
        ({}, "", 200),  # no keys at all: open
        ({"api_keys": USER}, USER, 403),  # API keys but no admin keys: nobody trains
        ({"api_keys": USER}, "", 401),
        ({"api_keys": USER, "admin_keys": ADMIN}, ADMIN, 200),
        ({"api_keys": USER, "admin_keys": ADMIN}, USER, 403),
        ({"api_keys": USER, "admin_keys": ADMIN}, "wrong", 401),
        ({"admin_keys": ADMIN}, ADMIN, 200),
        ({"admin_keys": ADMIN}, "", 401),
    ],
)
def test_who_may_train(models_dir: Path, redis_url: str, keys: dict[str, str], key: str, status: int) -> None:
    with make_client(models_dir, redis_url, **keys) as c:
        headers = auth(key) if key else {}
        assert c.get("/trainings", headers=headers).status_code == status
        r = c.post("/trainings", json=job("x", hidden_size=10_000), headers=headers)
        assert r.status_code == (422 if status == 200 else status)
        if status != 200:
            assert set(error_of(r)) == {"type", "message", "param"}


def test_without_redis_the_server_runs_its_own_queue_and_worker(tmp_path: Path) -> None:
    write_tiny_models(tmp_path)
    with make_client(tmp_path, None) as c:
        r = c.post("/trainings", json=job("local", hidden_size=8, minutes=0.03))
        assert r.status_code == 202, r.text
        done = events(c, r.json()["id"], key="")[-1][1]
        assert done["status"] == "succeeded", done
        assert (tmp_path / "local" / "meta.json").exists()
        local = c.app.state.trainings.local  # type: ignore[attr-defined]
        assert local is not None
        worker, server = local.worker, local.redis
    assert worker.poll() is not None and server.poll() is not None  # stopped with the server


def test_a_worker_stopped_mid_job_stops_it_and_reports_it_failed(redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/8"  # a queue no other worker takes from
    w = Worker(url, tmp_path, tmp_path / "worker.log")
    try:
        with make_client(tmp_path, url) as c:
            job_id = c.post("/trainings", json=job("stopped", minutes=5)).json()["id"]
            wait_for(lambda: status_of(c, job_id, "")["progress"]["step"] > 0, "the job to train")
            w.proc.terminate()
            assert w.proc.wait(timeout=30) is not None  # SIGTERM does not wait for minutes of training
            done = wait_for(lambda: (s := status_of(c, job_id, ""))["status"] != "running" and s, "the job to end")
            assert done["status"] == "failed" and "worker stopped" in done["error"]
            assert not (tmp_path / "stopped").exists()
    finally:
        w.stop()
        with redis.Redis.from_url(url) as r:
            r.flushdb()


def test_an_unreachable_redis_is_a_503_in_the_error_shape(models_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket closes
    with make_client(models_dir, f"redis://127.0.0.1:{port}/0") as c:
        for r in (c.get("/trainings"), c.post("/trainings", json=job(unique("down")))):
            assert r.status_code == 503, r.text
            assert "Redis" in error_of(r)["message"]
