"""Rate limit (in process, and shared through Redis by two replicas) and CORS."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.api.conftest import error_of
from tests.conftest import RedisServer

A = {"authorization": "Bearer a"}
B = {"authorization": "Bearer b"}


def test_rate_limit_per_key_in_process(tiny_models_dir: Path) -> None:
    settings = Settings(models_dir=tiny_models_dir, api_keys="a,b", rate_limit_per_minute=3)
    with TestClient(create_app(settings)) as c:
        assert [c.get("/models", headers=A).status_code for _ in range(3)] == [200, 200, 200]
        r = c.get("/models", headers=A)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert "3 requests per minute" in error_of(r)["message"]
        assert c.get("/models", headers=B).status_code == 200  # another key has its own budget
        assert c.get("/healthz").status_code == 200  # probes are not counted


def test_rate_limit_is_shared_by_replicas_through_redis(tiny_models_dir: Path, redis_server: RedisServer) -> None:
    settings = Settings(models_dir=tiny_models_dir, api_keys="a", rate_limit_per_minute=4, redis_url=redis_server.url)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        codes = [(one if i % 2 else two).get("/models", headers=A).status_code for i in range(6)]
        assert codes.count(200) == 4 and codes[4:] == [429, 429]


def test_cors_is_off_by_default_and_configurable(tiny_models_dir: Path) -> None:
    origin = {"origin": "https://example.org"}
    with TestClient(create_app(Settings(models_dir=tiny_models_dir))) as c:
        assert "access-control-allow-origin" not in c.get("/models", headers=origin).headers
    with TestClient(create_app(Settings(models_dir=tiny_models_dir, cors_origins="https://example.org"))) as c:
        assert c.get("/models", headers=origin).headers["access-control-allow-origin"] == "https://example.org"
        other = c.get("/models", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(("ms", "engine", "seconds"), [(0, "batched", 0.0), (35, "batched", 0.035), (35, "naive", 0.0)])
def test_step_budget_setting_reaches_the_engines(tiny_models_dir: Path, ms: float, engine: str, seconds: float) -> None:
    settings = Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", step_budget_ms=ms, engine=engine)
    with TestClient(create_app(settings)) as c:
        engines = c.app.state.services.engine.engines  # type: ignore[attr-defined]
        assert {e.step_budget for e in engines.values()} == {seconds}  # the naive baseline: one step per trip


def test_int8_weights_setting_reaches_the_engines(tiny_models_dir: Path) -> None:
    settings = Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", weights="int8")
    with TestClient(create_app(settings)) as c:
        engines = c.app.state.services.engine.engines  # type: ignore[attr-defined]
        assert {type(e.kernels.step).__name__ for e in engines.values()} == {"OnnxStep"}
        assert {e.kernels.step.weights for e in engines.values()} == {"int8"}
        r = c.post("/generate", json={"prompt": "ROMEO:", "max_tokens": 20, "seed": 1})
        assert r.status_code == 200 and len(r.json()["text"]) == 20


def test_int8_weights_need_the_onnx_step() -> None:
    with pytest.raises(ValueError, match="RNNSERVE_WEIGHTS: int8 weights need the onnx backend"):
        Settings(weights="int8", step="torch")
