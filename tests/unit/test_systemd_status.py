"""The pure parts of the systemd integration: STATUS= text, watchdog interval, LISTEN_FDS parsing."""

from __future__ import annotations

import dataclasses

import pytest

from elemta.memory.snapshot import (
    BreakerState,
    LimitSource,
    MemoryState,
    Snapshot,
    Term,
    TermFigures,
)
from elemta.observe.systemd import (
    extend_timeout_usec,
    parse_listen_fds,
    phase,
    status_text,
    watchdog_interval,
)

MiB = 1024 * 1024


def snap(**kw: object) -> Snapshot:
    base = Snapshot(
        taken_at=1.0, wall_time=1.0, process_rss=40 * MiB, usage=210 * MiB, limit=512 * MiB,
        limit_source=LimitSource.CGROUP_V2, utilization=0.41, state=MemoryState.NORMAL,
        breaker=BreakerState.CLOSED, protection=True, warning_threshold=0.75, gc_threshold=0.8,
        critical_threshold=0.9, sessions=3, max_sessions=1000, session_bytes=0, tasks=10,
        max_tasks=2000, gc_runs=0, last_gc_at=None, last_gc_freed=0, host_total=8192 * MiB,
        host_available=4096 * MiB, cgroup=None, pressure=None,
        terms=(TermFigures(Term.PROCESS, 210 * MiB, 2048 * MiB),
               TermFigures(Term.CGROUP, 420 * MiB, 512 * MiB)),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_status_text_is_the_issue_example() -> None:
    # elemta's own 210 MiB of the 512 MiB limit, and the cgroup (shared with others) at 82%
    s = snap()
    assert status_text(phase(s), s.sessions, s) == (
        "accepting; memory 41.0% of 512.0 MiB (cgroup-v2), cgroup 82% of 512.0 MiB binding; "
        "3 sessions; breaker closed"
    )


@pytest.mark.parametrize(
    ("kw", "draining", "expected"),
    [
        ({}, False, "accepting"),
        ({"state": MemoryState.WARNING}, False, "accepting"),
        ({"state": MemoryState.CRITICAL}, False, "refusing new mail (452 4.3.1)"),
        ({"breaker": BreakerState.OPEN}, False, "refusing new mail (452 4.3.1)"),
        ({"state": MemoryState.CRITICAL, "protection": False}, False, "accepting"),
        ({"state": MemoryState.CRITICAL}, True, "draining"),
    ],
)
def test_phase(kw: dict[str, object], draining: bool, expected: str) -> None:
    assert phase(snap(**kw), draining=draining) == expected


def test_status_without_a_governor_and_singular_session() -> None:
    assert status_text("accepting", 1, None) == "accepting; 1 session"
    s = snap(usage=31 * MiB, limit=256 * MiB, utilization=31 / 256,
             limit_source=LimitSource.CONFIG, breaker=BreakerState.HALF_OPEN,
             terms=(TermFigures(Term.PROCESS, 31 * MiB, 256 * MiB),
                    TermFigures(Term.HOST, 2048 * MiB, 8192 * MiB)))
    assert status_text("accepting", 0, s) == (
        "accepting; memory 12.1% of 256.0 MiB (config), host 25% of 8.0 GiB binding; "
        "0 sessions; breaker half-open"
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, 42) == expected


def test_listen_fds() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp:api"}
    assert parse_listen_fds(env, 7) == {3: "smtp", 4: "api"}
    assert parse_listen_fds(env, 8) == {}  # passed to a different process
    assert parse_listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, 7) == {3: "unknown"}
    assert parse_listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, 7) == {}


def test_extend_timeout_covers_the_drain() -> None:
    assert extend_timeout_usec(30.0) == 40_000_000
