"""The official openai client against /v1/completions and /v1/models on a live server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import LiveServer


@pytest.fixture
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def native(live_server: LiveServer, **body: object) -> dict:
    return httpx.post(f"{live_server.url}/generate", json=body, timeout=30).json()  # type: ignore[no-any-return]


def test_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"tiny-lstm", "tiny-gru", "tiny-rnn"}


def test_completion_temperature_zero_is_greedy(client: openai.OpenAI, live_server: LiveServer) -> None:
    c = client.completions.create(model="tiny-gru", prompt="ROMEO:", max_tokens=30, temperature=0)
    greedy = native(live_server, model="tiny-gru", prompt="ROMEO:", max_tokens=30, strategy="greedy")
    assert c.choices[0].text == greedy["text"]
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.prompt_tokens == 6 and c.usage.completion_tokens == 30
    assert c.object == "text_completion" and c.model == "tiny-gru"


def test_seeded_sampling_matches_native(client: openai.OpenAI, live_server: LiveServer) -> None:
    c = client.completions.create(model="tiny-lstm", prompt="A", max_tokens=40, temperature=0.8, top_p=0.9, seed=11)
    n = native(live_server, prompt="A", max_tokens=40, temperature=0.8, top_p=0.9, seed=11)
    assert c.choices[0].text == n["text"]


def test_stream_concatenates_to_the_same_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny-lstm", prompt="KING:", max_tokens=60, seed=3)
    pieces = []
    reasons = []
    for chunk in client.completions.create(model="tiny-lstm", prompt="KING:", max_tokens=60, seed=3, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].text
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])


def test_stop_and_logprobs(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny-rnn", prompt="A", max_tokens=40, temperature=0).choices[0].text
    stop = full[10:12]
    c = client.completions.create(model="tiny-rnn", prompt="A", max_tokens=40, temperature=0, stop=stop, logprobs=2)
    choice = c.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]
    assert choice.logprobs is not None
    assert "".join(choice.logprobs.tokens or []) == choice.text
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs or [])


def test_errors_raise_typed_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="A", max_tokens=5)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny-lstm", prompt="A", max_tokens=5, n=2)
