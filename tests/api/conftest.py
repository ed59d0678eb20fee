"""API fixtures: an app over tiny checkpoints in tmp_path, and one over the shipped models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.checkpoint import save_checkpoint
from app.config import Settings
from app.main import create_app
from app.nn import CharRNN, ModelConfig
from app.vocab import Vocab

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = ROOT / "models"
SHIPPED = ("shakespeare-lstm", "shakespeare-gru", "shakespeare-rnn")
TINY_VOCAB = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def write_tiny_models(directory: Path) -> None:
    vocab = Vocab(TINY_VOCAB)
    for arch in ("lstm", "gru", "rnn"):
        torch.manual_seed(0)
        model = CharRNN(ModelConfig(arch=arch, vocab_size=len(vocab), embedding_size=8, hidden_size=16))
        meta = {"corpus": {"name": "tiny"}, "metrics": {"val_nats_per_char": 4.0, "test_nats_per_char": 4.1}}
        save_checkpoint(directory / f"tiny-{arch}", model, vocab, meta)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    write_tiny_models(directory)
    return directory


@pytest.fixture
def client(tiny_models_dir: Path) -> Iterator[TestClient]:
    app = create_app(Settings(models_dir=tiny_models_dir, default_model="tiny-lstm", max_tokens_limit=500))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def shipped_client() -> Iterator[TestClient]:
    missing = [n for n in SHIPPED if not (SHIPPED_DIR / n / "meta.json").exists()]
    if missing:
        pytest.fail(f"shipped checkpoints missing from {SHIPPED_DIR}: {missing}")
    app = create_app(Settings(models_dir=SHIPPED_DIR))
    with TestClient(app) as c:
        yield c


def error_of(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message", "param"}, body
    return body["error"]  # type: ignore[no-any-return]


def manifest_vocab() -> str:
    return json.loads((SHIPPED_DIR / "shakespeare-lstm" / "vocab.json").read_text())["chars"]  # type: ignore[no-any-return]


class LiveServer:
    """The app served by uvicorn on a free port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 120  # a busy machine starts slowly
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("live-models")
    write_tiny_models(directory)
    with LiveServer(Settings(models_dir=directory, default_model="tiny-lstm")) as server:
        yield server
