"""GET /metrics, request ids and the JSON access log (which never holds a prompt)."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.cpus import CpuBudget
from app.logs import JsonFormatter
from app.main import create_app


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no {name}{{{want}}}")


def test_metrics_count_requests_chars_and_sessions(client: TestClient) -> None:
    before = client.get("/metrics").text
    chars0 = metric(before, "rnnserve_generated_chars_total", 0.0, model="tiny-gru")
    out = client.post("/generate", json={"model": "tiny-gru", "prompt": "A", "max_tokens": 25}).json()
    client.get(f"/sessions/{out['session_id']}")
    client.get("/sessions/sess-missing")
    text = client.get("/metrics").text
    assert metric(text, "rnnserve_generated_chars_total", model="tiny-gru") - chars0 == 25
    assert metric(text, "rnnserve_requests_total", method="POST", route="/generate", status="200") >= 1
    assert metric(text, "rnnserve_requests_total", method="GET", route="/sessions/{session_id}", status="404") >= 1
    assert metric(text, "rnnserve_session_ops_total", outcome="hit") >= 1
    assert metric(text, "rnnserve_session_ops_total", outcome="miss") >= 1
    assert metric(text, "rnnserve_time_to_first_char_seconds_count", model="tiny-gru") >= 1
    assert metric(text, "rnnserve_batch_size_count", model="tiny-gru") >= 25
    assert "rnnserve_queue_depth" in text and "rnnserve_active_generations" in text


def test_metrics_split_the_compute_threads_time_by_phase(client: TestClient) -> None:
    def spent() -> dict[str, float]:
        text = client.get("/metrics").text
        phases = ("prefill", "step", "choose", "bookkeeping")
        return {p: metric(text, "rnnserve_engine_seconds_total", 0.0, model="tiny-lstm", phase=p) for p in phases}

    before = spent()
    t0 = time.perf_counter()
    client.post("/generate", json={"model": "tiny-lstm", "prompt": "To be, or not to be" * 20, "max_tokens": 300})
    wall = time.perf_counter() - t0
    after = spent()
    grown = {phase: after[phase] - before[phase] for phase in after}
    assert all(seconds > 0 for seconds in grown.values()), grown
    assert sum(grown.values()) < wall  # compute-thread time of this request's trips only


def test_request_id_is_kept_or_made(client: TestClient) -> None:
    assert client.get("/models", headers={"x-request-id": "trace-42"}).headers["x-request-id"] == "trace-42"
    made = client.get("/models", headers={"x-request-id": "bad id with spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_access_log_is_json_with_request_id_and_no_prompt(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    secret = "MY SECRET PROMPT"
    with caplog.at_level(logging.DEBUG):
        client.post("/generate", json={"prompt": secret, "max_tokens": 3}, headers={"x-request-id": "rid-7"})
    access = [r for r in caplog.records if r.name == "app.access"]
    assert access
    line = json.loads(JsonFormatter().format(access[-1]))
    assert line["request_id"] == "rid-7" and line["route"] == "/generate" and line["status"] == 200
    assert all(secret not in r.getMessage() and secret not in str(getattr(r, "fields", "")) for r in caplog.records)


def test_threads_follow_the_cpu_budget_which_metrics_export(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def compute_threads(client: TestClient) -> int:
        assert client.portal is not None
        return client.portal.call(client.app.state.services.engine.compute.run, torch.get_num_threads)  # type: ignore[attr-defined]

    monkeypatch.setattr("app.main.cpu_budget", lambda: CpuBudget(3, "cgroup cpu.max"))
    try:
        app = create_app(Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", torch_threads=0))
        with caplog.at_level(logging.INFO, logger="app"), TestClient(app) as client:
            assert compute_threads(client) == 3
            assert metric(client.get("/metrics").text, "rnnserve_cpu_budget", source="cgroup cpu.max") == 3
        assert "cpu budget 3 (cgroup cpu.max): 3 thread(s)" in caplog.text
        app = create_app(Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", torch_threads=2))
        with TestClient(app) as client:
            assert compute_threads(client) == 2  # the setting wins over the budget
    finally:
        torch.set_num_threads(1)
