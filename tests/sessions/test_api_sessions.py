"""Sessions through the HTTP API: exact continuation, the /sessions routes, conflicts, concurrency,
a Redis outage and ownership. Each runs with the in-process store and with a real redis-server."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.checkpoint import save_checkpoint
from app.config import Settings
from app.nn import CharRNN, ModelConfig
from app.sessions.record import TAIL_CHARS, encode_state
from app.vocab import Vocab
from tests.api.conftest import TINY_VOCAB, LiveServer, error_of
from tests.conftest import RedisServer
from tests.sessions.conftest import CELLS, STORES, ClientFactory, session_count, stored

PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."
PROBE = "All:\nSpeak, speak.\nYou are all resolved rather to die than to famish?"
SESSION_FIELDS = {"session_id", "model", "model_sha256", "chars", "tail", "created_at", "updated_at", "expires_at"}


def generate(client: TestClient | httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def info(client: TestClient | httpx.Client, session_id: str) -> dict[str, Any]:
    response = client.get(f"/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


def nats(client: TestClient, session_id: str, text: str = PROBE) -> float:
    response = client.post("/score", json={"text": text, "session_id": session_id})
    assert response.status_code == 200, response.text
    return response.json()["nats_per_char"]


def greedy(client: TestClient, session_id: str, max_tokens: int = 20) -> str:
    """A greedy continuation of a fork (the session itself is left as it was)."""
    fork = client.post(f"/sessions/{session_id}/fork")
    assert fork.status_code == 201, fork.text
    return generate(client, session_id=fork.json()["session_id"], strategy="greedy", max_tokens=max_tokens)["text"]


def assert_same_state(client: TestClient, a: str, b: str) -> None:
    """Two sessions hold the same state: they score a text alike and continue it alike."""
    assert nats(client, a) == pytest.approx(nats(client, b), abs=1e-5)
    assert greedy(client, a) == greedy(client, b)


# -- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", CELLS)
def test_greedy_split_across_requests_equals_one_request(api: TestClient, model: str) -> None:
    whole = generate(api, model=model, prompt=PROMPT, strategy="greedy", max_tokens=40)
    first = generate(api, model=model, prompt=PROMPT, strategy="greedy", max_tokens=20)
    rest = generate(api, session_id=first["session_id"], prompt="", strategy="greedy", max_tokens=20)
    assert len(whole["text"]) == 40
    assert first["text"] + rest["text"] == whole["text"]
    assert rest["session_id"] == first["session_id"]
    assert rest["model"] == model
    assert rest["usage"] == {"prompt_chars": 0, "completion_chars": 20, "session_chars": len(PROMPT) + 40}
    assert whole["usage"]["session_chars"] == len(PROMPT) + 40
    split, one = info(api, first["session_id"]), info(api, whole["session_id"])
    assert (split["chars"], split["tail"]) == (one["chars"], one["tail"])
    assert_same_state(api, first["session_id"], whole["session_id"])


@pytest.mark.parametrize("model", CELLS)
def test_seeded_sampling_split_across_requests_equals_one_request(api: TestClient, model: str) -> None:
    body = {"model": model, "prompt": PROMPT, "strategy": "sample", "seed": 1234}
    whole = generate(api, **body, max_tokens=40)
    first = generate(api, **body, max_tokens=20)
    # no seed: the session's stored generator goes on where it stopped
    rest = generate(api, session_id=first["session_id"], strategy="sample", max_tokens=20)
    assert len(set(whole["text"])) > 5, "sampling should not look like greedy"
    assert first["text"] + rest["text"] == whole["text"]
    assert rest["seed"] == 1234
    assert_same_state(api, first["session_id"], whole["session_id"])


@pytest.mark.parametrize("model", CELLS)
def test_feeding_a_then_b_gives_the_state_of_feeding_ab(api: TestClient, model: str) -> None:
    # every request generates at least one character, which the session has read too: A, g1, B, g2
    a, b = "First Cit", "izen:\nBefore we"
    s1 = generate(api, model=model, prompt=a, strategy="greedy", max_tokens=1)
    s1b = generate(api, session_id=s1["session_id"], prompt=b, strategy="greedy", max_tokens=1)
    assert s1b["usage"]["prompt_chars"] == len(b)
    s2 = generate(api, model=model, prompt=a + s1["text"] + b, strategy="greedy", max_tokens=1)
    assert s1b["text"] == s2["text"]
    one, two = info(api, s1["session_id"]), info(api, s2["session_id"])
    assert one["chars"] == two["chars"] == len(a) + len(b) + 2
    assert one["tail"] == two["tail"] == a + s1["text"] + b + s2["text"]
    assert_same_state(api, s1["session_id"], s2["session_id"])


STRATEGIES = {
    "greedy": {"strategy": "greedy"},
    "sample": {"strategy": "sample", "seed": 3},
    "beam": {"strategy": "beam", "beam_width": 3},
    "sample-stop": {"strategy": "sample", "seed": 3},  # the stop string is picked in the test
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model", CELLS)
def test_a_sessions_state_is_the_state_after_reading_its_text(api: TestClient, model: str, strategy: str) -> None:
    """Scoring a text as the session's continuation equals scoring it after the session's whole text."""
    params = dict(STRATEGIES[strategy])
    if strategy == "sample-stop":  # a stop character this seeded run is sure to meet
        probe = generate(api, model=model, prompt=PROMPT, max_tokens=30, save_session=False, strategy="sample", seed=3)
        params["stop"] = [probe["text"][5]]
    first = generate(api, model=model, prompt=PROMPT, max_tokens=30, **params)
    sid = first["session_id"]
    more = generate(api, session_id=sid, prompt="Hear", max_tokens=30, **params)
    history = info(api, sid)["tail"]  # under TAIL_CHARS: the whole text the state has read
    if strategy == "sample-stop":
        assert first["finish_reason"] == "stop"
        # the stop string is not returned, but the state has read it
        stop = params["stop"][0]
        assert history == PROMPT + first["text"] + stop + "Hear" + more["text"] + (
            stop if more["finish_reason"] == "stop" else ""
        )
    else:
        assert history == PROMPT + first["text"] + "Hear" + more["text"]
    assert more["usage"]["session_chars"] == len(history)
    as_continuation = api.post("/score", json={"text": PROBE, "session_id": sid, "per_char": True})
    fresh = api.post("/score", json={"model": model, "text": history + PROBE, "per_char": True})
    assert as_continuation.status_code == fresh.status_code == 200
    got = [c["logprob"] for c in as_continuation.json()["per_char"]]
    expected = [c["logprob"] for c in fresh.json()["per_char"]][-len(PROBE) :]
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("model", CELLS)
def test_a_continuation_with_a_seed_reseeds(api: TestClient, model: str) -> None:
    start = generate(api, model=model, prompt=PROMPT, strategy="sample", seed=1, max_tokens=10)
    forks = [api.post(f"/sessions/{start['session_id']}/fork").json()["session_id"] for _ in range(3)]
    reseeded = [generate(api, session_id=f, strategy="sample", seed=99, max_tokens=30) for f in forks[:2]]
    assert reseeded[0]["text"] == reseeded[1]["text"]
    assert reseeded[0]["seed"] == 99
    # the original session, reseeded alike, is the same generation from the same state
    assert (
        generate(api, session_id=start["session_id"], strategy="sample", seed=99, max_tokens=30)["text"]
        == (reseeded[0]["text"])
    )
    # without the seed the third fork goes on with the stored generator: another text (fixed seeds: no flake)
    unseeded = generate(api, session_id=forks[2], strategy="sample", max_tokens=30)
    assert unseeded["seed"] == 1
    assert unseeded["text"] != reseeded[0]["text"]
    # after the reseed, both reseeded forks go on with the same (new) generator
    after = [generate(api, session_id=f, strategy="sample", max_tokens=20)["text"] for f in forks[:2]]
    assert after[0] == after[1]


def test_sampling_parameters_are_per_request(api: TestClient) -> None:
    s = generate(api, prompt=PROMPT, strategy="sample", seed=5, max_tokens=5)
    fork = api.post(f"/sessions/{s['session_id']}/fork").json()["session_id"]
    top1 = generate(api, session_id=s["session_id"], strategy="sample", seed=7, top_k=1, max_tokens=30)
    greedy_text = generate(api, session_id=fork, strategy="greedy", max_tokens=30)["text"]
    assert top1["text"] == greedy_text  # top_k=1 on the same state is the greedy choice
    free = generate(api, session_id=s["session_id"], strategy="sample", seed=7, max_tokens=30)
    assert free["text"] != top1["text"]  # and top_k did not stick to the session


# -- the /sessions routes -------------------------------------------------------------------------


def test_get_session_describes_it(api: TestClient) -> None:
    prompt = (PROMPT + " ") * 3  # with 100 generated: more than TAIL_CHARS
    before = time.time()
    made = generate(api, model="tiny-gru", prompt=prompt, strategy="greedy", max_tokens=100)
    first = info(api, made["session_id"])
    assert set(first) == SESSION_FIELDS
    assert first["session_id"] == made["session_id"]
    assert first["session_id"].startswith("sess-") and len(first["session_id"]) >= 27  # >= 128 random bits
    assert first["model"] == "tiny-gru"
    assert first["model_sha256"] == api.get("/models/tiny-gru").json()["sha256"]
    assert first["chars"] == len(prompt) + 100
    assert first["tail"] == (prompt + made["text"])[-TAIL_CHARS:]
    assert len(first["tail"]) == TAIL_CHARS
    assert before <= first["created_at"] == first["updated_at"] < first["expires_at"] <= time.time() + 86_400
    assert first["expires_at"] - first["updated_at"] == pytest.approx(86_400, abs=1)

    time.sleep(0.01)
    more = generate(api, session_id=made["session_id"], prompt="Hear!", strategy="greedy", max_tokens=7)
    second = info(api, made["session_id"])
    assert second["chars"] == first["chars"] + 5 + 7
    assert second["tail"] == (first["tail"] + "Hear!" + more["text"])[-TAIL_CHARS:]
    assert second["created_at"] == first["created_at"]
    assert second["updated_at"] > first["updated_at"]
    assert second["expires_at"] > first["expires_at"]


def test_a_short_session_has_its_whole_text_as_tail_and_honours_session_ttl(api: TestClient) -> None:
    made = generate(api, prompt="Speak", strategy="greedy", max_tokens=3, session_ttl=120)
    got = info(api, made["session_id"])
    assert got["tail"] == "Speak" + made["text"]
    assert got["chars"] == 8
    assert got["expires_at"] - got["updated_at"] == pytest.approx(120, abs=0.01)


def test_unknown_session_is_404_everywhere(api: TestClient) -> None:
    sid = "sess-does-not-exist"
    responses = [
        api.get(f"/sessions/{sid}"),
        api.delete(f"/sessions/{sid}"),
        api.post(f"/sessions/{sid}/fork"),
        api.post("/generate", json={"session_id": sid, "max_tokens": 3}),
        api.post("/score", json={"session_id": sid, "text": "abc"}),
    ]
    for response in responses:
        assert response.status_code == 404, response.text
        err = error_of(response)
        assert err["type"] == "not_found_error"
        assert sid in err["message"]


def test_delete_then_404(api: TestClient) -> None:
    sid = generate(api, prompt=PROMPT, max_tokens=5)["session_id"]
    keep = generate(api, prompt=PROMPT, max_tokens=5)["session_id"]
    count = session_count(api)
    response = api.delete(f"/sessions/{sid}")
    assert response.status_code == 204
    assert response.content == b""
    assert session_count(api) == count - 1
    assert stored(api, sid) is None
    for response in (
        api.get(f"/sessions/{sid}"),
        api.delete(f"/sessions/{sid}"),
        api.post("/generate", json={"session_id": sid, "max_tokens": 3}),
    ):
        assert response.status_code == 404
        assert error_of(response)["param"] == "session_id"
    assert info(api, keep)["chars"] == len(PROMPT) + 5


@pytest.mark.parametrize("model", CELLS)
def test_fork_copies_the_state_and_both_go_on_alike(api: TestClient, model: str) -> None:
    made = generate(api, model=model, prompt=PROMPT, strategy="sample", seed=3, max_tokens=15)
    original = info(api, made["session_id"])
    response = api.post(f"/sessions/{made['session_id']}/fork")
    assert response.status_code == 201, response.text
    fork = response.json()
    assert set(fork) == SESSION_FIELDS
    assert fork["session_id"] != made["session_id"]
    for field in ("model", "model_sha256", "chars", "tail"):
        assert fork[field] == original[field], field
    assert fork["created_at"] >= original["updated_at"]
    assert fork["expires_at"] - fork["updated_at"] == pytest.approx(original["expires_at"] - original["updated_at"])
    assert info(api, fork["session_id"]) == fork

    # sampling without a seed: the generator state was copied too
    a = generate(api, session_id=made["session_id"], strategy="sample", max_tokens=25)
    b = generate(api, session_id=fork["session_id"], strategy="sample", max_tokens=25)
    assert a["text"] == b["text"]
    assert a["session_id"] == made["session_id"] and b["session_id"] == fork["session_id"]
    # independent from here: moving one leaves the other
    generate(api, session_id=made["session_id"], prompt="Hear", strategy="greedy", max_tokens=5)
    assert info(api, fork["session_id"])["chars"] == original["chars"] + 25
    assert info(api, made["session_id"])["chars"] == original["chars"] + 25 + 4 + 5


def test_continuing_with_another_model_is_409_naming_it(api: TestClient) -> None:
    made = generate(api, model="tiny-lstm", prompt=PROMPT, strategy="greedy", max_tokens=5)
    sid = made["session_id"]
    for path, body in (
        ("/generate", {"session_id": sid, "model": "tiny-gru", "max_tokens": 5}),
        ("/score", {"session_id": sid, "model": "tiny-gru", "text": "abc"}),
    ):
        response = api.post(path, json=body)
        assert response.status_code == 409, response.text
        err = error_of(response)
        assert err["type"] == "conflict_error"
        assert err["param"] == "model"
        assert "tiny-lstm" in err["message"] and "tiny-gru" in err["message"]
    assert info(api, sid)["chars"] == len(PROMPT) + 5
    # naming the session's own model is fine, and the refused request left no lease behind
    again = generate(api, session_id=sid, model="tiny-lstm", strategy="greedy", max_tokens=5)
    assert again["usage"]["session_chars"] == len(PROMPT) + 10


def resave_with_other_weights(directory: Path, name: str = "tiny-lstm") -> None:
    torch.manual_seed(1)
    vocab = Vocab(TINY_VOCAB)
    model = CharRNN(ModelConfig(arch="lstm", vocab_size=len(vocab), embedding_size=8, hidden_size=16))
    meta = {"corpus": {"name": "tiny"}, "metrics": {"val_nats_per_char": 4.0, "test_nats_per_char": 4.1}}
    save_checkpoint(directory / name, model, vocab, meta)


def test_a_session_whose_checkpoint_changed_is_409(
    make_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, tiny_models_dir: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)  # the same checkpoint files, as replicas share them...
    resave_with_other_weights(models)  # ...but tiny-lstm re-saved with other weights
    old = make_client(redis_url=redis_server.url)
    new = make_client(models_dir=models, redis_url=redis_server.url)  # another replica, same Redis
    old_sha = old.get("/models/tiny-lstm").json()["sha256"]
    assert new.get("/models/tiny-lstm").json()["sha256"] != old_sha

    made = generate(old, prompt=PROMPT, strategy="greedy", max_tokens=5)
    sid = made["session_id"]
    assert info(new, sid)["model_sha256"] == old_sha  # visible from the other replica
    for response in (
        new.post("/generate", json={"session_id": sid, "max_tokens": 5}),
        new.post("/score", json={"session_id": sid, "text": "abc"}),
    ):
        assert response.status_code == 409, response.text
        err = error_of(response)
        assert err["type"] == "conflict_error"
        assert "checkpoint" in err["message"]
        assert err["param"] == "session_id"
    # the refusal left the session as it was, and free: the replica with the old weights goes on
    again = generate(old, session_id=sid, strategy="greedy", max_tokens=5)
    assert again["usage"]["session_chars"] == len(PROMPT) + 10
    # a session of an unchanged model continues on either replica
    gru = generate(old, model="tiny-gru", prompt=PROMPT, max_tokens=5)
    assert generate(new, session_id=gru["session_id"], max_tokens=5)["usage"]["session_chars"] == len(PROMPT) + 10


def overwrite(client: TestClient, session_id: str, **changes: Any) -> None:
    """Replace fields of a stored session through the app's own store (a lease and a commit)."""
    store = client.app.state.services.store  # type: ignore[attr-defined]

    async def go() -> None:
        record = await store.acquire(session_id, "test-lease")
        await store.commit(record.evolve(version=record.version + 1, **changes), "test-lease")

    assert client.portal is not None
    client.portal.call(go)


