"""The /health verdict and the /api/stats document: pure functions of what the daemon knows.

Inputs are the governor's Snapshot (None before the governor's first sample or when no
governor is attached), the SMTP counters, the event-loop heartbeat age and whether the daemon
is draining. The schema is documented in README.md and elemta(8).
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..memory.snapshot import BreakerState, MemoryState, Snapshot, TermFigures
from .heartbeat import STALL_AFTER
from .metrics import SmtpCounts


@dataclass(frozen=True)
class Inputs:
    snapshot: Snapshot | None
    smtp: SmtpCounts
    heartbeat_age: float
    draining: bool
    started: float  # wall time the daemon started
    profiling: bool  # [api] enable_profiling
    stalled: tuple[str, ...] = ()  # worker processes whose loop stopped reporting
    queue: dict[str, Any] | None = None  # the queue manager's stats (queued transports only)


def health(i: Inputs) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 while serving (ok/warning), 503 with reasons otherwise."""
    reasons: list[str] = []
    snap = i.snapshot
    if i.heartbeat_age > STALL_AFTER:
        reasons.append(f"event loop stalled: no heartbeat for {i.heartbeat_age:.1f}s "
                       f"(bound {STALL_AFTER:.0f}s)")
    reasons.extend(i.stalled)
    if snap is not None and snap.breaker is not BreakerState.CLOSED:
        reasons.append(f"circuit breaker {snap.breaker.value}")
    if snap is not None and snap.state is MemoryState.CRITICAL:
        reasons.append(f"memory critical: {_binding(snap)}")
    if i.draining:
        reasons.append("draining: shutting down")
    if reasons:
        status = "unhealthy"
    elif snap is not None and snap.state is MemoryState.WARNING:
        status = "warning"
        reasons.append(f"memory warning: {_binding(snap)}")
    else:
        status = "ok"
    if status != "unhealthy" and i.queue is not None and i.queue["stuck"]:
        # Intake still works: a stuck queue is a warning, not a reason to fail over.
        status = "warning"
        reasons.extend(f"queue stuck: {why}" for why in i.queue["stuck"])
    body: dict[str, Any] = {
        "status": status,
        "reasons": reasons,
        "memory_state": snap.state.value if snap else None,
        "breaker": snap.breaker.value if snap else None,
        "utilization_percent": snap.utilization_percent if snap else None,
        "binding": _term(snap.binding) if snap else None,
        "event_loop_heartbeat_age_seconds": round(i.heartbeat_age, 3),
    }
    return (503 if status == "unhealthy" else 200), body


def _binding(snap: Snapshot) -> str:
    b = snap.binding
    return (f"{b.term.value} {b.percent}% of {b.ceiling} bytes (binding); elemta "
            f"{snap.utilization_percent}% of {snap.limit} bytes ({snap.limit_source.value})")


def _term(t: TermFigures) -> dict[str, Any]:
    return {"term": t.term.value, "usage_bytes": t.usage, "ceiling_bytes": t.ceiling,
            "percent": t.percent}


def _memory(snap: Snapshot) -> dict[str, Any]:
    cg = snap.cgroup
    psi = snap.pressure
    return {
        # usage_bytes / limit_bytes == utilization_percent; the state follows `binding`
        "usage_bytes": snap.usage,
        "usage_source": snap.usage_source.value,
        "limit_bytes": snap.limit,
        "limit_source": snap.limit_source.value,
        "utilization_percent": snap.utilization_percent,
        "binding": _term(snap.binding),
        "terms": {t.term.value: _term(t) for t in snap.terms},
        "state": snap.state.value,
        "protection": snap.protection,
        "thresholds": {
            "warning": snap.warning_threshold,
            "gc": snap.gc_threshold,
            "critical": snap.critical_threshold,
        },
        "process_rss_bytes": snap.process_rss,
        "process_pss_bytes": snap.process_pss,
        "session_bytes": snap.session_bytes,
        "host": {"total_bytes": snap.host_total, "available_bytes": snap.host_available},
        "cgroup": None if cg is None else {
            "version": cg.version,
            "path": cg.path,
            "current_bytes": cg.current,
            "limit_bytes": cg.limit,
            "working_set_bytes": cg.working_set,
            "reclaimable_file_bytes": cg.reclaimable_file,
            "events": dict(cg.events),
        },
        "pressure": None if psi is None else {
            "some_avg10": psi.some_avg10,
            "full_avg10": psi.full_avg10,
            "some_total_us": psi.some_total_us,
            "full_total_us": psi.full_total_us,
        },
        "gc": {
            "runs": snap.gc_runs,
            "last_at": snap.last_gc_at,
            "last_freed_bytes": snap.last_gc_freed,
        },
        "sampled_at": snap.wall_time,
        "sample_age_seconds": round(max(0.0, time.monotonic() - snap.taken_at), 3),
    }


def stats(i: Inputs) -> dict[str, Any]:
    snap = i.snapshot
    c = i.smtp
    return {
        "version": __version__,
        "uptime_seconds": round(max(0.0, time.time() - i.started), 3),
        "started_at": i.started,
        "memory": None if snap is None else _memory(snap),
        "sessions": None if snap is None else {"current": snap.sessions, "max": snap.max_sessions},
        "tasks": None if snap is None else {"current": snap.tasks, "max": snap.max_tasks},
        "breaker": None if snap is None else snap.breaker.value,
        "smtp": {
            "connections": {
                "accepted": c.connections_accepted,
                "rejected": dict(sorted(c.connections_rejected.items())),
            },
            "replies": {f"{code} {enh}".strip(): n for (code, enh), n in sorted(c.replies.items())},
            "replies_by_class": dict(sorted(c.replies_by_class().items())),
            "messages_accepted": c.messages_accepted,
            "recipients_accepted": c.recipients_accepted,
            "bytes_accepted": c.bytes_accepted,
        },
        "event_loop": {"heartbeat_age_seconds": round(i.heartbeat_age, 3),
                       "stall_after_seconds": STALL_AFTER},
        "draining": i.draining,
        "queue": i.queue,
        "profiling": {"enabled": i.profiling, "tracing": tracemalloc.is_tracing()},
    }
