"""The compute thread: every torch and ONNX Runtime call of a serving process runs on this one thread.

torch's CPU kernels give each calling thread its own OpenMP thread team. One calling thread keeps one
team, sized to the CPUs the process may use (app.cpus): its threads never outnumber those CPUs, so a
prompt's whole-sequence pass runs at full speed, and between regions they spin only briefly
(app/__init__.py), leaving a busy machine's cores to whoever needs them. The models share the thread,
so long work runs in slices: a generation's trip, a chunk of a prompt, a step of a beam search.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
# a computation that yields between its steps, so that other work can run in between
Steps = Generator[None, None, T]


def run_to_end(steps: Steps[T]) -> T:
    """Every step of `steps`; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _advance(steps: Steps[Any], budget: float) -> tuple[bool, Any]:
    """Steps until `budget` seconds have passed: (True, result) at the end, else (False, None)."""
    deadline = time.perf_counter() + budget
    try:
        while True:
            next(steps)
            if time.perf_counter() >= deadline:
                return False, None
    except StopIteration as end:
        return True, end.value


class Compute:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="compute")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the compute thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_steps(self, steps: Steps[T], budget: float) -> T:
        """A step-wise computation on the compute thread, in slices of about `budget` seconds."""
        while True:
            done, result = await self.run(_advance, steps, budget)
            if done:
                return result

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
