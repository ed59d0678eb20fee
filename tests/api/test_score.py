"""POST /score: response shape, per-char logprobs, errors and limits, and agreement with `rnnserve eval`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.checkpoint import load_checkpoint
from app.config import Settings
from app.main import create_app
from app.training.evaluate import text_loss
from tests.api.conftest import SHIPPED_DIR, error_of

# Macbeth (Act II, Scene 1 and Act V, Scene 5): the test split's play, embedded so the test does not
# depend on data/
MACBETH = """\
MACBETH.
Is this a dagger which I see before me,
The handle toward my hand? Come, let me clutch thee:--
I have thee not, and yet I see thee still.
Art thou not, fatal vision, sensible
To feeling as to sight? or art thou but
A dagger of the mind, a false creation,
Proceeding from the heat-oppressed brain?
I see thee yet, in form as palpable
As this which now I draw.
Thou marshall'st me the way that I was going;
And such an instrument I was to use.
Mine eyes are made the fools o' the other senses,
Or else worth all the rest: I see thee still;
And on thy blade and dudgeon gouts of blood,
Which was not so before.--There's no such thing:
It is the bloody business which informs
Thus to mine eyes.--Now o'er the one half-world
Nature seems dead, and wicked dreams abuse
The curtain'd sleep; witchcraft celebrates
Pale Hecate's offerings; and wither'd murder,
Alarum'd by his sentinel, the wolf,
Whose howl's his watch, thus with his stealthy pace,
With Tarquin's ravishing strides, towards his design
Moves like a ghost.--Thou sure and firm-set earth,
Hear not my steps, which way they walk, for fear
Thy very stones prate of my whereabout,
And take the present horror from the time,
Which now suits with it.--Whiles I threat, he lives;
Words to the heat of deeds too cold breath gives.
I go, and it is done; the bell invites me.
Hear it not, Duncan; for it is a knell
That summons thee to heaven or to hell.

SEYTON.
The queen, my lord, is dead.

