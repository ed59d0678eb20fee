"""Shared fixtures: a small vocab, tiny model configs, a short text and a tiny checkpoint on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.checkpoint import save_checkpoint
from app.nn import CharRNN, ModelConfig
from app.vocab import Vocab

# The test machine is small and often shared with training runs: one thread, tiny models.
torch.set_num_threads(1)

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

TINY_TEXT = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.

First Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict?
"""


@pytest.fixture
def vocab() -> Vocab:
    return Vocab(CHARS)


@pytest.fixture
def tiny_text() -> str:
    assert set(TINY_TEXT) <= set(CHARS)
    return TINY_TEXT


@pytest.fixture
def tiny_config(vocab: Vocab) -> Callable[..., ModelConfig]:
    """A factory: tiny_config("gru") -> a 2-layer, hidden-16 ModelConfig over `vocab`."""

    def make(arch: str = "lstm", **overrides: object) -> ModelConfig:
        fields: dict[str, object] = {
            "arch": arch,
            "vocab_size": len(vocab),
            "embedding_size": 8,
            "hidden_size": 16,
            "num_layers": 2,
            "dropout": 0.0,
            **overrides,
        }
        return ModelConfig(**fields)  # type: ignore[arg-type]

    return make


@pytest.fixture
def tiny_model(tiny_config: Callable[..., ModelConfig]) -> Callable[..., CharRNN]:
    """A factory: tiny_model("rnn") -> a seeded CharRNN in eval mode."""

    def make(arch: str = "lstm", seed: int = 0, **overrides: object) -> CharRNN:
        torch.manual_seed(seed)
        return CharRNN(tiny_config(arch, **overrides)).eval()

    return make


@pytest.fixture
def checkpoint_dir(tmp_path: Path, tiny_model: Callable[..., CharRNN], vocab: Vocab) -> Path:
    """A tiny LSTM checkpoint written by save_checkpoint into tmp_path/tiny-lstm."""
    directory = tmp_path / "tiny-lstm"
    save_checkpoint(directory, tiny_model("lstm"), vocab, {"corpus": {"name": "tiny"}, "metrics": {}})
    return directory
