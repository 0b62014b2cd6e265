"""How many CPUs this process may really use: affinity/cpuset and the cgroup CPU quota.

os.cpu_count() reports the host; a container or a systemd unit with CPUQuota= gets less. Like
Go 1.25's GOMAXPROCS, `[server] workers = "auto"` takes the smallest of the CPUs in the
affinity mask (which the cpuset controller sets) and the quota (v2 cpu.max, v1
cpu.cfs_quota_us / cpu.cfs_period_us) over the cgroup and its parents, rounded up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path

from .memory.cgroup import CgroupUnavailable, ancestors, locate


def parse_cpu_max(text: str) -> float | None:
    """CPUs from v2 cpu.max ("max 100000" or "200000 100000"); None for no quota."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return int(fields[0]) / period


def parse_cfs(quota: str, period: str) -> float | None:
    """CPUs from v1 cpu.cfs_quota_us / cpu.cfs_period_us; -1 is no quota."""
    q = int(quota)
    return None if q < 0 else q / int(period)


def cpu_quota(root: Path = Path("/")) -> float | None:
    """The lowest CPU quota on the way up from this process's cgroup; None when unlimited."""
    try:
        location = locate(root, "cpu")
    except CgroupUnavailable:
        return None
    quotas = []
    for d in ancestors(location):
        try:
            if location.version == 2:
                q = parse_cpu_max((d / "cpu.max").read_text())
            else:
                q = parse_cfs((d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if q is not None:
            quotas.append(q)
    return min(quotas) if quotas else None


def usable_cpus(root: Path = Path("/"), affinity: int | None = None) -> int:
    """CPUs available to this process: min(affinity mask, ceil(cgroup quota)), at least 1."""
    n = affinity if affinity is not None else len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def worker_cpu(index: int, allowed: Collection[int]) -> int:
    """The CPU worker `index` (1-based) is bound to: the allowed CPUs in order, round robin."""
    cpus = sorted(allowed)
    return cpus[(index - 1) % len(cpus)]
