"""POST /generate with stream=true over a real socket: token events add up to the JSON answer, then one done."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.api.deps import Services
from app.config import Settings
from app.engine.model_engine import ModelEngine
from app.errors import UnavailableError
from tests.api.conftest import LiveServer, error_of, write_tiny_models

Event = tuple[str, Any]  # (event name, parsed data); comments are ("comment", text)


def iter_sse(response: httpx.Response) -> Iterator[Event]:
    """Parse a text/event-stream as it arrives."""
    name: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line == "":
            if data:
                yield name or "message", json.loads("\n".join(data))
            name, data = None, []
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def stream(server: LiveServer, **body: Any) -> tuple[httpx.Response, list[Event]]:
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return r, list(iter_sse(r))


def generate(server: LiveServer, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def tokens_and_done(events: list[Event]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Checks the event grammar (token..., then exactly one done, last) and the running indexes."""
    names = [name for name, _ in events if name != "comment"]
    assert names[-1] == "done" and names.count("done") == 1, names
    assert set(names[:-1]) <= {"token"}, names
    tokens = [data for name, data in events if name == "token"]
    offset = 0
    for t in tokens:
        assert set(t) == {"text", "index"}
        assert t["text"], "an empty token event"
        assert t["index"] == offset
        offset += len(t["text"])
    return tokens, events[-1][1]


def services_of(server: LiveServer) -> Services:
    """The services of the app the server runs (its engines live in the server's thread)."""
    app = server.server.config.app
    assert isinstance(app, FastAPI)
    services: Services = app.state.services
    return services


def engine_of(server: LiveServer, model: str) -> ModelEngine:
    return services_of(server).engine.engines[model]


class Slow:
    """Wraps a kernel so every call takes at least `delay` seconds."""

    def __init__(self, kernel: Any, delay: float) -> None:
        self.kernel, self.delay = kernel, delay

    def __call__(self, *args: Any) -> Any:
        time.sleep(self.delay)
        return self.kernel(*args)


def slow_down(monkeypatch: pytest.MonkeyPatch, engine: ModelEngine, delay: float) -> None:
    """Every engine step of this model (prefill calls and decoding) takes at least `delay` seconds."""
    monkeypatch.setattr(engine.kernels, "decode", Slow(engine.kernels.decode, delay))
    monkeypatch.setattr(engine.kernels, "prefill", Slow(engine.kernels.prefill, delay))


def wait_for(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


CASES = [
    pytest.param({"model": "tiny-lstm", "prompt": "ROMEO:", "max_tokens": 80, "strategy": "greedy"}, id="greedy"),
    pytest.param({"model": "tiny-gru", "prompt": "All:\n", "max_tokens": 120, "seed": 42}, id="sample"),
    pytest.param(
        {
            "model": "tiny-rnn",
            "max_tokens": 90,
            "seed": 7,
            "temperature": 0.8,
            "top_k": 10,
            "top_p": 0.9,
            "logprobs": 2,
        },
        id="sample-filters-logprobs",
    ),
    pytest.param({"model": "tiny-gru", "prompt": "KING:", "max_tokens": 60, "strategy": "beam"}, id="beam"),
    pytest.param({"model": "tiny-lstm", "max_tokens": 50, "strategy": "beam", "beam_width": 3}, id="beam-3"),
]


@pytest.mark.parametrize("body", CASES)
def test_tokens_concatenate_to_the_json_text(live_server: LiveServer, body: dict[str, Any]) -> None:
    whole = generate(live_server, **body)
    response, events = stream(live_server, **body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    tokens, done = tokens_and_done(events)
    assert "".join(t["text"] for t in tokens) == whole["text"] == done["text"]
    assert len(whole["text"]) == body["max_tokens"]
    assert done["finish_reason"] == whole["finish_reason"] == "length"
    assert done["usage"] == whole["usage"]
    assert done["model"] == body["model"]
    if "seed" in body:
        assert done["seed"] == whole["seed"] == body["seed"]
    assert set(done) == set(whole)
    if body.get("logprobs"):
        assert [lp["text"] for lp in done["logprobs"]] == list(done["text"])
        assert done["logprobs"] == whole["logprobs"]


def first_new_substring(text: str, start: int, length: int) -> tuple[str, int]:
    """A substring of `text` beginning at or after `start` that does not occur earlier; and where it is."""
    for i in range(start, len(text) - length):
        s = text[i : i + length]
        if text.find(s) == i:
            return s, i
    raise AssertionError(f"no fresh substring in {text!r}")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": "tiny-rnn", "prompt": "A", "max_tokens": 80, "strategy": "greedy"}, id="greedy"),
        pytest.param({"model": "tiny-gru", "prompt": "All:", "max_tokens": 80, "seed": 3}, id="sample"),
        pytest.param(
            {"model": "tiny-rnn", "prompt": "B", "max_tokens": 80, "seed": 9, "min_p": 0.05}, id="sample-min_p"
        ),
    ],
)
@pytest.mark.parametrize("length", [1, 3])
def test_no_character_of_a_stop_string_is_ever_sent(live_server: LiveServer, body: dict[str, Any], length: int) -> None:
    full = generate(live_server, **body)["text"]
    stop, at = first_new_substring(full, 5, length)
    whole = generate(live_server, **body, stop=[stop, "zzzz"])
    _, events = stream(live_server, **body, stop=[stop, "zzzz"])
    tokens, done = tokens_and_done(events)
    streamed = "".join(t["text"] for t in tokens)
    assert streamed == whole["text"] == done["text"] == full[:at]
    assert done["finish_reason"] == whole["finish_reason"] == "stop"


