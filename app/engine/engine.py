"""The engine: every loaded model's engine behind the one interface the API uses."""

from __future__ import annotations

import asyncio
import weakref

from app.checkpoint import Checkpoint
from app.engine.compute import Compute
from app.engine.config import STEP_BUDGET_S, EngineConfig
from app.engine.generate import score_steps
from app.engine.inspect import Trace, inspect
from app.engine.model_engine import ModelEngine
from app.engine.sequence import GenerationRequest
from app.engine.stream import Stream
from app.errors import NotFoundError
from app.nn import State


class Engine:
    """Submit a generation and get its Stream; score and inspect texts; start, drain and stop.
    Every model's work runs on one compute thread."""

    def __init__(self, config: EngineConfig, compute: Compute | None = None) -> None:
        self.config = config
        self.compute = compute or Compute()  # shared by the models' engines
        self.engines: dict[str, ModelEngine] = {}
        # by id(checkpoint): engines of replaced or removed weights, finishing what they run
        self.retired: weakref.WeakValueDictionary[int, ModelEngine] = weakref.WeakValueDictionary()

    async def start(self, models: dict[str, Checkpoint]) -> None:
        for name, ckpt in models.items():
            self.engines[name] = await self.compute.run(self.build, ckpt)
            self.engines[name].start()

    def build(self, ckpt: Checkpoint) -> ModelEngine:
        """A model's engine, not yet started (runs torch work: call it off the event loop)."""
        return ModelEngine(ckpt, self.config, self.compute)

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines.values()))
        self.compute.shutdown()

    def drain(self, grace: float) -> None:
        """Stop admitting; `grace` seconds later, cancel what still runs (its clients get `done`)."""
        for e in [*self.engines.values(), *self.retired.values()]:
            e.draining = True
        asyncio.get_running_loop().call_later(grace, self.abort_all)

    def abort_all(self) -> None:
        for e in [*self.engines.values(), *self.retired.values()]:
            e.abort_all()

    def install(self, engine: ModelEngine) -> ModelEngine | None:
        """Serve `engine` for its model; the engine it replaces, if any, is retired and returned
        (requests holding the old weights still find it)."""
        old = self.remove(engine.ckpt.name)
        self.engines[engine.ckpt.name] = engine
        return old

    def remove(self, name: str) -> ModelEngine | None:
        """Stop serving model `name`; its engine, if any, is retired (it finishes what it runs) and returned."""
        old = self.engines.pop(name, None)
        if old is not None:
            self.retired[id(old.ckpt)] = old
        return old

    def engine_of(self, ckpt: Checkpoint) -> ModelEngine:
        """The engine running exactly these weights (a request may hold weights replaced since)."""
        engine = self.engines.get(ckpt.name)
        if engine is None or engine.ckpt is not ckpt:
            engine = self.retired.get(id(ckpt))
        if engine is None:
            raise NotFoundError(f"model {ckpt.name!r} was replaced or removed; retry", param="model")
        return engine

    def submit(self, ckpt: Checkpoint, req: GenerationRequest, state: State | None = None) -> Stream:
        """Queue a generation of model `ckpt` from `state` (None: the zero state); raises
        OverloadedError when its queue is full."""
        return self.engine_of(ckpt).submit(req, state)

    async def score(self, ckpt: Checkpoint, ids: list[int], state: State | None = None) -> list[float]:
        """Per-character logprobs of ids[1:], off the event loop."""
        return await self.compute.run_steps(score_steps(ckpt.model, ids, state), STEP_BUDGET_S)

    async def inspect(
        self, ckpt: Checkpoint, ids: list[int], text: str, layer: int, kind: str, units: list[int] | None, top: int
    ) -> Trace:
        """The per-character trace of a text (ids: BOS first), off the event loop."""
        return await self.compute.run(inspect, ckpt.model, ids, text, layer, kind, units, top)
