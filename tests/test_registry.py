"""The registry's scans and the reloader's swaps, without HTTP: what changed, what is retried, which engine serves."""

from __future__ import annotations

import asyncio
import json
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from app.api.reload import Reloader
from app.checkpoint import META, save_checkpoint
from app.engine.compute import Compute
from app.engine.config import Backend, EngineConfig
from app.engine.engine import Engine
from app.errors import NotFoundError
from app.nn import CharRNN
from app.registry import Registry
from app.vocab import Vocab

Write = Callable[..., str]


@pytest.fixture
def write(tmp_path: Path, tiny_model: Callable[..., CharRNN], vocab: Vocab) -> Write:
    """write(name, seed) -> the sha256 of a tiny checkpoint written to tmp_path/models/name."""

    def make(name: str, seed: int = 0, arch: str = "lstm") -> str:
        return save_checkpoint(tmp_path / "models" / name, tiny_model(arch, seed=seed), vocab, {"metrics": {}})

    return make


def test_a_scan_finds_what_changed_and_changes_nothing_until_applied(tmp_path: Path, write: Write) -> None:
    write("a")
    write("b")
    registry = Registry.load(tmp_path / "models", default="a")
    assert list(registry.models) == ["a", "b"] and registry.default == "a"
    assert not registry.scan()  # nothing changed
    write("c")
    new_b = write("b", seed=1)
    shutil.rmtree(tmp_path / "models" / "a")
    changes = registry.scan()
    assert list(changes.added) == ["c"] and list(changes.replaced) == ["b"] and changes.removed == ["a"]
    assert list(registry.models) == ["a", "b"]  # a plan, not yet served
    registry.apply(changes)
    assert list(registry.models) == ["b", "c"] and registry.models["b"].sha256 == new_b
    assert registry.default == "b"  # the configured default is gone: the first model serves in its place
    write("a", seed=2)
    registry.apply(registry.scan())
    assert registry.default == "a"  # and it is the default again once it is back


def test_a_refused_directory_is_retried_when_it_changes_or_when_asked(tmp_path: Path, write: Write) -> None:
    write("a")
    registry = Registry.load(tmp_path / "models")
    write("bad")
    meta = tmp_path / "models" / "bad" / META
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "0" * 64}))
    assert list(registry.scan().refused) == ["bad"]
    assert not registry.scan()  # a poll does not try it again as it is
    assert list(registry.scan(retry_refused=True).refused) == ["bad"]  # an explicit reload does
    write("bad", seed=3)
    assert list(registry.scan().added) == ["bad"]


def test_requests_holding_replaced_weights_find_their_engine_until_it_is_gone(tmp_path: Path, write: Write) -> None:
    write("m")

    async def main() -> None:
        compute = Compute()
        registry = await compute.run(Registry.load, tmp_path / "models", "m")
        engine = Engine(EngineConfig(max_batch=4, max_queue=4, backend=Backend.TORCH), compute=compute)
        await engine.start(registry.models)
        reloader = Reloader(registry, engine, every=0)
        old = registry.get("m")
        old_engine = engine.engine_of(old)
        write("m", seed=5)
        report = await reloader.reload()
        assert report.replaced == ["m"]
        new = registry.get("m")
        assert new is not old and engine.engine_of(new) is not old_engine
        assert engine.engine_of(old) is old_engine  # a request that took the old weights before the swap
        gone = weakref.ref(old_engine)
        del old_engine
        await asyncio.wait_for(_until(lambda: reloader.retiring == 0), 10)  # idle: stopped at once
        assert gone() is None  # and freed
        with pytest.raises(NotFoundError, match="replaced or removed"):
            engine.engine_of(old)
        await reloader.stop()
        await engine.stop()

    asyncio.run(main())


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)
