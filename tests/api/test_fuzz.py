"""Fuzzing the live OpenAPI schema with schemathesis (SPEC 5: "fuzzing the OpenAPI schema finds no 5xx").

A real uvicorn serves the tiny models; the schema is loaded from its /openapi.json. Every operation
gets schemathesis' positive and negative cases, and positive cases "steered" towards success (a
loaded model, a prompt inside the vocabulary, a live session, parameters that fit the strategy) so
that real generations, streams and session operations are fuzzed too, not only validation errors.
Each response must pass schemathesis' not_a_server_error, status_code_conformance,
content_type_conformance and response_schema_conformance checks.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from app.config import Settings
from app.main import create_app
from tests.api.conftest import TINY_VOCAB, LiveServer, write_tiny_models

MAX_EXAMPLES = 300  # per operation; operations without parameters have a single distinct case
MODELS = ("tiny-lstm", "tiny-gru", "tiny-rnn")
MAX_TOKENS_LIMIT = 50
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
FRESH = "<a session made for this case>"  # replaced by a new session just before the call
FRESH_TRAINING = "<a training job queued for this case>"  # replaced by a new job just before the call


def settings_for(models_dir: Path) -> Settings:
    return Settings(
        models_dir=models_dir,
        default_model="tiny-lstm",
        max_tokens_limit=MAX_TOKENS_LIMIT,
        max_prompt_chars=2000,
        sse_keepalive_seconds=5,
    )


# Collected from the app itself, so a new route is fuzzed without touching this file.
OPERATIONS = sorted(
    (method.upper(), path)
    for path, methods in create_app(settings_for(Path("models"))).openapi()["paths"].items()
    for method in methods
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("fuzz-models")
    write_tiny_models(directory)
    with LiveServer(settings_for(directory)) as live:
        yield live


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def schema(server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.fixture(scope="module")
def session_pool(server: LiveServer, http: requests.Session) -> list[str]:
    """One live session per model, for cases that name a session."""
    return [new_session(server, http, model) for model in MODELS]


def new_session(server: LiveServer, http: requests.Session, model: str = "tiny-lstm") -> str:
    r = http.post(f"{server.url}/generate", json={"model": model, "prompt": "Ab", "max_tokens": 1}, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["session_id"])


@pytest.fixture(scope="module")
def training_pool(server: LiveServer, http: requests.Session) -> list[str]:
    """Finished training jobs (their text is too small to train on), for cases that name one."""
    jobs = [new_training(server, http) for _ in range(2)]
    deadline = time.monotonic() + 120
    for job in jobs:
        while http.get(f"{server.url}/trainings/{job}", timeout=30).json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the training jobs of the pool did not finish"
            time.sleep(0.2)
    return jobs


def new_training(server: LiveServer, http: requests.Session) -> str:
    body = {"name": f"fuzz-{time.monotonic_ns()}", "text": "A", "hidden_size": 8, "minutes": 0.01}
    deadline = time.monotonic() + 60
    while (r := http.post(f"{server.url}/trainings", json=body, timeout=30)).status_code == 429:
        assert time.monotonic() < deadline, r.text  # jobs per key: wait for the earlier ones to fail
        time.sleep(0.2)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def in_vocab(text: object) -> str:
    return "".join(c for c in text if c in TINY_VOCAB) if isinstance(text, str) else ""


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


OWNED = {"sample": ("temperature", "top_k", "top_p", "min_p"), "beam": ("beam_width",)}


@st.composite
def steered(
    draw: st.DrawFn, positive: st.SearchStrategy[Any], pool: list[str], trainings: list[str] | None = None
) -> Any:
    """A positive case nudged towards a 2xx: real model, in-vocabulary text, live session, matching parameters,
    a training job of this key (a queued one to cancel)."""
    case = draw(positive)
    if "training_id" in case.path_parameters and trainings:
        fresh = [FRESH_TRAINING] if case.method.upper() == "DELETE" else []
        case.path_parameters["training_id"] = draw(st.sampled_from([*trainings, *fresh]))
    model = draw(st.sampled_from(MODELS))
    session = draw(st.sampled_from([*pool, FRESH, None]))
    if "name" in case.path_parameters:
        case.path_parameters["name"] = model
    if "session_id" in case.path_parameters:
        case.path_parameters["session_id"] = draw(st.sampled_from([*pool, FRESH]))
    body = case.body
    if isinstance(body, dict):
        body = dict(body)
        if "model" in body or case.path == "/v1/completions":
            body["model"] = model
        for field in ("prompt", "text"):
            if isinstance(body.get(field), str):
                body[field] = in_vocab(body[field]) or ("A" if field == "text" else "")
            elif isinstance(body.get(field), list):
                body[field] = [in_vocab(p) for p in body[field]]
        if is_number(body.get("max_tokens")):  # JSON Schema integers may come as 12.0
            body["max_tokens"] = 1 + int(body["max_tokens"]) % MAX_TOKENS_LIMIT
        elif case.path == "/generate":
            body["max_tokens"] = draw(st.integers(1, MAX_TOKENS_LIMIT))  # the default, 200, is over the limit
        if is_number(body.get("session_ttl")):
            body["session_ttl"] = 1 + int(body["session_ttl"]) % 3600
        if "session_id" in body:
            if session is None:
                del body["session_id"]
            else:
                body["session_id"] = session
                body.pop("model", None)
        if case.path == "/generate":
            for owner, names in OWNED.items():
                if owner != body.get("strategy", "sample"):
                    for name in names:
                        body.pop(name, None)
        case.body = body
    return case


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_to_its_schema(
    schema: schemathesis.BaseSchema,
    server: LiveServer,
    http: requests.Session,
    session_pool: list[str],
    method: str,
    path: str,
    request: pytest.FixtureRequest,
) -> None:
    operation = schema[path][method]
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    trainings = request.getfixturevalue("training_pool") if "{training_id}" in path else None
    cases = st.one_of(
        positive, operation.as_strategy(GenerationMode.NEGATIVE), steered(positive, session_pool, trainings)
    )
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=cases)
    def fuzz(case: Any) -> None:
        if isinstance(case.body, dict) and case.body.get("session_id") == FRESH:
            case.body = {**case.body, "session_id": new_session(server, http)}
        if case.path_parameters.get("session_id") == FRESH:
            case.path_parameters["session_id"] = new_session(server, http)
        if case.path_parameters.get("training_id") == FRESH_TRAINING:
            case.path_parameters["training_id"] = new_training(server, http)
        response = case.call_and_validate(base_url=server.url, session=http, checks=CHECKS, timeout=30)
        statuses[response.status_code] += 1

    fuzz()
    assert statuses, "no case was sent"
    assert max(statuses) < 500
    if operation.path_parameters or operation.body:
        assert sum(statuses.values()) >= MAX_EXAMPLES // 2, statuses  # a few hundred cases, not a handful
        assert any(200 <= s < 300 for s in statuses), f"no case reached a success: {statuses}"


def test_every_operation_is_fuzzed(schema: schemathesis.BaseSchema) -> None:
    """The live schema has exactly the operations that were parametrized (nothing skipped, nothing stale)."""
    live = sorted((op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations())
    assert live == OPERATIONS
    assert ("POST", "/generate") in live and ("POST", "/v1/completions") in live


def test_generate_documents_its_event_stream(server: LiveServer, http: requests.Session) -> None:
    """POST /generate with stream=true answers text/event-stream, and the schema says so."""
    spec = http.get(f"{server.url}/openapi.json", timeout=30).json()
    assert "text/event-stream" in spec["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    r = http.post(f"{server.url}/generate", json={"prompt": "Ab", "max_tokens": 5, "stream": True}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in r.text


def test_completions_stream_content_type_is_documented(server: LiveServer, http: requests.Session) -> None:
    body = {"model": "tiny-lstm", "prompt": "Ab", "max_tokens": 3, "stream": True}
    r = http.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    spec = http.get(f"{server.url}/openapi.json", timeout=30).json()
    assert "text/event-stream" in spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]


@pytest.mark.parametrize("stop", ["", [""], ["x" * 65], "x" * 65, ["a"] * 9], ids=repr)
def test_completions_stop_outside_generate_limits_is_a_422(
    server: LiveServer, http: requests.Session, stop: object
) -> None:
    body = {"model": "tiny-lstm", "prompt": "Ab", "max_tokens": 3, "stop": stop}
    r = http.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "stop" or r.json()["error"]["param"].startswith("stop")


def test_fuzz_server_is_still_healthy(server: LiveServer, http: requests.Session) -> None:
    """After the fuzzing, the server still generates (no engine wedged by a bad case)."""
    start = time.monotonic()
    r = http.post(f"{server.url}/generate", json={"prompt": "Ab", "max_tokens": 10, "seed": 1}, timeout=30)
    assert r.status_code == 200 and len(r.json()["text"]) <= 10
    assert time.monotonic() - start < 30
