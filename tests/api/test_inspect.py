"""POST /inspect: shapes, defaults, limits and errors; activations equal the model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from app.checkpoint import load_checkpoint
from app.config import Settings
from app.main import create_app
from tests.api.conftest import SHIPPED_DIR, error_of

TEXT = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\nAy me!\n"


def test_shape_and_defaults(client: TestClient) -> None:
    r = client.post("/inspect", json={"text": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-lstm" and body["arch"] == "lstm"
    assert body["layer"] == 1 and body["state"] == "h" and body["hidden_size"] == 16  # the last layer's output
    assert body["text"] == TEXT
    assert len(body["units"]) == 16 == len(set(body["units"]))
    assert len(body["activations"]) == len(TEXT)
    assert all(len(row) == len(body["units"]) for row in body["activations"])
    assert all(-1.0 <= v <= 1.0 for row in body["activations"] for v in row)  # h = o * tanh(c)
    assert len(body["top"]) == len(TEXT)
    for row in body["top"]:
        assert len(row) == 5
        probs = [p["prob"] for p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert all(len(p["char"]) == 1 for p in row)
    assert set(body["features"]) == {"column", "in_brackets", "in_quotes", "speaker", "line_end"}
    assert body["features"]["in_brackets"] == [] and body["features"]["in_quotes"] == []  # none in the text
    for name in ("column", "speaker", "line_end"):
        pairs = body["features"][name]
        assert len(pairs) == 5
        assert [abs(p["r"]) for p in pairs] == sorted((abs(p["r"]) for p in pairs), reverse=True)


@pytest.mark.parametrize(("model", "state"), [("tiny-lstm", "c"), ("tiny-gru", "h"), ("tiny-rnn", "h")])
def test_chosen_layer_state_units_and_top(client: TestClient, model: str, state: str) -> None:
    r = client.post("/inspect", json={"model": model, "text": "ROMEO.\n", "layer": 0, "state": state,
                                      "units": [15, 0, 4], "top": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["layer"], body["state"], body["units"]) == (0, state, [15, 0, 4])
    assert len(body["activations"]) == 7 and all(len(row) == 3 for row in body["activations"])
    assert all(len(row) == 2 for row in body["top"])


def test_same_request_same_answer(client: TestClient) -> None:
    a = client.post("/inspect", json={"text": TEXT, "model": "tiny-gru"}).json()
    b = client.post("/inspect", json={"text": TEXT, "model": "tiny-gru"}).json()
    assert a == b


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"text": ""}, "text", "at least 1"),
        ({"text": "x" * 2001}, "text", "2000"),
        ({"text": "ab", "layer": 2}, "layer", "0..1"),
        ({"text": "ab", "layer": -1}, "layer", "greater than or equal to 0"),
        ({"text": "ab", "model": "tiny-gru", "state": "c"}, "state", "lstm"),
        ({"text": "ab", "state": "x"}, "state", "'h' or 'c'"),
        ({"text": "ab", "units": [16]}, "units", "0..15"),
        ({"text": "ab", "units": [1, 1]}, "units", "at most once"),
        ({"text": "ab", "units": []}, "units", "at least 1"),
        ({"text": "ab", "units": list(range(65))}, "units", "64"),
        ({"text": "ab", "top": 0}, "top", "greater than or equal to 1"),
        ({"text": "ab", "top": 11}, "top", "less than or equal to 10"),
        ({"text": "ab{"}, "text", "unknown_chars"),
        ({"text": "{}", "unknown_chars": "skip"}, "text", "at least one character"),
        ({"text": "ab", "extra": 1}, "extra", "not permitted"),
    ],
)
def test_bad_requests_name_the_field(client: TestClient, body: dict, param: str, words: str) -> None:
    r = client.post("/inspect", json=body)
    assert r.status_code in (400, 422), r.text
    err = error_of(r)
    assert err["param"] == param, err
    assert words in err["message"], err


def test_unknown_model_is_a_404(client: TestClient) -> None:
    r = client.post("/inspect", json={"text": "ab", "model": "nope"})
    assert r.status_code == 404
    assert error_of(r)["param"] == "model"


def test_skip_reports_the_text_as_read(client: TestClient) -> None:
    body = client.post("/inspect", json={"text": "a{b}c", "unknown_chars": "skip", "units": [0]}).json()
    assert body["text"] == "abc" and len(body["activations"]) == 3


def test_needs_a_key_when_keys_are_on(tiny_models_dir) -> None:  # type: ignore[no-untyped-def]
    app = create_app(Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", api_keys="k1"))
    with TestClient(app) as c:
        assert c.post("/inspect", json={"text": "ab"}).status_code == 401
        ok = c.post("/inspect", json={"text": "ab"}, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200


@pytest.mark.parametrize("name", ["shakespeare-lstm", "shakespeare-gru", "shakespeare-rnn"])
def test_shipped_model_activations_equal_its_forward_pass(shipped_client: TestClient, name: str) -> None:
    """The top layer's output per character is what the model's whole-sequence forward computes."""
    ckpt = load_checkpoint(SHIPPED_DIR / name)
    units = [0, 7, 100, 511]
    body = shipped_client.post("/inspect", json={"model": name, "text": TEXT, "units": units}).json()
    ids = torch.tensor([ckpt.vocab.bos, *ckpt.vocab.encode(TEXT)]).view(-1, 1)
    with torch.inference_mode():
        out, _ = ckpt.model.rnn(ckpt.model.embed(ids))  # (T + 1, 1, H): the last layer's h per character
        probs = torch.softmax(ckpt.model.head(out[1:, 0]), dim=-1)  # (T, V)
    torch.testing.assert_close(torch.tensor(body["activations"]), out[1:, 0, units], atol=2e-4, rtol=0)
    best = [row[0]["char"] for row in body["top"]]
    assert best == [ckpt.vocab.chars[int(i)] for i in probs.argmax(dim=-1)]
    # a trained model finds the speaker lines and the line ends: some unit tracks each clearly
    assert abs(body["features"]["line_end"][0]["r"]) > 0.5
    assert abs(body["features"]["speaker"][0]["r"]) > 0.5


def test_one_character(client: TestClient) -> None:
    body = client.post("/inspect", json={"text": "A"}).json()
    assert body["text"] == "A" and len(body["activations"]) == 1 and len(body["top"]) == 1
    assert all(pairs == [] for pairs in body["features"].values())  # nothing varies in one character
