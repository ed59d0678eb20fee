"""The compute thread: every torch and ONNX Runtime call of a serving process runs on this one thread.

torch's CPU kernels give each calling thread its own OpenMP thread team. One calling thread keeps one
team, sized to the CPUs the process may use (app.cpus): its threads never outnumber those CPUs, so a
prompt's whole-sequence pass runs at full speed. The models share the thread,
so long work runs in slices: a generation's trip, a chunk of a prompt, a step of a beam search. A
slice of long work (a scored text, a prompt, a beam search) runs on fewer threads while other
processes leave fewer CPUs free than the team has threads: a team waits for its slowest thread, and a
thread sharing a core with a busy process is off it for scheduler slices at a time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

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


class Room:
    """The CPUs of this process's affinity that other processes left free lately, read from /proc/stat."""

    def __init__(self, stat: Path = Path("/proc/stat"), every: float = 0.5) -> None:
        self.stat = stat
        self.every = every  # seconds between readings: the figure is over the last such window
        self.cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        self._last: tuple[float, float, float] | None = None  # (wall, busy CPU seconds, own CPU seconds)
        self.free = float(len(self.cpus))

    def _busy(self) -> float:
        busy = 0
        for line in self.stat.read_text().splitlines():
            name, *fields = line.split()
            if name in self.cpus:
                ticks = [int(f) for f in fields]
                busy += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def update(self) -> float:
        """The free CPUs, read again if the last reading is `every` seconds old."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.every:
            return self.free
        try:
            busy = self._busy()
        except (OSError, ValueError, IndexError):
            return self.free
        own = time.process_time()
        if self._last is not None:
            wall, busy0, own0 = self._last
            others = max(0.0, (busy - busy0) - (own - own0)) / (now - wall)
            self.free = len(self.cpus) - others
        self._last = (now, busy, own)
        return self.free


class Compute:
    def __init__(self, room: Room | None = None) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.threads = torch.get_num_threads()  # the team's size, set before the compute thread starts
        self.room = room or Room()

    def _fitted(self, steps: Steps[Any], budget: float) -> tuple[bool, Any]:
        """_advance on a team no larger than the CPUs other processes left free (at least one thread)."""
        threads = min(self.threads, max(1, round(self.room.update())))
        if threads == self.threads:
            return _advance(steps, budget)
        torch.set_num_threads(threads)
        try:
            return _advance(steps, budget)
        finally:
            torch.set_num_threads(self.threads)  # what else runs here (an engine made, a trip) sees the whole team

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the compute thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_steps(self, steps: Steps[T], budget: float) -> T:
        """A step-wise computation on the compute thread, in slices of about `budget` seconds."""
        while True:
            done, result = await self.run(self._fitted, steps, budget)
            if done:
                return result

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
