"""POST /generate: strategies, seeds, limits and the error shape, on tiny and shipped models."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import SHIPPED, error_of


def generate(client: TestClient, **body: object) -> dict:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_response_shape(client: TestClient) -> None:
    out = generate(client, prompt="ROMEO:", max_tokens=25, seed=7)
    assert set(out) >= {"id", "model", "text", "finish_reason", "session_id", "seed", "usage"}
    assert out["model"] == "tiny-lstm"
    assert len(out["text"]) == 25
    assert out["finish_reason"] == "length"
    assert out["seed"] == 7
    assert out["usage"] == {"prompt_chars": 6, "completion_chars": 25, "session_chars": 31}


def test_greedy_is_deterministic(client: TestClient) -> None:
    a = generate(client, model="tiny-gru", prompt="To be", strategy="greedy", max_tokens=40)
    b = generate(client, model="tiny-gru", prompt="To be", strategy="greedy", max_tokens=40)
    assert a["text"] == b["text"]


def test_same_seed_same_text_other_seed_other_text(client: TestClient) -> None:
    a = generate(client, prompt="A", max_tokens=60, seed=123)
    b = generate(client, prompt="A", max_tokens=60, seed=123)
    c = generate(client, prompt="A", max_tokens=60, seed=124)
    assert a["text"] == b["text"]
    assert a["text"] != c["text"]


def test_seed_is_returned_when_not_given(client: TestClient) -> None:
    a = generate(client, prompt="A", max_tokens=30)
    replay = generate(client, prompt="A", max_tokens=30, seed=a["seed"])
    assert replay["text"] == a["text"]


def test_stop_string_ends_generation_and_is_not_returned(client: TestClient) -> None:
    full = generate(client, prompt="A", strategy="greedy", max_tokens=60)["text"]
    stop = full[20:23]
    out = generate(client, prompt="A", strategy="greedy", max_tokens=60, stop=[stop])
    assert out["finish_reason"] == "stop"
    assert out["text"] == full[: full.index(stop)]


def test_logprobs(client: TestClient) -> None:
    out = generate(client, prompt="A", max_tokens=10, seed=1, logprobs=3)
    assert len(out["logprobs"]) == 10
    for ch, lp in zip(out["text"], out["logprobs"], strict=True):
        assert lp["text"] == ch
        assert len(lp["top_logprobs"]) == 3
        assert lp["logprob"] <= 0
        best = [t["logprob"] for t in lp["top_logprobs"]]
        assert best == sorted(best, reverse=True)
        assert lp["logprob"] <= best[0] + 1e-6


def test_unknown_chars(client: TestClient) -> None:
    r = client.post("/generate", json={"prompt": "hé~llo", "max_tokens": 5})
    assert r.status_code == 422
    err = error_of(r)
    assert err["param"] == "prompt"
    assert "'é'" in err["message"] and "'~'" in err["message"]
    out = generate(client, prompt="hé~llo", max_tokens=5, unknown_chars="skip")
    assert out["usage"]["prompt_chars"] == 4


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/generate", json={"model": "nope"})
    assert r.status_code == 404
    err = error_of(r)
    assert err["param"] == "model"
    assert "tiny-lstm" in err["message"]


@pytest.mark.parametrize(
    ("body", "param", "hint"),
    [
        ({"max_tokens": 0}, "max_tokens", "1"),
        ({"max_tokens": 501}, "max_tokens", "1..500"),
        ({"temperature": 0}, "temperature", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "1"),
        ({"top_k": -1}, "top_k", "0"),
        ({"min_p": 1}, "min_p", "1"),
        ({"strategy": "best"}, "strategy", "'greedy', 'sample' or 'beam'"),
        ({"strategy": "greedy", "temperature": 0.5}, "temperature", "strategy 'sample'"),
        ({"strategy": "greedy", "top_k": 3}, "top_k", "strategy 'sample'"),
        ({"beam_width": 4}, "beam_width", "strategy 'beam'"),
        ({"logprobs": 6}, "logprobs", "5"),
        ({"stop": ["x"] * 9}, "stop", "8"),
        ({"stop": ["x" * 65]}, "stop.0", "64"),
        ({"unknown_chars": "drop"}, "unknown_chars", "'error' or 'skip'"),
        ({"seed": -1}, "seed", "0"),
        ({"prompt": 5}, "prompt", "string"),
        ({"colour": "red"}, "colour", "not permitted"),
    ],
)
def test_bad_fields_are_422_naming_the_field(client: TestClient, body: dict, param: str, hint: str) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param.split(".")[0] in err["message"] and hint in err["message"]


def test_prompt_limit(tiny_models_dir) -> None:  # type: ignore[no-untyped-def]
    from app.config import Settings
    from app.main import create_app

    with TestClient(create_app(Settings(models_dir=tiny_models_dir, max_prompt_chars=10))) as c:
        r = c.post("/generate", json={"prompt": "A" * 11, "max_tokens": 1})
        assert r.status_code == 422
        assert error_of(r)["param"] == "prompt"
        assert c.post("/generate", json={"prompt": "A" * 10, "max_tokens": 1}).status_code == 200


def test_bad_json_is_400(client: TestClient) -> None:
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "JSON" in error_of(r)["message"]


def test_unknown_route_has_error_shape(client: TestClient) -> None:
    r = client.get("/no-such-route")
    assert r.status_code == 404
    assert error_of(r)["type"] == "not_found_error"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_generate_shakespeare(shipped_client: TestClient, name: str) -> None:
    out = generate(shipped_client, model=name, prompt="ROMEO:\n", temperature=0.7, seed=1, max_tokens=300)
    text = out["text"]
    assert len(text) == 300
    words = [w.strip(".,;:!?'") for w in text.split()]
    common = {"the", "and", "to", "of", "I", "my", "you", "a", "is", "that", "not", "with", "me", "be", "your"}
    assert sum(w in common for w in words) >= 2, text  # English, not noise


def test_default_model_is_the_lstm(shipped_client: TestClient) -> None:
    out = generate(shipped_client, prompt="KING:", max_tokens=20, seed=5)
    assert out["model"] == "shakespeare-lstm"


@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"', b""])
def test_body_that_is_not_an_object_is_400(client: TestClient, content: bytes) -> None:
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert error_of(r)["type"] == "invalid_request_error"


def test_concurrent_generations_per_key_are_limited(tiny_models_dir) -> None:  # type: ignore[no-untyped-def]
    from app.config import Settings
    from app.main import create_app

    settings = Settings(models_dir=tiny_models_dir, api_keys="a,b", max_running_per_key=1)
    with TestClient(create_app(settings)) as c:
        body = {"prompt": "A", "max_tokens": 500, "stream": True}
        with c.stream("POST", "/generate", json=body, headers={"authorization": "Bearer a"}) as first:
            assert first.status_code == 200
            again = c.post("/generate", json={"max_tokens": 1}, headers={"authorization": "Bearer a"})
            assert again.status_code == 429 and again.headers["retry-after"]
            assert "limit is 1" in error_of(again)["message"]
            other = c.post("/generate", json={"max_tokens": 1}, headers={"authorization": "Bearer b"})
            assert other.status_code == 200
            first.read()
        after = c.post("/generate", json={"max_tokens": 1}, headers={"authorization": "Bearer a"})
        assert after.status_code == 200