def test_beam_with_a_stop_string_streams_the_json_text(live_server: LiveServer) -> None:
    body = {"model": "tiny-rnn", "prompt": "To be", "max_tokens": 60, "strategy": "beam"}
    full = generate(live_server, **body)["text"]
    stop, _ = first_new_substring(full, 5, 2)
    whole = generate(live_server, **body, stop=[stop])
    tokens, done = tokens_and_done(stream(live_server, **body, stop=[stop])[1])
    streamed = "".join(t["text"] for t in tokens)
    assert streamed == whole["text"] == done["text"]
    assert stop not in streamed
    assert done["finish_reason"] == whole["finish_reason"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"max_tokens": 0}, 422, "max_tokens"),
        ({"strategy": "greedy", "temperature": 0.5}, 422, "temperature"),
        ({"strategy": "beam", "top_k": 3}, 422, "top_k"),
        ({"prompt": "caf\u00e9 \u2603"}, 422, "prompt"),
        ({"max_tokens": 10_001}, 422, "max_tokens"),
        ({"session_id": "no-such-session"}, 404, "session_id"),
    ],
)
def test_errors_before_the_stream_are_plain_json(
    live_server: LiveServer, body: dict[str, Any], status: int, param: str | None
) -> None:
    r = httpx.post(f"{live_server.url}/generate", json={**body, "stream": True}, timeout=30)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    err = error_of(r)
    assert err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if status == 422:
        assert param in err["message"]


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One generation per model, no queue: a second one is a 429 until the first slot is free."""
    directory = tmp_path_factory.mktemp("one-slot-models")
    write_tiny_models(directory)
    settings = Settings(models_dir=directory, default_model="tiny-lstm", max_batch=1, max_queue=0)
    with LiveServer(settings) as server:
        yield server


def test_a_client_that_disconnects_frees_its_slot(one_slot_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server = one_slot_server
    engine = engine_of(server, "tiny-rnn")
    slow_down(monkeypatch, engine, 0.005)  # 10,000 characters would take a minute
    body = {"model": "tiny-rnn", "max_tokens": 10_000, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/generate", json=body) as r:
            assert r.status_code == 200
            events = iter_sse(r)
            for _ in range(3):
                assert next(events)[0] == "token"
            assert engine.load == 1
            # the slot is taken: a second generation is refused before its stream starts
            busy = http.post(f"{server.url}/generate", json=body)
            assert busy.status_code == 429
            assert busy.headers["retry-after"] == "1"
            assert error_of(busy)["type"] == "overloaded_error"
        # the response is closed unread: the connection goes away
        assert wait_for(lambda: engine.load == 0), f"load stayed {engine.load}"
        steps = engine.steps
        time.sleep(0.2)
        assert engine.steps - steps <= 1  # nothing is generating for nobody
        monkeypatch.undo()
        after = http.post(f"{server.url}/generate", json={"model": "tiny-rnn", "max_tokens": 5})
        assert after.status_code == 200 and len(after.json()["text"]) == 5


def test_keepalive_comments_while_the_model_is_slow(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services_of(live_server).settings, "sse_keepalive_seconds", 0.02)
    engine = engine_of(live_server, "tiny-gru")
    body = {"model": "tiny-gru", "prompt": "A", "max_tokens": 3, "seed": 5}
    whole = generate(live_server, **body)
    slow_down(monkeypatch, engine, 0.1)  # four steps (prefill, then 3 characters) of 0.1 s
    _, events = stream(live_server, **body)
    comments = [data for name, data in events if name == "comment"]
    assert len(comments) >= 4
    assert set(comments) == {"keep-alive"}
    tokens, done = tokens_and_done(events)
    assert "".join(t["text"] for t in tokens) == whole["text"] == done["text"]


def test_no_keepalive_comments_when_tokens_flow(live_server: LiveServer) -> None:
    _, events = stream(live_server, model="tiny-lstm", max_tokens=50, seed=1)
    assert not [e for e in events if e[0] == "comment"]


def test_streamed_session_continues_exactly(live_server: LiveServer) -> None:
    body = {"model": "tiny-lstm", "prompt": "To be", "strategy": "greedy"}
    whole = generate(live_server, **body, max_tokens=60)["text"]
    _, first = tokens_and_done(stream(live_server, **body, max_tokens=30)[1])
    assert first["session_id"]
    tokens, second = tokens_and_done(
        stream(live_server, model="tiny-lstm", strategy="greedy", max_tokens=30, session_id=first["session_id"])[1]
    )
    assert first["text"] + "".join(t["text"] for t in tokens) == whole
    assert second["usage"]["session_chars"] == 5 + 60


@pytest.mark.parametrize(
    ("exc", "type_"),
    [
        (UnavailableError("session store unavailable (simulated)"), "service_unavailable_error"),
        (RuntimeError("simulated bug"), "internal_error"),
    ],
)
def test_an_error_after_the_first_byte_is_an_error_event(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, exc: Exception, type_: str
) -> None:
    body = {"model": "tiny-lstm", "prompt": "A", "max_tokens": 30, "seed": 6}
    whole = generate(live_server, **body)

    async def failing_save(*args: Any) -> None:
        raise exc

    monkeypatch.setattr("app.api.sessions.save", failing_save)
    response, events = stream(live_server, **body)
    assert response.status_code == 200  # already sent
    names = [name for name, _ in events]
    assert names == ["token"] * (len(names) - 1) + ["error"]
    assert "".join(data["text"] for name, data in events if name == "token") == whole["text"]
    err = events[-1][1]["error"]
    assert set(err) == {"type", "message", "param"}
    assert err["type"] == type_
    if type_ == "internal_error":
        assert "simulated" not in err["message"]  # internals stay in the log