MACBETH.
She should have died hereafter;
There would have been a time for such a word.--
To-morrow, and to-morrow, and to-morrow,
Creeps in this petty pace from day to day,
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow; a poor player,
That struts and frets his hour upon the stage,
And then is heard no more: it is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.
"""


def score(client: TestClient, **body: object) -> dict:
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru", "tiny-rnn"])
def test_response_shape(client: TestClient, model: str) -> None:
    out = score(client, model=model, text="Speak, speak.")
    assert set(out) >= {"chars", "nats_per_char", "bits_per_char", "perplexity"}
    assert out.get("per_char") is None
    assert out["chars"] == 13
    nats = out["nats_per_char"]
    assert 0 < nats < 10
    assert out["bits_per_char"] == pytest.approx(nats / math.log(2), rel=1e-9)
    assert out["perplexity"] == pytest.approx(math.exp(nats), rel=1e-9)


def test_default_model_and_determinism(client: TestClient) -> None:
    a = score(client, text="First Citizen:")
    b = score(client, model="tiny-lstm", text="First Citizen:")
    assert a["nats_per_char"] == b["nats_per_char"]
    assert a["nats_per_char"] != score(client, model="tiny-gru", text="First Citizen:")["nats_per_char"]


def test_per_char(client: TestClient) -> None:
    text = "We know't, we know't."
    out = score(client, model="tiny-gru", text=text, per_char=True)
    per_char = out["per_char"]
    assert len(per_char) == len(text) == out["chars"]
    assert "".join(p["text"] for p in per_char) == text
    assert all(p["logprob"] < 0 for p in per_char)
    mean = sum(p["logprob"] for p in per_char) / len(per_char)
    assert mean == pytest.approx(-out["nats_per_char"], rel=1e-9, abs=1e-12)


def test_one_char(client: TestClient) -> None:
    out = score(client, text="A", per_char=True)
    assert out["chars"] == 1
    assert out["nats_per_char"] == pytest.approx(-out["per_char"][0]["logprob"])


def test_unknown_chars_are_a_422_naming_text(client: TestClient) -> None:
    r = client.post("/score", json={"text": "caf\u00e9 \u00e0 la carte"})
    assert r.status_code == 422
    err = error_of(r)
    assert err["param"] == "text"
    assert "text" in err["message"]
    assert "'\u00e9'" in err["message"] and "'\u00e0'" in err["message"]


def test_unknown_chars_skip(client: TestClient) -> None:
    out = score(client, text="caf\u00e9 \u00e0 la carte", unknown_chars="skip", per_char=True)
    assert out["chars"] == len("caf  la carte")
    assert "".join(p["text"] for p in out["per_char"]) == "caf  la carte"
    assert out["nats_per_char"] == pytest.approx(score(client, text="caf  la carte")["nats_per_char"], abs=1e-6)


def test_only_unknown_chars_skipped_is_a_422(client: TestClient) -> None:
    r = client.post("/score", json={"text": "\u00e9\u00e0", "unknown_chars": "skip"})
    assert r.status_code == 422
    assert error_of(r)["param"] == "text"


def test_empty_text_is_a_422(client: TestClient) -> None:
    r = client.post("/score", json={"text": ""})
    assert r.status_code == 422
    assert error_of(r)["param"] == "text"


def test_missing_text_and_bad_fields_are_422(client: TestClient) -> None:
    r = client.post("/score", json={"model": "tiny-lstm"})
    assert r.status_code == 422
    assert error_of(r)["param"] == "text"
    r = client.post("/score", json={"text": "A", "unknown_chars": "drop"})
    assert r.status_code == 422
    assert error_of(r)["param"] == "unknown_chars"
    r = client.post("/score", json={"text": "A", "temperature": 1.0})
    assert r.status_code == 422
    assert error_of(r)["param"] == "temperature"


def test_unknown_model_is_a_404(client: TestClient) -> None:
    r = client.post("/score", json={"model": "nope", "text": "A"})
    assert r.status_code == 404
    err = error_of(r)
    assert err["param"] == "model"
    assert "nope" in err["message"]


def test_text_over_the_limit_is_a_422(tiny_models_dir: Path) -> None:
    app = create_app(Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", max_prompt_chars=10))
    with TestClient(app) as c:
        assert c.post("/score", json={"text": "A" * 10}).status_code == 200
        r = c.post("/score", json={"text": "A" * 11})
        assert r.status_code == 422
        err = error_of(r)
        assert err["param"] == "text"
        assert "10" in err["message"] and "11" in err["message"]


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru", "tiny-rnn"])
def test_score_agrees_with_text_loss_on_tiny_models(client: TestClient, tiny_models_dir: Path, model: str) -> None:
    ckpt = load_checkpoint(tiny_models_dir / model)
    text = MACBETH[:500]
    out = score(client, model=model, text=text, unknown_chars="skip")
    loss = text_loss(ckpt.model, ckpt.vocab, text)
    assert out["chars"] == loss.chars == len(ckpt.vocab.encode(text, unknown="skip"))
    assert out["nats_per_char"] == pytest.approx(loss.nats_per_char, abs=1e-4)


def test_score_agrees_with_rnnserve_eval_on_the_shipped_lstm(shipped_client: TestClient) -> None:
    ckpt = load_checkpoint(SHIPPED_DIR / "shakespeare-lstm")
    served = shipped_client.get("/models/shakespeare-lstm").json()["sha256"]
    assert ckpt.sha256 == served, "models/shakespeare-lstm changed since the server loaded it (a training run?)"
    assert set(MACBETH) <= set(ckpt.vocab.chars)
    assert 1900 <= len(MACBETH) <= 2200
    out = score(shipped_client, model="shakespeare-lstm", text=MACBETH)
    loss = text_loss(ckpt.model, ckpt.vocab, MACBETH)
    assert out["chars"] == loss.chars == len(MACBETH)
    assert out["nats_per_char"] == pytest.approx(loss.nats_per_char, abs=1e-4)
    assert out["bits_per_char"] == pytest.approx(loss.bits_per_char, abs=1e-4)
    # a trained model does better than a uniform guess over its vocabulary
    assert out["nats_per_char"] < math.log(len(ckpt.vocab))
