"""Engine: runs generation requests of the loaded models off the event loop, with bounded admission."""

from __future__ import annotations

import asyncio

from app.checkpoint import Checkpoint
from app.engine.generate import GenerationRequest, GenerationResult, generate, score
from app.errors import OverloadedError
from app.nn import State


class Engine:
    def __init__(self, max_running: int) -> None:
        self.max_running = max_running
        self.running = 0

    async def generate(self, ckpt: Checkpoint, req: GenerationRequest, state: State | None = None) -> GenerationResult:
        if self.running >= self.max_running:
            raise OverloadedError(
                f"{self.running} generations are running, the limit is {self.max_running}; retry shortly"
            )
        self.running += 1
        try:
            return await asyncio.to_thread(generate, ckpt.model, ckpt.vocab.chars, req, state)
        finally:
            self.running -= 1

    async def score(self, ckpt: Checkpoint, ids: list[int], state: State | None = None) -> list[float]:
        """Per-character logprobs of ids[1:], off the event loop."""
        return await asyncio.to_thread(score, ckpt.model, ids, state)
