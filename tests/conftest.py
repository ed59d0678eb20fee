"""Shared fixtures: a small vocab, tiny model configs, a short text and a tiny checkpoint on disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.checkpoint import save_checkpoint
from app.nn import CharRNN, ModelConfig
from app.vocab import Vocab

# The test machine is small and often shared with training runs: one thread, tiny models; and the
# servers the tests start, in this process or another, one thread each unless a test says otherwise.
torch.set_num_threads(1)
os.environ.setdefault("RNNSERVE_TORCH_THREADS", "1")

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


# -- system programs some tests need: skipped with the install command, failed under CI=true ---------

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import NoReturn  # noqa: E402


def unavailable(message: str) -> NoReturn:
    """Skip, or fail where CI=true: there every test must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: these tests may not be skipped)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        unavailable("redis-server not found on PATH: install it with `apt-get install redis-server`")


# -- a throwaway redis-server for the session tests -------------------------------------------------


class RedisServer:
    """A throwaway redis-server on a free port (never 6379), in its own directory, without persistence.

    `kill()` stops it the hard way and `start()` brings it back on the same port (for outage tests).
    """

    def __init__(self, directory: Path) -> None:
        import socket

        self.directory = directory
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        assert self.port != 6379, "never use the default Redis port"
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        require_redis_server()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--loglevel", "warning"]  # fmt: skip
        with open(self.directory / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def ping(self) -> bool:
        import redis

        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test session's own, started once, stopped at the end."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
