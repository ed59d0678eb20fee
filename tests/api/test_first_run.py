"""What a first run hits: a body sent without its JSON header, temperature 0, chat completions, beam in the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import LiveServer, error_of
from tests.api.test_metrics import metric
from tests.conftest import require_redis_server


def test_form_encoded_json_body_is_415_naming_the_header(client: TestClient) -> None:
    body = json.dumps({"prompt": "A", "max_tokens": 5})
    r = client.post("/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    error = error_of(r)
    assert "Content-Type: application/json" in error["message"]
    assert "application/x-www-form-urlencoded" in error["message"]


@pytest.mark.parametrize("path", ["/generate", "/score", "/v1/completions"])
def test_wrong_content_type_is_415_on_every_json_route(client: TestClient, path: str) -> None:
    r = client.post(path, content=b'{"text": "A"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415, r.text
    assert "application/json" in error_of(r)["message"]


def test_body_without_a_content_type_is_415_naming_the_header(client: TestClient) -> None:
    r = client.post("/generate", content=json.dumps({"prompt": "A", "max_tokens": 5}).encode())
    assert r.status_code == 415
    assert "Content-Type: application/json" in error_of(r)["message"] and "none was sent" in error_of(r)["message"]


def test_json_subtype_content_type_is_accepted(client: TestClient) -> None:
    body = json.dumps({"prompt": "A", "max_tokens": 5}).encode()
    r = client.post("/generate", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert len(r.json()["text"]) == 5


def test_json_content_type_with_a_non_object_body_is_still_400(client: TestClient) -> None:
    r = client.post("/generate", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "JSON object" in error_of(r)["message"]


@pytest.mark.parametrize("temperature", [0, 0.0, -1])
def test_temperature_zero_on_generate_points_to_greedy(client: TestClient, temperature: float) -> None:
    r = client.post("/generate", json={"prompt": "A", "temperature": temperature})
    assert r.status_code == 422
    error = error_of(r)
    assert error["param"] == "temperature"
    assert '"strategy": "greedy"' in error["message"] and "greater than 0" in error["message"]


def test_temperature_zero_over_the_websocket_points_to_greedy(client: TestClient) -> None:
    with client.websocket_connect("/ws/generate") as ws:
        ws.send_json({"type": "generate", "prompt": "A", "temperature": 0})
        msg = ws.receive_json()
    assert msg["type"] == "error" and '"strategy": "greedy"' in msg["error"]["message"]


def test_chat_completions_is_a_clear_404_in_the_error_shape(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "tiny-lstm", "messages": [{"role": "user", "content": "A"}]})
    assert r.status_code == 404
    error = error_of(r)
    assert error["type"] == "not_found_error"
    assert "/v1/completions" in error["message"] and "not supported" in error["message"]


def test_the_openai_client_sees_the_chat_message(live_server: LiveServer) -> None:
    c = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="use /v1/completions"):
        c.chat.completions.create(model="tiny-lstm", messages=[{"role": "user", "content": "A"}])


def test_beam_search_is_counted_in_generated_chars(client: TestClient) -> None:
    before = metric(client.get("/metrics").text, "rnnserve_generated_chars_total", 0.0, model="tiny-gru")
    body = {"model": "tiny-gru", "prompt": "A", "strategy": "beam", "beam_width": 3, "max_tokens": 17}
    out = client.post("/generate", json=body).json()
    assert len(out["text"]) == 17
    after = metric(client.get("/metrics").text, "rnnserve_generated_chars_total", model="tiny-gru")
    assert after - before == 17


def test_missing_redis_server_skips_with_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install redis-server"):
        require_redis_server()


def test_missing_redis_server_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="redis-server"):
        require_redis_server()


def test_present_redis_server_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    require_redis_server()
