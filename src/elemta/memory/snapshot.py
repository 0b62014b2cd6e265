"""What the governor knows at one moment. Every reporting surface reads this; none measures.

The governor (memory/governor.py) is the only producer. /metrics, /health, /api/stats, the
systemd STATUS= line and the journal events are consumers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MemoryState(enum.Enum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class LimitSource(enum.Enum):
    """Which ceiling binds: the smallest of the configured, cgroup and host limits."""

    CONFIG = "config"
    CGROUP_V2 = "cgroup-v2"
    CGROUP_V1 = "cgroup-v1"
    HOST = "host"


@dataclass(frozen=True)
class CgroupFigures:
    version: int  # 1 or 2
    path: str  # the cgroup path as /proc/self/cgroup names it, e.g. "/system.slice/elemta.service"
    current: int  # memory.current / memory.usage_in_bytes
    limit: int | None  # lowest limit on the way up to the root; None = unlimited
    working_set: int  # current - inactive_file
    inactive_file: int
    # v2 memory.events (low/high/max/oom/oom_kill); v1: failcnt and under_oom/oom_kill
    events: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Pressure:
    """PSI for memory (cgroup memory.pressure or /proc/pressure/memory)."""

    some_avg10: float
    full_avg10: float
    some_total_us: int
    full_total_us: int


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # time.monotonic() of the sample
    wall_time: float  # time.time() of the sample
    process_rss: int  # daemon (and its workers) RSS
    usage: int  # bytes of the binding term (RSS, cgroup working set, or host used)
    limit: int  # effective limit: min(max_memory_usage, cgroup limit, host RAM)
    limit_source: LimitSource
    utilization: float  # 0.0-1.0+, max of the terms (see governor)
    state: MemoryState
    breaker: BreakerState
    protection: bool  # memory_exhaustion_protection
    warning_threshold: float
    gc_threshold: float
    critical_threshold: float
    sessions: int
    max_sessions: int
    session_bytes: int  # sum of per-session in-memory bytes
    tasks: int  # asyncio tasks + threads
    max_tasks: int
    gc_runs: int
    last_gc_at: float | None  # wall time
    last_gc_freed: int  # bytes RSS fell by in the last forced GC
    host_total: int
    host_available: int
    cgroup: CgroupFigures | None
    pressure: Pressure | None

    @property
    def utilization_percent(self) -> float:
        return round(self.utilization * 100.0, 2)