def assert_unusable_state_is_409(client: TestClient, session_id: str) -> None:
    for path, body in (
        ("/generate", {"session_id": session_id, "max_tokens": 5}),
        ("/score", {"session_id": session_id, "text": "abc"}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 409, response.text
        err = error_of(response)
        assert err["param"] == "session_id"
        assert "unusable state" in err["message"]
    assert client.delete(f"/sessions/{session_id}").status_code == 204  # not left leased or stuck


def test_a_session_with_a_state_of_the_wrong_shape_is_409(api: TestClient) -> None:
    sid = generate(api, model="tiny-gru", prompt=PROMPT, max_tokens=5)["session_id"]
    overwrite(api, sid, state=encode_state(torch.zeros(3, 1, 16)))
    assert_unusable_state_is_409(api, sid)


def test_a_session_with_undecodable_state_bytes_is_409(api: TestClient) -> None:
    sid = generate(api, model="tiny-gru", prompt=PROMPT, max_tokens=5)["session_id"]
    overwrite(api, sid, state=b"not safetensors")
    assert_unusable_state_is_409(api, sid)


def test_usage_session_chars_grows_with_prompt_and_completion(api: TestClient) -> None:
    first = generate(api, prompt="Speak, speak.", max_tokens=10)
    assert first["usage"] == {"prompt_chars": 13, "completion_chars": 10, "session_chars": 23}
    second = generate(api, session_id=first["session_id"], prompt="All:", max_tokens=7)
    assert second["usage"] == {"prompt_chars": 4, "completion_chars": 7, "session_chars": 34}
    third = generate(api, session_id=first["session_id"], max_tokens=1)
    assert third["usage"] == {"prompt_chars": 0, "completion_chars": 1, "session_chars": 35}
    assert info(api, first["session_id"])["chars"] == 35
    # unknown characters skipped are not read, so not counted
    fourth = generate(api, session_id=first["session_id"], prompt="a\u00e9b", unknown_chars="skip", max_tokens=2)
    assert fourth["usage"] == {"prompt_chars": 2, "completion_chars": 2, "session_chars": 39}


def test_save_session_false_stores_nothing(api: TestClient) -> None:
    count = session_count(api)
    out = generate(api, prompt="Speak", max_tokens=10, save_session=False)
    assert out["session_id"] is None
    assert out["usage"]["session_chars"] == 15
    assert session_count(api) == count


def test_save_session_false_leaves_the_continued_session_unchanged(api: TestClient) -> None:
    sid = generate(api, prompt=PROMPT, strategy="greedy", max_tokens=10)["session_id"]
    before, record = info(api, sid), stored(api, sid)
    assert record is not None and record.version == 1
    count = session_count(api)
    peek = generate(api, session_id=sid, prompt="Hear", strategy="greedy", max_tokens=10, save_session=False)
    assert peek["session_id"] is None
    assert peek["usage"]["session_chars"] == before["chars"] + 4 + 10
    assert info(api, sid) == before
    assert stored(api, sid) == record  # same version, state and generator
    assert session_count(api) == count
    # the state is the one before the peek (and the lease was released): the same request again matches
    saved = generate(api, session_id=sid, prompt="Hear", strategy="greedy", max_tokens=10)
    assert saved["text"] == peek["text"]
    assert saved["session_id"] == sid
    after = stored(api, sid)
    assert after is not None and after.version == 2


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("store_kind", "rounds"), [("redis", 10), ("memory", 3)])
def test_concurrent_continuations_one_wins_the_other_409_and_no_update_is_lost(
    store_kind: str, rounds: int, tiny_models_dir: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if store_kind == "redis" else None
    with LiveServer(Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", redis_url=url)) as server:
        clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(2)]
        try:
            sid = generate(clients[0], prompt=PROMPT, max_tokens=10)["session_id"]
            expected = len(PROMPT) + 10
            barrier = threading.Barrier(2)

            def continue_it(i: int) -> httpx.Response:
                barrier.wait()
                # long enough that the winner still holds the session when the loser asks for it
                return clients[i].post("/generate", json={"session_id": sid, "max_tokens": 600 + i})

            with ThreadPoolExecutor(2) as pool:
                for _ in range(rounds):
                    responses = list(pool.map(continue_it, range(2)))
                    assert sorted(r.status_code for r in responses) == [200, 409], [r.text for r in responses]
                    winner = next(r for r in responses if r.status_code == 200).json()
                    loser = error_of(next(r for r in responses if r.status_code == 409))
                    assert loser["type"] == "conflict_error"
                    assert loser["param"] == "session_id"
                    assert sid in loser["message"]
                    assert winner["usage"]["completion_chars"] in (600, 601)
                    expected += winner["usage"]["completion_chars"]
                    assert winner["usage"]["session_chars"] == expected
                    after = info(clients[0], sid)
                    assert after["chars"] == expected
                    assert after["tail"] == winner["text"][-TAIL_CHARS:]  # the winner's text, nobody else's
            # the session is free again after the last round
            last = generate(clients[1], session_id=sid, max_tokens=3)
            assert last["usage"]["session_chars"] == expected + 3
        finally:
            for client in clients:
                client.close()


# -- Redis outage ---------------------------------------------------------------------------------


def timed_post(client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    start = time.monotonic()
    response = client.post(path, json=body)
    assert time.monotonic() - start < 10, f"{path} took too long with Redis down"
    return response


def assert_store_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    err = error_of(response)
    assert err["type"] == "service_unavailable_error"
    assert "session store" in err["message"]


def test_redis_down_then_back(tiny_models_dir: Path, own_redis: RedisServer) -> None:
    settings = Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", redis_url=own_redis.url)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        sid = generate(client, prompt=PROMPT, max_tokens=5)["session_id"]
        assert client.get("/readyz").status_code == 200

        own_redis.kill()
        # no session involved: still served
        out = timed_post(client, "/generate", {"prompt": PROMPT, "max_tokens": 5, "save_session": False})
        assert out.status_code == 200, out.text
        assert out.json()["session_id"] is None
        score = timed_post(client, "/score", {"text": PROMPT})
        assert score.status_code == 200, score.text
        # anything touching a session: 503, quickly
        assert_store_down(timed_post(client, "/generate", {"session_id": sid, "max_tokens": 5}))
        assert_store_down(timed_post(client, "/generate", {"session_id": sid, "max_tokens": 5, "save_session": False}))
        assert_store_down(timed_post(client, "/generate", {"prompt": PROMPT, "max_tokens": 5}))
        assert_store_down(timed_post(client, "/score", {"text": "abc", "session_id": sid}))
        assert_store_down(timed_post(client, f"/sessions/{sid}/fork", {}))
        start = time.monotonic()
        assert_store_down(client.get(f"/sessions/{sid}"))
        assert_store_down(client.delete(f"/sessions/{sid}"))
        ready = client.get("/readyz")
        assert time.monotonic() - start < 10
        assert ready.status_code == 503
        assert ready.json()["store_ok"] is False
        assert ready.json()["store"] == "redis"
        assert client.get("/healthz").status_code == 200

        own_redis.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service did not recover after Redis came back"
            time.sleep(0.1)
        assert client.get("/readyz").json()["store_ok"] is True
        made = generate(client, prompt=PROMPT, strategy="greedy", max_tokens=5)
        more = generate(client, session_id=made["session_id"], prompt="Hear", strategy="greedy", max_tokens=5)
        assert more["usage"]["session_chars"] == len(PROMPT) + 5 + 4 + 5
        assert info(client, made["session_id"])["chars"] == len(PROMPT) + 14
        gone = client.get(f"/sessions/{sid}")  # the restarted Redis kept nothing
        assert gone.status_code == 404
        assert error_of(gone)["type"] == "not_found_error"


# -- ownership ------------------------------------------------------------------------------------


@pytest.fixture(params=STORES)
def keyed(request: pytest.FixtureRequest, make_client: ClientFactory) -> TestClient:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    return make_client(redis_url=url, api_keys="key-a,key-b")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_session_belongs_to_the_key_that_made_it(keyed: TestClient) -> None:
    a, b = auth("key-a"), auth("key-b")
    response = keyed.post("/generate", json={"prompt": PROMPT, "max_tokens": 5}, headers=a)
    assert response.status_code == 200, response.text
    sid = response.json()["session_id"]
    missing = error_of(keyed.get("/sessions/sess-does-not-exist", headers=b))
    # the same answer as for a session that does not exist: nothing tells key-b it does
    expected = {**missing, "message": missing["message"].replace("sess-does-not-exist", sid)}
    for response in (
        keyed.get(f"/sessions/{sid}", headers=b),
        keyed.delete(f"/sessions/{sid}", headers=b),
        keyed.post(f"/sessions/{sid}/fork", headers=b),
        keyed.post("/generate", json={"session_id": sid, "max_tokens": 5}, headers=b),
        keyed.post("/score", json={"session_id": sid, "text": "abc"}, headers=b),
    ):
        assert response.status_code == 404, response.text
        assert error_of(response) == expected
    # nothing key-b did changed it
    got = keyed.get(f"/sessions/{sid}", headers=a)
    assert got.status_code == 200
    assert got.json()["chars"] == len(PROMPT) + 5
    # a fork belongs to the same key
    fork = keyed.post(f"/sessions/{sid}/fork", headers=a)
    assert fork.status_code == 201
    assert keyed.get(f"/sessions/{fork.json()['session_id']}", headers=b).status_code == 404
    assert keyed.get(f"/sessions/{fork.json()['session_id']}", headers=a).status_code == 200
    more = keyed.post("/generate", json={"session_id": sid, "max_tokens": 5}, headers=a)
    assert more.status_code == 200
    assert more.json()["usage"]["session_chars"] == len(PROMPT) + 10
    assert keyed.delete(f"/sessions/{sid}", headers=a).status_code == 204


@pytest.mark.parametrize(
    "headers",
    [{}, auth("key-c"), {"Authorization": "key-a"}, {"Authorization": "Basic key-a"}, auth("")],
    ids=["none", "unknown-key", "no-scheme", "basic", "empty"],
)
def test_without_a_valid_key_it_is_401(keyed: TestClient, headers: dict[str, str]) -> None:
    sid = keyed.post("/generate", json={"max_tokens": 3}, headers=auth("key-a")).json()["session_id"]
    for response in (
        keyed.post("/generate", json={"max_tokens": 3}, headers=headers),
        keyed.post("/generate", json={"session_id": sid, "max_tokens": 3}, headers=headers),
        keyed.get(f"/sessions/{sid}", headers=headers),
        keyed.delete(f"/sessions/{sid}", headers=headers),
        keyed.post(f"/sessions/{sid}/fork", headers=headers),
        keyed.post("/score", json={"session_id": sid, "text": "abc"}, headers=headers),
    ):
        assert response.status_code == 401, response.text
        assert error_of(response)["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert keyed.get(f"/sessions/{sid}", headers=auth("key-a")).json()["chars"] == 3


def test_health_routes_are_open_without_a_key(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    ready = keyed.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["store_ok"] is True
