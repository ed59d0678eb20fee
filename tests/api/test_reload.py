"""The registry follows its directory while serving: new, replaced, removed and half-written checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.checkpoint import META, WEIGHTS, save_checkpoint, update_meta
from app.config import Settings
from app.main import create_app
from app.nn import CharRNN, ModelConfig
from app.vocab import Vocab
from tests.api.conftest import TINY_VOCAB, LiveServer, error_of, write_tiny_models
from tests.api.test_stream import engine_of, iter_sse, services_of, slow_down, tokens_and_done, wait_for


def write_model(directory: Path, seed: int, arch: str = "gru", hidden_size: int = 16) -> str:
    """A tiny checkpoint at `directory` (written atomically); its sha256."""
    vocab = Vocab(TINY_VOCAB)
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(arch=arch, vocab_size=len(vocab), embedding_size=8, hidden_size=hidden_size))
    return save_checkpoint(directory, model.eval(), vocab, {"corpus": {"name": "tiny"}, "metrics": {}})


def retiring(server: LiveServer) -> int:
    reloader = services_of(server).reloader
    assert reloader is not None
    return reloader.retiring


def reload(url: str, **headers: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/admin/models/reload", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def generate(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=60)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    write_tiny_models(directory)
    return directory


@pytest.fixture
def server(models_dir: Path) -> Iterator[LiveServer]:
    """A server that scans its directory only when asked (the torch step: engines start fast)."""
    settings = Settings(models_dir=models_dir, default_model="tiny-lstm", models_poll_seconds=0, step="torch")
    with LiveServer(settings) as live:
        yield live


def test_a_model_dropped_into_the_directory_is_served_without_restart(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="tiny-lstm", models_poll_seconds=0.2)
    with LiveServer(settings) as live:
        assert httpx.get(f"{live.url}/models/fresh").status_code == 404
        digest = write_model(models_dir / "fresh", seed=5)
        assert wait_for(lambda: httpx.get(f"{live.url}/models/fresh").status_code == 200, timeout=30)
        assert httpx.get(f"{live.url}/models/fresh").json()["sha256"] == digest
        r = generate(live.url, model="fresh", prompt="Ab", max_tokens=20, strategy="greedy")
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "fresh" and len(r.json()["text"]) == 20
        assert "fresh" in [m["id"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]]


def test_reload_answers_what_was_added_replaced_removed_and_refused(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="tiny-lstm", models_poll_seconds=0, step="torch")
    with TestClient(create_app(settings)) as client:
        unchanged = client.post("/admin/models/reload").json()
        assert unchanged["added"] == unchanged["replaced"] == unchanged["removed"] == unchanged["refused"] == []
        write_model(models_dir / "new-one", seed=1)
        write_model(models_dir / "tiny-gru", seed=2)
        shutil.rmtree(models_dir / "tiny-rnn")
        broken = models_dir / "broken"
        broken.mkdir()
        (broken / WEIGHTS).write_bytes(b"not weights")
        answer = client.post("/admin/models/reload").json()
        assert answer["added"] == ["new-one"]
        assert answer["replaced"] == ["tiny-gru"]
        assert answer["removed"] == ["tiny-rnn"]
        assert [r["name"] for r in answer["refused"]] == ["broken"]
        assert "missing meta.json" in answer["refused"][0]["reason"]
        assert answer["models"] == ["new-one", "tiny-gru", "tiny-lstm"]
        assert answer["default"] == "tiny-lstm"
        assert [m["name"] for m in client.get("/models").json()["models"]] == answer["models"]


def test_a_served_model_replaced_by_a_broken_checkpoint_keeps_serving_its_old_weights(
    server: LiveServer, models_dir: Path
) -> None:
    sha = httpx.get(f"{server.url}/models/tiny-lstm").json()["sha256"]
    meta = json.loads((models_dir / "tiny-lstm" / META).read_text())
    (models_dir / "tiny-lstm" / META).write_text(json.dumps({**meta, "sha256": "f" * 64}))
    answer = reload(server.url)
    assert answer["replaced"] == [] and [r["name"] for r in answer["refused"]] == ["tiny-lstm"]
    assert "sha256 mismatch" in answer["refused"][0]["reason"]
    assert httpx.get(f"{server.url}/models/tiny-lstm").json()["sha256"] == sha
    assert generate(server.url, model="tiny-lstm", max_tokens=3).status_code == 200


def test_a_missing_models_directory_unloads_nothing(server: LiveServer, models_dir: Path) -> None:
    models_dir.rename(models_dir.with_name("elsewhere"))
    answer = reload(server.url)
    assert answer["removed"] == [] and answer["models"] == ["tiny-gru", "tiny-lstm", "tiny-rnn"]


def test_replicas_sharing_the_directory_converge(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="tiny-lstm", models_poll_seconds=0.2, step="torch")
    with LiveServer(settings) as one, LiveServer(settings) as two:
        write_model(models_dir / "shared", seed=8)
        shutil.rmtree(models_dir / "tiny-rnn")
        for live in (one, two):
            assert wait_for(lambda live=live: httpx.get(f"{live.url}/models/shared").status_code == 200, timeout=30)
            assert wait_for(lambda live=live: httpx.get(f"{live.url}/models/tiny-rnn").status_code == 404, timeout=30)
        shas = {httpx.get(f"{live.url}/models/shared").json()["sha256"] for live in (one, two)}
        assert len(shas) == 1


def test_metrics_written_after_training_are_served_without_a_swap(server: LiveServer, models_dir: Path) -> None:
    sha = httpx.get(f"{server.url}/models/tiny-gru").json()["sha256"]
    update_meta(models_dir / "tiny-gru", metrics={"val_nats_per_char": 1.25, "test_nats_per_char": 1.5})
    answer = reload(server.url)
    assert answer["added"] == answer["replaced"] == answer["removed"] == []
    info = httpx.get(f"{server.url}/models/tiny-gru").json()
    assert (info["sha256"], info["val_nats_per_char"], info["test_nats_per_char"]) == (sha, 1.25, 1.5)


def test_a_replaced_model_serves_new_requests_while_running_streams_finish_on_the_old_weights(
    server: LiveServer, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"model": "tiny-gru", "prompt": "All:", "max_tokens": 3000, "strategy": "greedy"}
    old = generate(server.url, **body).json()
    assert old["session_id"]
    old_sha = httpx.get(f"{server.url}/models/tiny-gru").json()["sha256"]
    slow_down(monkeypatch, engine_of(server, "tiny-gru"), 0.002)  # 3000 steps: at least 6 s
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=60) as running:
        events = iter_sse(running)
        first = next(events)
        assert first[0] == "token"
        new_sha = write_model(models_dir / "tiny-gru", seed=99, hidden_size=24)
        answer = reload(server.url)
        assert answer["replaced"] == ["tiny-gru"]
        assert httpx.get(f"{server.url}/models/tiny-gru").json()["sha256"] == new_sha != old_sha
        new = generate(server.url, **{**body, "max_tokens": 200})
        assert new.status_code == 200, new.text
        assert new.json()["text"] != old["text"][:200]  # other weights, another text
        rest = list(events)
    tokens, done = tokens_and_done([first, *rest])
    assert "".join(t["text"] for t in tokens) == done["text"] == old["text"]  # all of it on the old weights
    assert done["finish_reason"] == "length"
    # a session made on the old weights cannot go on with the new ones
    r = generate(server.url, session_id=old["session_id"], max_tokens=5)
    assert r.status_code == 409, r.text
    assert "another checkpoint" in error_of(r)["message"]
    # the old engine stops once its stream is done; the new one serves
    assert wait_for(lambda: engine_of(server, "tiny-gru").ckpt.sha256 == new_sha and not retiring(server))


def test_a_removed_model_is_404_for_new_requests_and_its_running_stream_finishes(
    server: LiveServer, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"model": "tiny-rnn", "prompt": "A", "max_tokens": 2000, "strategy": "greedy"}
    session = generate(server.url, **{**body, "max_tokens": 5}).json()["session_id"]
    slow_down(monkeypatch, engine_of(server, "tiny-rnn"), 0.002)  # 2000 steps: at least 4 s
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=60) as running:
        events = iter_sse(running)
        first = next(events)
        shutil.rmtree(models_dir / "tiny-rnn")
        assert reload(server.url)["removed"] == ["tiny-rnn"]
        for request in ({**body, "max_tokens": 5}, {"session_id": session, "max_tokens": 5}):
            r = generate(server.url, **request)
            assert r.status_code == 404, r.text
            assert "tiny-rnn" in error_of(r)["message"]
        assert httpx.get(f"{server.url}/models/tiny-rnn").status_code == 404
        rest = list(events)
    tokens, done = tokens_and_done([first, *rest])
    assert done["finish_reason"] == "length" and len(done["text"]) == 2000
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert wait_for(lambda: not retiring(server))
    assert "tiny-rnn" not in services_of(server).engine.engines


@pytest.mark.parametrize("damage", ["no-meta", "no-sha256", "wrong-sha256", "weights-changed"])
def test_a_half_written_checkpoint_is_never_loaded(server: LiveServer, tmp_path: Path, damage: str) -> None:
    staged = tmp_path / "staged"
    write_model(staged, seed=3)
    meta = json.loads((staged / META).read_text())
    if damage == "no-meta":
        (staged / META).unlink()
    elif damage == "no-sha256":
        (staged / META).write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    elif damage == "wrong-sha256":
        (staged / META).write_text(json.dumps({**meta, "sha256": "0" * 64}))
    else:  # the weights of another model under this one's meta.json
        write_model(tmp_path / "other", seed=4)
        shutil.copy(tmp_path / "other" / WEIGHTS, staged / WEIGHTS)
    models_dir = services_of(server).settings.models_dir
    shutil.copytree(staged, models_dir / "half")
    answer = reload(server.url)
    assert answer["added"] == [] and [r["name"] for r in answer["refused"]] == ["half"]
    assert httpx.get(f"{server.url}/models/half").status_code == 404
    assert generate(server.url, model="half", max_tokens=3).status_code == 404
    # completed in place, it loads
    shutil.rmtree(models_dir / "half")
    digest = write_model(models_dir / "half", seed=3)
    assert reload(server.url)["added"] == ["half"]
    assert httpx.get(f"{server.url}/models/half").json()["sha256"] == digest


def test_a_checkpoint_being_written_is_hidden_until_published(server: LiveServer) -> None:
    models_dir = services_of(server).settings.models_dir
    write_model(models_dir / ".half.tmp-0001", seed=3)  # what write_atomically fills before its rename
    answer = reload(server.url)
    assert answer["added"] == answer["refused"] == []
    assert ".half.tmp-0001" not in answer["models"]


# -- who may reload ---------------------------------------------------------------------------------

API, ADMIN = "api-key", "admin-key"


@pytest.mark.parametrize(
    ("api_keys", "admin_keys", "key", "status"),
    [
        ("", "", None, 200),  # no keys at all: local use, open
        ("", "", "anything", 200),
        (API, "", None, 401),
        (API, "", "wrong", 401),
        (API, "", API, 403),  # API keys but no admin keys: nobody may
        (API, ADMIN, None, 401),
        (API, ADMIN, "wrong", 401),
        (API, ADMIN, API, 403),
        (API, ADMIN, ADMIN, 200),
        ("", ADMIN, None, 401),  # admin keys only: the other routes are open, these are not
        ("", ADMIN, "wrong", 401),
        ("", ADMIN, ADMIN, 200),
    ],
)
def test_reload_is_for_admin_keys(
    models_dir: Path, api_keys: str, admin_keys: str, key: str | None, status: int
) -> None:
    settings = Settings(models_dir=models_dir, api_keys=api_keys, admin_keys=admin_keys, models_poll_seconds=0)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with TestClient(create_app(settings)) as client:
        r = client.post("/admin/models/reload", headers=headers)
        assert r.status_code == status, r.text
        if status != 200:
            assert error_of(r)["type"] == {401: "authentication_error", 403: "permission_error"}[status]


def test_an_admin_key_is_an_api_key_too(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, api_keys=API, admin_keys=ADMIN, models_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/models", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
