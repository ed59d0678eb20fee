"""The compute thread's team: fewer threads for long work while other processes leave fewer CPUs free."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from app.engine.compute import Compute, Room, Steps


def stat_line(cpu: int, busy: int, idle: int) -> str:
    return f"cpu{cpu} {busy} 0 0 {idle} 0 0 0 0 0 0"


class FakeRoom(Room):
    def __init__(self, free: float) -> None:
        super().__init__(Path("/nonexistent"))
        self.free = free

    def update(self) -> float:
        return self.free


def test_room_counts_the_cpus_other_processes_keep_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.setattr(os, "sysconf", lambda _: 100)
    clock = iter([10.0, 11.0])
    monkeypatch.setattr("app.engine.compute.time.monotonic", lambda: next(clock))
    monkeypatch.setattr("app.engine.compute.time.process_time", lambda: 0.0)  # this process: idle
    room = Room(stat, every=0.5)
    stat.write_text("cpu 0 0 0 0\n" + stat_line(0, 0, 0) + "\n" + stat_line(1, 0, 0) + "\n" + stat_line(2, 0, 0))
    assert room.update() == 2
    # in one second: cpu0 busy all along (another process), cpu1 idle, cpu2 outside the affinity
    stat.write_text("\n".join([stat_line(0, 100, 0), stat_line(1, 0, 100), stat_line(2, 100, 0)]))
    assert room.update() == pytest.approx(1.0)


def steps_seeing_threads(seen: list[int]) -> Steps[int]:
    seen.append(torch.get_num_threads())
    yield
    return 7


def test_long_work_runs_on_the_cpus_left_free_and_the_team_is_whole_again_after() -> None:
    torch.set_num_threads(2)
    try:

        async def main(free: float) -> tuple[list[int], int]:
            compute = Compute(FakeRoom(free))
            seen: list[int] = []
            try:
                assert await compute.run_steps(steps_seeing_threads(seen), 1.0) == 7
                return seen, await compute.run(torch.get_num_threads)
            finally:
                compute.shutdown()

        assert asyncio.run(main(0.6)) == ([1], 2)
        assert asyncio.run(main(2.0)) == ([2], 2)
    finally:
        torch.set_num_threads(1)
