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


class Term(enum.Enum):
    """A memory figure weighed against its own ceiling; the highest ratio decides the state."""

    PROCESS = "process"  # elemta's own memory against max_memory_usage
    CGROUP = "cgroup"  # the cgroup's working set against its limit (when the limit contains us)
    HOST = "host"  # the host's used memory against its RAM (when no cgroup limit does)


class UsageSource(enum.Enum):
    """How elemta's own memory was measured."""

    CGROUP = "cgroup"  # the working set of a cgroup holding only elemta's processes
    PSS = "pss"  # the PSS of elemta's processes: pages shared after fork counted once


@dataclass(frozen=True)
class TermFigures:
    term: Term
    usage: int
    ceiling: int

    @property
    def ratio(self) -> float:
        return self.usage / max(self.ceiling, 1)

    @property
    def percent(self) -> float:
        return round(self.ratio * 100.0, 2)


def binding_of(terms: tuple[TermFigures, ...]) -> TermFigures:
    """The term with the highest ratio; the first wins a tie (the process term comes first)."""
    return max(terms, key=lambda t: t.ratio)


@dataclass(frozen=True)
class CgroupFigures:
    version: int  # 1 or 2
    path: str  # the cgroup path as /proc/self/cgroup names it, e.g. "/system.slice/elemta.service"
    current: int  # memory.current / memory.usage_in_bytes
    limit: int | None  # lowest limit on the way up to the root; None = unlimited
    working_set: int  # current - reclaimable_file
    reclaimable_file: int  # clean page cache: file pages neither dirty, under writeback, shmem nor mapped
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
    process_rss: int  # RSS summed over the daemon's processes (shared pages once per process)
    usage: int  # elemta's own memory (see usage_source)
    limit: int  # effective limit: min(max_memory_usage, cgroup limit, host RAM)
    limit_source: LimitSource
    utilization: float  # usage / limit, exactly
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
    process_pss: int = 0  # PSS of the daemon's processes (shared pages counted once)
    usage_source: UsageSource = UsageSource.PSS
    terms: tuple[TermFigures, ...] = ()  # every term that applies, process first

    @property
    def binding(self) -> TermFigures:
        """The term with the highest ratio: it decides the state."""
        return binding_of(self.terms or (TermFigures(Term.PROCESS, self.usage, self.limit),))

    @property
    def utilization_percent(self) -> float:
        return round(self.utilization * 100.0, 2)

    @property
    def ratio(self) -> float:
        """What thresholds, states and the breaker are decided on: the binding term's ratio."""
        return self.binding.ratio
