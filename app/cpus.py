"""The CPU budget: how many CPUs this process may use, the smaller of its cgroup's quota and its affinity."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    count: int  # at least 1
    source: str  # where the figure comes from: "affinity", "cgroup cpu.max" (v2), "cgroup cfs quota" (v1), a setting


def cpu_budget(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, affinity: set[int] | None = None
) -> CpuBudget:
    """The CPUs this process may use: its affinity, or its cgroup's quota (rounded up) where that is smaller."""
    cpus = affinity if affinity is not None else _affinity()
    budget = CpuBudget(max(1, len(cpus)), "affinity")
    quota = _quota(cgroup_root, proc_cgroup)
    if quota is not None and quota.count < budget.count:
        return quota
    return budget


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not on Linux
        return set(range(os.cpu_count() or 1))


def _quota(root: Path, proc_cgroup: Path) -> CpuBudget | None:
    """The tightest CPU quota on this process's cgroup or any cgroup above it, None where there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    found: list[CpuBudget] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2: one hierarchy mounted at the root
            found += _limits(root, path, "cgroup cpu.max", _v2)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            for mount in {root / controllers, root / "cpu"}:
                found += _limits(mount, path, "cgroup cfs quota", _v1)
    if not lines:  # no /proc/self/cgroup: the mounts' roots, as a container sees its own cgroup
        found += _limits(root, "/", "cgroup cpu.max", _v2) + _limits(root / "cpu", "/", "cgroup cfs quota", _v1)
    return min(found, key=lambda b: b.count, default=None)


def _limits(mount: Path, path: str, source: str, read: Callable[[Path], int | None]) -> list[CpuBudget]:
    """The quota of the cgroup at `path` under `mount` and of each one above it (a container sees its own
    cgroup at the mount's root while /proc/self/cgroup names the host's path: that path then is absent)."""
    here = mount / path.strip("/")
    out = []
    for directory in (here, *here.parents):
        if directory != mount and mount not in directory.parents:
            break
        cpus = read(directory)
        if cpus is not None:
            out.append(CpuBudget(cpus, source))
    return out


def _v2(directory: Path) -> int | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else _cpus(int(quota), int(period))


def _v1(directory: Path) -> int | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota < 0 else _cpus(quota, period)


def _cpus(quota: int, period: int) -> int | None:
    return max(1, math.ceil(quota / period)) if period > 0 else None
