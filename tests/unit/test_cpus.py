"""workers = "auto": affinity and cgroup CPU quotas, on fake trees and on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakecgroup import MOUNTS_HYBRID, MOUNTS_V2, write

from elemta.cpus import cpu_quota, parse_cfs, parse_cpu_max, usable_cpus, worker_cpu


@pytest.mark.parametrize(("text", "cpus"), [("max 100000\n", None), ("200000 100000\n", 2.0),
                                             ("150000 100000", 1.5), ("50000 100000", 0.5)])
def test_parse_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


def test_parse_cfs() -> None:
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("300000", "100000") == 3.0


def _v2(root: Path, leaf: str, parent: str) -> None:
    write(root / "proc/self/cgroup", "0::/system.slice/elemta.service\n")
    write(root / "proc/self/mountinfo", MOUNTS_V2)
    write(root / "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    write(root / "sys/fs/cgroup/system.slice/cpu.max", parent)
    write(root / "sys/fs/cgroup/system.slice/elemta.service/cpu.max", leaf)


def test_v2_quota_and_lower_parent(tmp_path: Path) -> None:
    _v2(tmp_path, "max 100000\n", "150000 100000\n")
    assert cpu_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path, affinity=8) == 2  # rounded up, as Go's GOMAXPROCS
    assert usable_cpus(tmp_path, affinity=1) == 1


def test_v2_no_quota_uses_affinity(tmp_path: Path) -> None:
    _v2(tmp_path, "max 100000\n", "max 100000\n")
    assert cpu_quota(tmp_path) is None
    assert usable_cpus(tmp_path, affinity=6) == 6


def test_v1_hybrid_quota(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/cgroup", "1:cpu:/box\n4:memory:/box\n0::/\n")
    write(tmp_path / "proc/self/mountinfo", MOUNTS_HYBRID)
    write(tmp_path / "sys/fs/cgroup/cpu/box/cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "sys/fs/cgroup/cpu/box/cpu.cfs_period_us", "100000\n")
    write(tmp_path / "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path) == 0.5
    assert usable_cpus(tmp_path, affinity=4) == 1


def test_missing_cgroup_files_fall_back_to_affinity(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/cgroup", "")
    write(tmp_path / "proc/self/mountinfo", "")
    assert usable_cpus(tmp_path, affinity=3) == 3


def test_real_machine_quota_in_a_v1_cpu_cgroup(tmp_path: Path) -> None:
    """A real v1 cpu cgroup with a 1.5-CPU quota, read by a process placed in it."""
    own = Path("/proc/self/cgroup").read_text()
    line = next((ln for ln in own.splitlines() if ":cpu," in ln or ":cpu:" in ln), None)
    base = Path("/sys/fs/cgroup/cpu")
    if os.geteuid() != 0 or line is None or not (base / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root and a v1 cpu controller")
    group = base / line.split(":", 2)[2].lstrip("/") / f"elemta-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("150000")
    except OSError as exc:
        pytest.skip(f"cannot create a cpu cgroup here: {exc}")
    try:
        import subprocess
        import sys

        code = "from elemta.cpus import cpu_quota, usable_cpus; print(cpu_quota(), usable_cpus())"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
        )
        quota, cpus = out.stdout.split()
        assert float(quota) == 1.5
        assert int(cpus) == min(2, len(os.sched_getaffinity(0)))
    finally:
        group.rmdir()


def test_worker_cpu_round_robin_over_allowed_cpus() -> None:
    assert [worker_cpu(i, {5, 1, 3}) for i in range(1, 7)] == [1, 3, 5, 1, 3, 5]
    assert worker_cpu(1, {0}) == 0
