"""WebSocket /ws/generate over a real socket: generate, cancel, bad messages, limits, disconnects and API keys."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from app.config import Settings
from app.engine.model_engine import ModelEngine
from app.errors import UnavailableError
from tests.api.conftest import LiveServer, write_tiny_models
from tests.api.test_stream import engine_of, first_new_substring, services_of, slow_down, wait_for

Message = dict[str, Any]


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws/generate"


def open_ws(server: LiveServer, **kw: Any) -> ClientConnection:
    return connect(ws_url(server), open_timeout=10, close_timeout=5, max_size=None, **kw)


def send(ws: ClientConnection, message: Message) -> None:
    ws.send(json.dumps(message))


def recv(ws: ClientConnection, timeout: float = 30) -> Message:
    message = ws.recv(timeout=timeout)
    assert isinstance(message, str), "the server sent a binary frame"
    parsed: Message = json.loads(message)
    return parsed


def until_end(ws: ClientConnection, offset: int = 0) -> tuple[list[Message], Message]:
    """Token messages, then the done (or error) message that ended them; checks the running indexes.

    `offset`: characters of this generation already read.
    """
    tokens: list[Message] = []
    while True:
        message = recv(ws)
        if message["type"] != "token":
            return tokens, message
        assert set(message) == {"type", "text", "index"}
        assert message["text"]
        assert message["index"] == offset + sum(len(t["text"]) for t in tokens)
        tokens.append(message)


def generate_ws(ws: ClientConnection, **body: Any) -> tuple[str, Message]:
    send(ws, {"type": "generate", **body})
    tokens, end = until_end(ws)
    assert end["type"] == "done", end
    text = "".join(t["text"] for t in tokens)
    assert text == end["text"]
    return text, end


def generate_http(server: LiveServer, **body: Any) -> Message:
    r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer: Message = r.json()
    return answer


def assert_error(message: Message, type_: str = "invalid_request_error", param: str | None = None) -> Message:
    assert message["type"] == "error", message
    assert set(message) == {"type", "error"}
    err: Message = message["error"]
    assert set(err) == {"type", "message", "param"}
    assert err["type"] == type_, err
    assert err["param"] == param, err
    assert err["message"]
    return err


def assert_still_serving(ws: ClientConnection, server: LiveServer) -> None:
    body = {"model": "tiny-gru", "prompt": "A", "max_tokens": 12, "seed": 4}
    text, done = generate_ws(ws, **body)
    assert text == generate_http(server, **body)["text"]
    assert done["finish_reason"] == "length"


def close_code_of(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=10)
    return ws.close_code


@pytest.fixture
def slow_rnn(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> ModelEngine:
    """tiny-rnn at 2 ms a step: a 10,000-character generation is still running when the test acts on it."""
    engine = engine_of(live_server, "tiny-rnn")
    slow_down(monkeypatch, engine, 0.002)
    return engine


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": "tiny-lstm", "prompt": "ROMEO:", "max_tokens": 70, "seed": 8}, id="sample"),
        pytest.param({"model": "tiny-rnn", "prompt": "A", "max_tokens": 50, "strategy": "greedy"}, id="greedy"),
        pytest.param({"model": "tiny-rnn", "prompt": "To be", "max_tokens": 40, "strategy": "beam"}, id="beam"),
    ],
)
def test_generate_streams_the_json_text(live_server: LiveServer, body: Message) -> None:
    whole = generate_http(live_server, **body)
    with open_ws(live_server) as ws:
        text, done = generate_ws(ws, **body)
    assert text == whole["text"]
    assert set(done) == {"type", *whole}
    assert done["finish_reason"] == whole["finish_reason"]
    assert done["usage"] == whole["usage"]


def test_no_character_of_a_stop_string_is_ever_sent(live_server: LiveServer) -> None:
    body = {"model": "tiny-rnn", "prompt": "A", "max_tokens": 60, "strategy": "greedy"}
    full = generate_http(live_server, **body)["text"]
    stop, at = first_new_substring(full, 5, 3)
    with open_ws(live_server) as ws:
        text, done = generate_ws(ws, **body, stop=[stop, "zzzz"])  # up to 3 characters held back at a time
    assert text == full[:at]
    assert done["finish_reason"] == "stop"


def test_several_generations_on_one_socket(live_server: LiveServer) -> None:
    bodies: list[Message] = [
        {"model": "tiny-gru", "prompt": "All:", "max_tokens": 30, "seed": 1},
        {"model": "tiny-lstm", "max_tokens": 20, "strategy": "greedy", "stream": True},  # a socket always streams
        {"model": "tiny-rnn", "prompt": "B", "max_tokens": 25, "strategy": "beam", "beam_width": 3},
        {"model": "tiny-gru", "prompt": "All:", "max_tokens": 30, "seed": 2},
    ]
    with open_ws(live_server) as ws:
        texts = [generate_ws(ws, **body)[0] for body in bodies]
        # continuing a session on the same socket is exact
        greedy = {"model": "tiny-rnn", "strategy": "greedy"}
        first, done = generate_ws(ws, **greedy, prompt="KING:", max_tokens=20)
        second, _ = generate_ws(ws, **greedy, max_tokens=20, session_id=done["session_id"])
    for body, text in zip(bodies, texts, strict=True):
        body.pop("stream", None)
        assert text == generate_http(live_server, **body)["text"]
    assert texts[0] != texts[3]
    assert first + second == generate_http(live_server, **greedy, prompt="KING:", max_tokens=40)["text"]


def test_cancel_mid_generation_ends_it_cancelled(live_server: LiveServer, slow_rnn: ModelEngine) -> None:
    with open_ws(live_server) as ws:
        send(ws, {"type": "generate", "model": "tiny-rnn", "max_tokens": 10_000, "seed": 1})
        first = recv(ws)
        assert first["type"] == "token"
        send(ws, {"type": "cancel"})
        tokens, done = until_end(ws, len(first["text"]))
        assert done["type"] == "done"
        assert done["finish_reason"] == "cancelled"
        assert first["text"] + "".join(t["text"] for t in tokens) == done["text"]
        assert 1 <= len(done["text"]) < 10_000
        assert wait_for(lambda: slow_rnn.load == 0)
        # after it ended there is nothing left to cancel
        send(ws, {"type": "cancel"})
        assert "nothing to cancel" in assert_error(recv(ws), param="type")["message"]
        assert_still_serving(ws, live_server)


def test_cancel_with_nothing_running_is_an_error(live_server: LiveServer) -> None:
    with open_ws(live_server) as ws:
        send(ws, {"type": "cancel"})
        assert_error(recv(ws), param="type")
        assert_still_serving(ws, live_server)


def test_a_second_generate_while_one_runs_is_a_conflict(live_server: LiveServer, slow_rnn: ModelEngine) -> None:
    with open_ws(live_server) as ws:
        send(ws, {"type": "generate", "model": "tiny-rnn", "max_tokens": 10_000})
        first = recv(ws)
        assert first["type"] == "token"
        send(ws, {"type": "generate", "model": "tiny-gru", "max_tokens": 5})
        before, end = until_end(ws, len(first["text"]))  # tokens of the first may come before the answer
        assert_error(end, "conflict_error")
        assert slow_rnn.load == 1  # the first goes on
        send(ws, {"type": "cancel"})
        text = first["text"] + "".join(t["text"] for t in before)
        after, done = until_end(ws, len(text))
        assert done["type"] == "done" and done["finish_reason"] == "cancelled"
        assert text + "".join(t["text"] for t in after) == done["text"]
        assert_still_serving(ws, live_server)


INVALID, NOT_FOUND = "invalid_request_error", "not_found_error"
BAD_MESSAGES = [  # frame, error type, param, a word the message must hold
    pytest.param("not json", INVALID, None, "JSON", id="invalid-json"),
    pytest.param("[1, 2]", INVALID, "type", "object", id="not-an-object"),
    pytest.param('{"type": "dance"}', INVALID, "type", "generate", id="unknown-type"),
    pytest.param('{"prompt": "A"}', INVALID, "type", "generate", id="no-type"),
    pytest.param('{"type": "generate", "max_tokens": 0}', INVALID, "max_tokens", "max_tokens", id="max_tokens-0"),
    pytest.param('{"type": "generate", "max_tokens": "x"}', INVALID, "max_tokens", "max_tokens", id="max_tokens-str"),
    pytest.param('{"type": "generate", "max_tokens": 10001}', INVALID, "max_tokens", "10000", id="max_tokens-limit"),
    pytest.param(
        '{"type": "generate", "strategy": "greedy", "temperature": 0.5}',
        INVALID,
        "temperature",
        "temperature",
        id="param-of-another-strategy",
    ),
    pytest.param('{"type": "generate", "bogus": 1}', INVALID, "bogus", "bogus", id="unknown-field"),
    pytest.param('{"type": "generate", "prompt": "\\u2603"}', INVALID, "prompt", "vocabulary", id="unknown-char"),
    pytest.param('{"type": "generate", "model": "nope"}', NOT_FOUND, "model", "nope", id="unknown-model"),
    pytest.param('{"type": "generate", "session_id": "gone"}', NOT_FOUND, "session_id", "gone", id="unknown-session"),
]


@pytest.mark.parametrize(("frame", "type_", "param", "hint"), BAD_MESSAGES)
def test_a_bad_message_gets_an_error_and_the_socket_stays_open(
    live_server: LiveServer, frame: str, type_: str, param: str | None, hint: str
) -> None:
    with open_ws(live_server) as ws:
        ws.send(frame)
        err = assert_error(recv(ws), type_, param)
        assert hint in err["message"]
        assert_still_serving(ws, live_server)


def test_a_binary_frame_gets_an_error_and_the_socket_stays_open(live_server: LiveServer) -> None:
    with open_ws(live_server) as ws:
        ws.send(b'{"type": "generate", "max_tokens": 3}')
        assert "binary" in assert_error(recv(ws))["message"]
        assert_still_serving(ws, live_server)


def limit_of(server: LiveServer) -> int:
    return services_of(server).settings.max_ws_message_bytes


@pytest.mark.parametrize("char", ["x", "\u00e9"], ids=["ascii", "two-byte"])
def test_a_frame_over_the_limit_closes_with_1009(live_server: LiveServer, char: str) -> None:
    limit = limit_of(live_server)
    size = len(char.encode())
    frame = char * (limit // size + 1)  # limit + 1 or + 2 bytes; the two-byte one is only limit/2 characters
    with open_ws(live_server) as ws:
        ws.send(frame)
        assert close_code_of(ws) == 1009
    with open_ws(live_server) as ws:  # the server goes on
        assert_still_serving(ws, live_server)


def test_a_frame_at_the_limit_is_read(live_server: LiveServer) -> None:
    limit = limit_of(live_server)
    head, tail = '{"type": "generate", "prompt": "', '"}'
    frame = head + "a" * (limit - len(head) - len(tail)) + tail
    assert len(frame.encode()) == limit
    with open_ws(live_server) as ws:
        ws.send(frame)
        err = assert_error(recv(ws), param="prompt")  # read, then refused as a prompt over its own limit
        assert "100000" in err["message"]
        assert_still_serving(ws, live_server)


@pytest.mark.parametrize("abrupt", [False, True], ids=["close-handshake", "tcp-reset"])
def test_disconnect_mid_generation_frees_the_slot(live_server: LiveServer, slow_rnn: ModelEngine, abrupt: bool) -> None:
    with open_ws(live_server) as other:
        with open_ws(live_server) as ws:
            send(ws, {"type": "generate", "model": "tiny-rnn", "max_tokens": 10_000})
            assert recv(ws)["type"] == "token"
            assert slow_rnn.load == 1
            if abrupt:
                ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                ws.socket.close()  # RST, no close frame
        assert wait_for(lambda: slow_rnn.load == 0), f"load stayed {slow_rnn.load}"
        steps = slow_rnn.steps
        time.sleep(0.1)
        assert slow_rnn.steps - steps <= 1
        # a socket that was open all along, and a new one, are served
        assert_still_serving(other, live_server)
    with open_ws(live_server) as ws:
        assert_still_serving(ws, live_server)


def test_two_sockets_at_once_each_get_their_own_text(live_server: LiveServer) -> None:
    a_body = {"model": "tiny-lstm", "max_tokens": 200, "seed": 1}
    b_body = {"model": "tiny-lstm", "max_tokens": 150, "seed": 2, "temperature": 0.7}
    with open_ws(live_server) as a, open_ws(live_server) as b:
        send(a, {"type": "generate", **a_body})
        send(b, {"type": "generate", **b_body})
        a_tokens, a_done = until_end(a)
        b_tokens, b_done = until_end(b)
    assert "".join(t["text"] for t in a_tokens) == a_done["text"] == generate_http(live_server, **a_body)["text"]
    assert "".join(t["text"] for t in b_tokens) == b_done["text"] == generate_http(live_server, **b_body)["text"]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("keyed-models")
    write_tiny_models(directory)
    with LiveServer(Settings(models_dir=directory, default_model="tiny-lstm", api_keys="k1,k2")) as server:
        yield server


def keyed_generate(ws: ClientConnection) -> Message:
    _, done = generate_ws(ws, model="tiny-gru", max_tokens=8, seed=3)
    assert len(done["text"]) == 8
    return done


def test_auth_message_then_generate(keyed_server: LiveServer) -> None:
    with open_ws(keyed_server) as ws:
        send(ws, {"type": "auth", "api_key": "k1"})
        keyed_generate(ws)
        keyed_generate(ws)  # and the socket stays authenticated


def test_bearer_header_then_generate(keyed_server: LiveServer) -> None:
    with open_ws(keyed_server, additional_headers={"Authorization": "Bearer k2"}) as ws:
        done = keyed_generate(ws)
    # the session belongs to k2: k1 cannot see it
    url = f"{keyed_server.url}/sessions/{done['session_id']}"
    assert httpx.get(url, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer k1"}).status_code == 404


@pytest.mark.parametrize(
    "first",
    [
        pytest.param({"type": "auth", "api_key": "wrong"}, id="wrong-key"),
        pytest.param({"type": "auth", "api_key": "k1x"}, id="near-key"),
        pytest.param({"type": "auth"}, id="no-key"),
        pytest.param({"type": "generate", "max_tokens": 3}, id="no-auth-message"),
        pytest.param("nonsense", id="not-json"),
    ],
)
def test_a_bad_first_message_closes_with_1008(keyed_server: LiveServer, first: Message | str) -> None:
    with open_ws(keyed_server) as ws:
        ws.send(first if isinstance(first, str) else json.dumps(first))
        assert close_code_of(ws) == 1008


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer ", "Basic k1", "k1"])
def test_a_bad_authorization_header_closes_with_1008(keyed_server: LiveServer, header: str) -> None:
    with open_ws(keyed_server, additional_headers={"Authorization": header}) as ws:
        assert close_code_of(ws) == 1008


def greedy_session(server: LiveServer, model: str) -> tuple[str, str, Message]:
    """A session of 5 greedy characters after "A": (their text, its id, what GET /sessions/{id} says)."""
    with open_ws(server) as ws:
        start, done = generate_ws(ws, model=model, strategy="greedy", prompt="A", max_tokens=5)
    session = done["session_id"]
    return start, session, httpx.get(f"{server.url}/sessions/{session}").json()


def test_a_continued_session_abandoned_mid_stream_ends_at_the_last_character_sent(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(live_server, "tiny-rnn")
    greedy = {"model": "tiny-rnn", "strategy": "greedy"}
    start, session, before = greedy_session(live_server, "tiny-rnn")
    slow_down(monkeypatch, engine, 0.3)  # the next character is 0.3 s away
    with open_ws(live_server) as ws:
        send(ws, {"type": "generate", **greedy, "max_tokens": 50, "session_id": session})
        seen = recv(ws)
        assert seen["type"] == "token"
    assert wait_for(lambda: engine.load == 0)
    assert wait_for(lambda: httpx.get(f"{live_server.url}/sessions/{session}").json()["chars"] != before["chars"])
    after = httpx.get(f"{live_server.url}/sessions/{session}").json()
    monkeypatch.undo()
    full = generate_http(live_server, **greedy, prompt="A", max_tokens=10)["text"]
    assert full.startswith(start + seen["text"])
    assert after["tail"].endswith(start + seen["text"])
    assert after["chars"] == before["chars"] + len(seen["text"])


def test_a_sampled_session_abandoned_mid_stream_goes_on_as_if_never_interrupted(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(live_server, "tiny-lstm")
    sample = {"model": "tiny-lstm", "temperature": 2.0}  # no seed: each request goes on with the stored generator
    with open_ws(live_server) as ws:
        _, done = generate_ws(ws, **sample, prompt="A", seed=5, max_tokens=5)
    session = done["session_id"]
    fork = httpx.post(f"{live_server.url}/sessions/{session}/fork").json()["session_id"]
    uninterrupted = generate_http(live_server, **sample, session_id=fork, max_tokens=40)["text"]

    slow_down(monkeypatch, engine, 0.3)  # the client leaves while the engine makes more than it sent
    with open_ws(live_server) as ws:
        send(ws, {"type": "generate", **sample, "max_tokens": 40, "session_id": session})
        seen = recv(ws)
        assert seen["type"] == "token"
    assert wait_for(lambda: engine.load == 0)
    sent = len(seen["text"])
    assert wait_for(lambda: httpx.get(f"{live_server.url}/sessions/{session}").json()["chars"] == 6 + sent)
    monkeypatch.undo()
    rest = generate_http(live_server, **sample, session_id=session, max_tokens=40 - sent)["text"]
    assert seen["text"] + rest == uninterrupted


def test_a_session_abandoned_before_its_first_character_keeps_the_prompt_and_nothing_else(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(live_server, "tiny-lstm")
    start, session, before = greedy_session(live_server, "tiny-lstm")
    fork = httpx.post(f"{live_server.url}/sessions/{session}/fork").json()["session_id"]
    # the client goes away during the prefill, which makes the first character, never sent
    entered, go = threading.Event(), threading.Event()
    prefill = engine.kernels.prefill

    def gated(*args: Any) -> Any:
        entered.set()
        go.wait(10)
        return prefill(*args)

    monkeypatch.setattr(engine.kernels, "prefill", gated)
    with open_ws(live_server) as ws:
        send(ws, {"type": "generate", "model": "tiny-lstm", "prompt": "B", "max_tokens": 50, "session_id": session})
        assert entered.wait(10)
    assert wait_for(lambda: all(s.seq.cancelled for s in engine.streams.values()))
    go.set()
    assert wait_for(lambda: engine.load == 0)
    assert wait_for(lambda: httpx.get(f"{live_server.url}/sessions/{session}").json()["chars"] != before["chars"])
    after = httpx.get(f"{live_server.url}/sessions/{session}").json()
    monkeypatch.undo()
    assert after["chars"] == before["chars"] + 1
    assert after["tail"].endswith(start + "B")

    # going on from it is going on from "B" fed to the untouched copy
    def per_char(text: str, session_id: str) -> list[float]:
        body = {"model": "tiny-lstm", "text": text, "session_id": session_id, "per_char": True}
        r = httpx.post(f"{live_server.url}/score", json=body)
        assert r.status_code == 200, r.text
        return [c["logprob"] for c in r.json()["per_char"]]

    assert per_char("ROMEO", session) == pytest.approx(per_char("BROMEO", fork)[1:], abs=1e-5)


def test_an_error_after_tokens_is_an_error_message_and_the_socket_stays_usable(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"model": "tiny-gru", "prompt": "A", "max_tokens": 20, "seed": 9}
    whole = generate_http(live_server, **body)

    async def failing_save(*args: Any) -> None:
        raise UnavailableError("session store unavailable (simulated)")

    with open_ws(live_server) as ws:
        monkeypatch.setattr("app.api.sessions.save", failing_save)
        send(ws, {"type": "generate", **body})
        tokens, end = until_end(ws)
        assert_error(end, "service_unavailable_error")
        assert "".join(t["text"] for t in tokens) == whole["text"]
        monkeypatch.undo()
        assert_still_serving(ws, live_server)
