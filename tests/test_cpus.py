"""The CPU budget read from fake cgroup files (v1, v2 with and without a quota) and a given affinity."""

from __future__ import annotations

from pathlib import Path

from app.cpus import CpuBudget, cpu_budget

FOUR = {0, 1, 2, 3}


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2(tmp_path: Path, cpu_max: str, path: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    write(root / path.strip("/") / "cpu.max", cpu_max + "\n")
    proc = tmp_path / "proc-cgroup"
    write(proc, f"0::{path}\n")
    return root, proc


def v1(tmp_path: Path, quota: int, period: int = 100_000, path: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    here = root / "cpu,cpuacct" / path.strip("/")
    write(here / "cpu.cfs_quota_us", f"{quota}\n")
    write(here / "cpu.cfs_period_us", f"{period}\n")
    proc = tmp_path / "proc-cgroup"
    write(proc, f"12:pids:{path}\n4:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n")
    return root, proc


def test_v2_without_a_quota_gives_the_affinity(tmp_path: Path) -> None:
    assert cpu_budget(*v2(tmp_path, "max 100000"), affinity=FOUR) == CpuBudget(4, "affinity")


def test_v2_quota_is_rounded_up(tmp_path: Path) -> None:
    assert cpu_budget(*v2(tmp_path, "150000 100000"), affinity=FOUR) == CpuBudget(2, "cgroup cpu.max")
    assert cpu_budget(*v2(tmp_path, "10000 100000"), affinity=FOUR) == CpuBudget(1, "cgroup cpu.max")


def test_v2_quota_of_a_parent_cgroup_counts(tmp_path: Path) -> None:
    root, proc = v2(tmp_path, "max 100000", "/system.slice/app.service")
    write(root / "system.slice" / "cpu.max", "200000 100000\n")
    assert cpu_budget(root, proc, affinity=FOUR) == CpuBudget(2, "cgroup cpu.max")


def test_v1_quota(tmp_path: Path) -> None:
    assert cpu_budget(*v1(tmp_path, 300_000), affinity=FOUR) == CpuBudget(3, "cgroup cfs quota")
    assert cpu_budget(*v1(tmp_path, 50_000, 100_000), affinity=FOUR) == CpuBudget(1, "cgroup cfs quota")


def test_v1_without_a_quota_gives_the_affinity(tmp_path: Path) -> None:
    assert cpu_budget(*v1(tmp_path, -1), affinity=FOUR) == CpuBudget(4, "affinity")


def test_a_container_sees_its_own_cgroup_at_the_mount_root(tmp_path: Path) -> None:
    root, proc = v1(tmp_path, 200_000)  # the quota at the mount's root
    write(proc, "4:cpu,cpuacct:/docker/0123abcd\n")  # the host's path, absent inside the container
    assert cpu_budget(root, proc, affinity=FOUR) == CpuBudget(2, "cgroup cfs quota")


def test_affinity_smaller_than_the_quota_wins(tmp_path: Path) -> None:
    assert cpu_budget(*v2(tmp_path, "400000 100000"), affinity={5}) == CpuBudget(1, "affinity")
    assert cpu_budget(*v1(tmp_path, 800_000), affinity={0, 2}) == CpuBudget(2, "affinity")


def test_no_cgroup_files_gives_the_affinity(tmp_path: Path) -> None:
    assert cpu_budget(tmp_path / "none", tmp_path / "none-either", affinity={0, 1}) == CpuBudget(2, "affinity")
    assert cpu_budget(tmp_path / "none", tmp_path / "none-either", affinity=set()) == CpuBudget(1, "affinity")


def test_this_process_has_a_budget() -> None:
    budget = cpu_budget()
    assert budget.count >= 1 and budget.source
