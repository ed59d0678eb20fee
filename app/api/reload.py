"""Following the models directory while serving: new checkpoints load, replaced ones swap, removed ones drain.

A model is served by one engine per checkpoint version. New weights get an engine of their own; the
registry and the engines switch together, between two steps of the event loop, so a new request sees
either the old version or the new one whole. The old engine is retired: it takes no new requests but
finishes the generations it runs (and still reads states for their sessions), then stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from app.engine.engine import Engine, ModelEngine
from app.registry import Changes, Registry

log = logging.getLogger(__name__)

T = TypeVar("T")
RETIRE_CHECK_S = 0.1  # how often a retired engine is checked for running generations


@dataclass
class ReloadReport:
    """What one reload changed; `refused`: name -> why (a served version of that name stays)."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


async def off_compute(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on a thread of its own, not the compute thread. Loading a checkpoint and building its
    engine (exporting its kernels, checking their determinism) take seconds, which on the compute thread
    would stall every running stream; here they only share the cores. The thread ends with the call,
    and the OpenMP team torch gave it with it."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="models-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)


class Reloader:
    """Brings the registry and the engines in line with the models directory, every `every` seconds (0: only
    when asked) and on reload()."""

    def __init__(self, registry: Registry, engine: Engine, every: float) -> None:
        self.registry = registry
        self.engine = engine
        self.every = every
        self._lock = asyncio.Lock()  # one reload at a time
        self._poll_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def retiring(self) -> int:
        """Engines of replaced or removed weights still finishing their generations."""
        return len(self._retiring)

    def start(self) -> None:
        if self.every > 0:
            self._poll_task = asyncio.create_task(self._poll(), name="models-poll")

    async def stop(self) -> None:
        tasks = [t for t in (self._poll_task, *self._retiring) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.reload()
            except Exception:
                log.exception("reloading the models directory failed; trying again in %.0fs", self.every)

    async def reload(self, retry_refused: bool = False) -> ReloadReport:
        """Scan the directory and serve what changed. A poll skips directories refused as they still are;
        `retry_refused` tries them again (so an explicit reload says why they are refused)."""
        async with self._lock:
            changes = await off_compute(self.registry.scan, retry_refused)
            report = ReloadReport(refused=dict(changes.refused))
            for name, ckpt in {**changes.added, **changes.replaced}.items():
                try:
                    built = await off_compute(self.engine.build, ckpt)
                except Exception as e:
                    log.exception("model %s: cannot start its engine", name)
                    report.refused[name] = f"{name}: cannot start its engine ({type(e).__name__}: {e})"
                    self.registry.refused[name] = self.registry.seen.pop(name, ())
                    continue
                old = self.engine.install(built)
                built.start()
                # no await since the engine took its place: the registry switches in the same step
                replacing = name in changes.replaced
                self.registry.apply(Changes(replaced={name: ckpt}) if replacing else Changes(added={name: ckpt}))
                (report.replaced if replacing else report.added).append(name)
                if old is not None:
                    self._retire(old)
            self.registry.apply(Changes(removed=changes.removed, meta=changes.meta))
            for name in changes.removed:
                gone = self.engine.remove(name)
                if gone is not None:
                    self._retire(gone)
                report.removed.append(name)
            if report.added or report.replaced or report.removed:
                log.info(
                    "models directory: added %s, replaced %s, removed %s; serving %s",
                    report.added, report.replaced, report.removed, ", ".join(self.registry.models) or "none",
                )  # fmt: skip
            return report

    def _retire(self, old: ModelEngine) -> None:
        task = asyncio.create_task(self._drain(old), name=f"retire-{old.ckpt.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.discard(task)
        # the stopped engine and its loop refer to each other: collect them now, not at some later
        # collection, so its weights and ONNX Runtime's threads go at once
        gc.collect()

    @staticmethod
    async def _drain(old: ModelEngine) -> None:
        """Stop `old` once the generations it runs have ended (it is no longer given new ones)."""
        try:
            while old.streams or old.load:
                await asyncio.sleep(RETIRE_CHECK_S)
        finally:
            old.draining = True  # a request that raced the swap is told to retry, never left waiting
            await old.stop()
            log.info("model %s: the engine of sha256 %s stopped", old.ckpt.name, old.ckpt.sha256[:12])
