"""Metrics, /health and /api/stats rendered from governor Snapshots (the dataclass itself)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from elemta.memory.snapshot import (
    BreakerState,
    CgroupFigures,
    LimitSource,
    MemoryState,
    Pressure,
    Snapshot,
    Term,
    TermFigures,
    UsageSource,
)
from elemta.observe import report
from elemta.observe.heartbeat import STALL_AFTER
from elemta.observe.metrics import SIZE_BUCKETS, SmtpStats, build_registry, parse_status

GUIDE_NAMES = ("elemta_memory_usage_bytes", "elemta_memory_utilization_percent",
               "elemta_gc_runs_total", "elemta_goroutines_current")


def snapshot(**kw: object) -> Snapshot:
    base = Snapshot(
        taken_at=time.monotonic(), wall_time=time.time(), process_rss=40 << 20,
        usage=900 << 20, limit=1 << 30, limit_source=LimitSource.CGROUP_V1,
        utilization=(900 << 20) / (1 << 30), state=MemoryState.WARNING,
        process_pss=30 << 20, usage_source=UsageSource.CGROUP,
        terms=(TermFigures(Term.PROCESS, 900 << 20, 2 << 30),
               TermFigures(Term.CGROUP, 900 << 20, 1 << 30)),
        breaker=BreakerState.CLOSED, protection=True, warning_threshold=0.75,
        gc_threshold=0.8, critical_threshold=0.9, sessions=12, max_sessions=1000,
        session_bytes=3 << 20, tasks=40, max_tasks=2000, gc_runs=3,
        last_gc_at=time.time() - 10, last_gc_freed=5 << 20, host_total=8 << 30,
        host_available=5 << 30,
        cgroup=CgroupFigures(version=1, path="/system.slice/elemta.service",
                             current=950 << 20, limit=1 << 30, working_set=900 << 20,
                             reclaimable_file=50 << 20, events={"failcnt": 2, "oom_kill": 0, "under_oom": 1,
                                                     "oom_kill_disable": 0}),
        pressure=Pressure(some_avg10=1.5, full_avg10=0.25, some_total_us=2_000_000,
                          full_total_us=500_000),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def scrape(snap: Snapshot | None, stats: SmtpStats | None = None,
           age: float = 0.1) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = build_registry(lambda: snap, stats or SmtpStats(), lambda: age)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_guide_names_and_values_from_the_snapshot() -> None:
    snap = snapshot()
    m = scrape(snap)
    for name in GUIDE_NAMES:
        assert (name, ()) in m, name
    assert m[("elemta_memory_usage_bytes", ())] == snap.usage
    assert m[("elemta_memory_utilization_percent", ())] == snap.utilization_percent
    assert m[("elemta_gc_runs_total", ())] == snap.gc_runs
    assert m[("elemta_goroutines_current", ())] == snap.tasks
    assert m[("elemta_memory_limit_bytes", (("source", "cgroup-v1"),))] == snap.limit
    assert m[("elemta_memory_usage_source", (("source", "cgroup"),))] == 1
    assert m[("elemta_memory_term_ratio", (("term", "cgroup"),))] == 900 / 1024
    assert m[("elemta_memory_term_ratio", (("term", "process"),))] == 900 / 2048
    assert m[("elemta_memory_term_ceiling_bytes", (("term", "process"),))] == 2 << 30
    assert m[("elemta_memory_term_usage_bytes", (("term", "cgroup"),))] == 900 << 20
    assert m[("elemta_memory_binding_term", (("term", "cgroup"),))] == 1
    assert m[("elemta_memory_binding_term", (("term", "process"),))] == 0
    assert ("elemta_memory_term_ratio", (("term", "host"),)) not in m
    assert m[("elemta_process_memory_pss_bytes", ())] == 30 << 20
    assert m[("elemta_memory_state", (("state", "warning"),))] == 1
    assert m[("elemta_memory_state", (("state", "critical"),))] == 0
    assert m[("elemta_circuit_breaker_open", ())] == 0
    assert m[("elemta_sessions_active", ())] == snap.sessions
    assert m[("elemta_cgroup_memory_current_bytes", ())] == 950 << 20
    assert m[("elemta_cgroup_memory_max_bytes", ())] == 1 << 30
    assert m[("elemta_cgroup_memory_working_set_bytes", ())] == 900 << 20
    assert m[("elemta_cgroup_memory_events_total", (("event", "failcnt"),))] == 2
    # v1 oom_control flags are states, not counters
    assert ("elemta_cgroup_memory_events_total", (("event", "under_oom"),)) not in m
    assert ("elemta_cgroup_memory_events_total", (("event", "oom_kill_disable"),)) not in m
    assert m[("elemta_cgroup_memory_under_oom", ())] == 1
    assert m[("elemta_memory_pressure_some_avg10", ())] == 1.5
    assert m[("elemta_memory_pressure_full_avg10", ())] == 0.25
    assert m[("elemta_memory_threshold_ratio", (("threshold", "critical"),))] == 0.9


def test_no_snapshot_no_memory_metrics_and_optional_parts_absent() -> None:
    m = scrape(None)
    assert not any(name.startswith("elemta_memory") for name, _ in m)
    assert ("elemta_build_info", ()) not in m  # it has labels
    assert any(name == "elemta_build_info" for name, _ in m)
    m = scrape(snapshot(cgroup=None, pressure=None, last_gc_at=None))
    assert not any(name.startswith(("elemta_cgroup", "elemta_memory_pressure")) for name, _ in m)
    assert ("elemta_gc_last_run_timestamp_seconds", ()) not in m


def test_breaker_open_and_unlimited_cgroup() -> None:
    snap = snapshot(breaker=BreakerState.OPEN, state=MemoryState.CRITICAL,
                    cgroup=CgroupFigures(2, "/x", 1, None, 1, 0, {"oom": 1, "oom_kill": 1,
                                                                 "max": 7}))
    m = scrape(snap)
    assert m[("elemta_circuit_breaker_open", ())] == 1
    assert ("elemta_cgroup_memory_max_bytes", ()) not in m
    assert m[("elemta_cgroup_memory_events_total", (("event", "max"),))] == 7
    assert m[("elemta_cgroup_info", (("path", "/x"), ("version", "2")))] == 1


def test_message_size_histogram_buckets() -> None:
    stats = SmtpStats()
    for size in (10, 1024, 1025, 10 << 20, 1 << 30):
        stats.message_accepted(size, 1)
    m = scrape(None, stats)
    bucket = {dict(labels)["le"]: v for (name, labels), v in m.items()
              if name == "elemta_message_size_bytes_bucket"}
    assert bucket["1024.0"] == 2
    assert bucket["4096.0"] == 3
    assert bucket[str(SIZE_BUCKETS[-1])] == 4
    assert bucket["+Inf"] == 5
    assert m[("elemta_message_size_bytes_sum", ())] == 10 + 1024 + 1025 + (10 << 20) + (1 << 30)


@pytest.mark.parametrize(("status", "parsed"), [
    ("452 4.3.1 Insufficient system storage", ("452", "4.3.1")),
    ("552 5.3.4 Message exceeds fixed maximum message size", ("552", "5.3.4")),
    ("250-PIPELINING", ("", "")),
    ("250 HELP", ("250", "")),
    ("220 mx.example.test ESMTP elemta", ("220", "")),
    ("354 End data with <CR><LF>.<CR><LF>", ("354", "")),
    ("2500 nonsense", ("", "")),
    ("250-mx.example.test\r\n250-PIPELINING\r\n250 HELP\r\n", ("250", "")),
    ("250-first\n452 4.3.1 last", ("452", "4.3.1")),
])
def test_parse_status(status: str, parsed: tuple[str, str]) -> None:
    assert parse_status(status) == parsed


def inputs(snap: Snapshot | None, age: float = 0.1, draining: bool = False) -> report.Inputs:
    return report.Inputs(snapshot=snap, smtp=SmtpStats().counts(), heartbeat_age=age,
                         draining=draining, started=time.time() - 5, profiling=False)


@pytest.mark.parametrize(("snap", "age", "draining", "code", "status"), [
    (snapshot(state=MemoryState.NORMAL), 0.1, False, 200, "ok"),
    (snapshot(state=MemoryState.WARNING), 0.1, False, 200, "warning"),
    (snapshot(state=MemoryState.CRITICAL), 0.1, False, 503, "unhealthy"),
    (snapshot(state=MemoryState.NORMAL, breaker=BreakerState.OPEN), 0.1, False, 503,
     "unhealthy"),
    (snapshot(state=MemoryState.NORMAL), STALL_AFTER + 1, False, 503, "unhealthy"),
    (snapshot(state=MemoryState.NORMAL), 0.1, True, 503, "unhealthy"),
    (None, 0.1, False, 200, "ok"),
    (None, STALL_AFTER + 1, False, 503, "unhealthy"),
])
def test_health_verdict(snap: Snapshot | None, age: float, draining: bool, code: int,
                        status: str) -> None:
    got_code, body = report.health(inputs(snap, age, draining))
    assert (got_code, body["status"]) == (code, status)
    assert bool(body["reasons"]) == (status != "ok")


def test_stats_document_mirrors_the_snapshot() -> None:
    snap = snapshot()
    doc = report.stats(inputs(snap))
    mem = doc["memory"]
    assert (mem["usage_bytes"], mem["limit_bytes"], mem["limit_source"], mem["state"]) == (
        snap.usage, snap.limit, "cgroup-v1", "warning")
    assert mem["utilization_percent"] == snap.utilization_percent
    assert mem["thresholds"] == {"warning": 0.75, "gc": 0.8, "critical": 0.9}
    assert mem["cgroup"]["events"] == {"failcnt": 2, "oom_kill": 0, "under_oom": 1,
                                       "oom_kill_disable": 0}
    assert mem["pressure"]["full_avg10"] == 0.25
    assert mem["gc"] == {"runs": 3, "last_at": snap.last_gc_at, "last_freed_bytes": 5 << 20}
    assert doc["sessions"] == {"current": 12, "max": 1000}
    assert doc["tasks"] == {"current": 40, "max": 2000}
    assert doc["breaker"] == "closed"
    assert 4 < doc["uptime_seconds"] < 60


def test_reply_counts_are_by_code_whatever_the_cache_holds() -> None:
    statuses = ["250 2.1.0 Sender ok", "250 2.0.0 Ok: queued as AAAA", "250 2.0.0 Ok: queued as B",
                "220 mx.test ESMTP elemta", "250-mx.test\r\n250-PIPELINING\r\n250 HELP",
                "452 4.3.1 Insufficient system storage", "452 4.5.3 Too many recipients",
                "221 Bye", "500 Error", "250 2.123.123 odd", "bogus", "250-only continuation"]
    stats = SmtpStats()
    for _ in range(3):
        for s in statuses:
            stats.reply(s)
    # written out by hand: a multi-line reply counts once, by its last line; "bogus" and a
    # lone continuation line not at all
    assert stats.counts().replies == {
        ("250", "2.1.0"): 3, ("250", "2.0.0"): 6, ("220", ""): 3, ("250", ""): 3,
        ("452", "4.3.1"): 3, ("452", "4.5.3"): 3, ("221", ""): 3, ("500", ""): 3,
        ("250", "2.123.123"): 3,
    }
