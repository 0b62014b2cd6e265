"""The governor's pure decisions (table-driven) and the Governor over a fake cgroup tree."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakecgroup import MOUNTS_V1, V1_SENTINEL, proc, v1_group, write

from elemta import config
from elemta.memory import governor as gov
from elemta.memory.governor import (
    Breaker,
    Governor,
    GovernorEvent,
    breaker_step,
    command_refusal,
    connection_refusal,
    data_entry_refusal,
    effective,
    next_state,
    transition_events,
)
from elemta.memory.reclaim import own_rss
from elemta.memory.refusal import Refusal
from elemta.memory.sampler import Sample, Sampler
from elemta.memory.snapshot import BreakerState, CgroupFigures, LimitSource, MemoryState, Term, TermFigures

MiB = 1024 * 1024
GiB = 1024 * MiB
N, W, C = MemoryState.NORMAL, MemoryState.WARNING, MemoryState.CRITICAL
CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
PROCESS, CGROUP, HOST = Term.PROCESS, Term.CGROUP, Term.HOST
MIN_SESSION = 512 * 1024  # the smallest per_connection_memory_limit config accepts


def sample(pss: int, cg: tuple[int, int, int | None] | None = None, total: int = 16 * GiB,
           available: int = 12 * GiB, own: bool = False) -> Sample:
    figures = None
    if cg is not None:
        version, ws, limit = cg
        figures = CgroupFigures(version, "/x", ws, limit, ws, 0)
    return Sample(0.0, 0.0, 3 * pss, pss, total, available, figures, own, None)


# -- which limit binds -------------------------------------------------------------------------

@pytest.mark.parametrize("s, max_usage, limit, source, usage, binding, ratio", [
    # config is the limit; the host term (4 GiB of 16 used) binds over PSS 100 MiB / 2 GiB
    (sample(100 * MiB), 2 * GiB, 2 * GiB, LimitSource.CONFIG, 100 * MiB, HOST, 0.25),
    # cgroup v1 lower than config: its working set term counts, the host term does not; the
    # cgroup holds other processes too, so elemta's own usage is its PSS
    (sample(50 * MiB, (1, 230 * MiB, 256 * MiB)), 2 * GiB, 256 * MiB, LimitSource.CGROUP_V1,
     50 * MiB, CGROUP, 230 / 256),
    (sample(50 * MiB, (2, 128 * MiB, 512 * MiB)), 2 * GiB, 512 * MiB, LimitSource.CGROUP_V2,
     50 * MiB, CGROUP, 0.25),
    # a cgroup of its own: the working set is elemta's usage
    (sample(50 * MiB, (2, 128 * MiB, 512 * MiB), own=True), 2 * GiB, 512 * MiB,
     LimitSource.CGROUP_V2, 128 * MiB, CGROUP, 0.25),
    # config lower than the cgroup: config is the limit, elemta's own usage its term
    (sample(900 * MiB, (2, 950 * MiB, 4 * GiB)), 1 * GiB, 1 * GiB, LimitSource.CONFIG,
     900 * MiB, PROCESS, 900 / 1024),
    # a 2 GiB budget on a 1 GiB host without cgroup limit: the host binds and is the container
    (sample(100 * MiB, (1, 100 * MiB, None), total=1 * GiB, available=80 * MiB), 2 * GiB,
     1 * GiB, LimitSource.HOST, 100 * MiB, HOST, (1024 - 80) / 1024),
    # a cgroup limit above RAM contains nothing: the host term applies, the host binds
    (sample(100 * MiB, (1, 100 * MiB, 64 * GiB), total=8 * GiB, available=1 * GiB), 16 * GiB,
     8 * GiB, LimitSource.HOST, 100 * MiB, HOST, 7 / 8),
])
def test_effective(s: Sample, max_usage: int, limit: int, source: LimitSource, usage: int,
                   binding: Term, ratio: float) -> None:
    eff = effective(s, max_usage)
    assert (eff.limit, eff.source, eff.usage) == (limit, source, usage)
    assert eff.utilization == usage / limit
    assert eff.binding.term is binding
    assert eff.binding.ratio == pytest.approx(ratio)


# -- states with hysteresis ----------------------------------------------------------------------

@pytest.mark.parametrize("state, util, expected", [
    (N, 0.50, N), (N, 0.75, W), (N, 0.89, W), (N, 0.90, C), (N, 1.20, C),
    (W, 0.74, W), (W, 0.701, W), (W, 0.699, N), (W, 0.90, C),
    (C, 0.89, C), (C, 0.851, C), (C, 0.849, W), (C, 0.71, W), (C, 0.69, N),
])
def test_next_state(state: MemoryState, util: float, expected: MemoryState) -> None:
    assert next_state(state, util, 0.75, 0.90) is expected


def test_hovering_at_critical_does_not_flap() -> None:
    state, seen = N, []
    for util in [0.899, 0.901, 0.899, 0.902, 0.88, 0.905, 0.87, 0.90]:
        state = next_state(state, util, 0.75, 0.90)
        seen.append(state)
    assert seen == [W, C, C, C, C, C, C, C]


@pytest.mark.parametrize("old, new, events", [
    (N, N, []), (N, W, ["memory_warning"]), (N, C, ["memory_warning", "memory_critical"]),
    (W, C, ["memory_critical"]), (C, W, ["memory_warning"]), (C, N, ["memory_recovered"]),
    (W, N, ["memory_recovered"]),
])
def test_transition_events(old: MemoryState, new: MemoryState, events: list[str]) -> None:
    assert transition_events(old, new) == events


# -- circuit breaker ------------------------------------------------------------------------------

@pytest.mark.parametrize("utils, states", [
    # three critical samples open it; one calm sample in between resets the count
    ([0.95, 0.95, 0.95], [CLOSED, CLOSED, OPEN]),
    ([0.95, 0.95, 0.80, 0.95, 0.95], [CLOSED] * 5),
    # open -> calm x3 -> half-open -> calm x3 -> closed
    ([0.95] * 3 + [0.5] * 6, [CLOSED, CLOSED, OPEN, OPEN, OPEN, HALF, HALF, HALF, CLOSED]),
    # the margin band (below critical, above critical - margin) is not calm
    ([0.95] * 3 + [0.87] * 4, [CLOSED, CLOSED, OPEN, OPEN, OPEN, OPEN, OPEN]),
    # critical again while half-open re-opens at once
    ([0.95] * 3 + [0.5] * 3 + [0.91], [CLOSED, CLOSED, OPEN, OPEN, OPEN, HALF, OPEN]),
])
def test_breaker(utils: list[float], states: list[BreakerState]) -> None:
    b, seen = Breaker(), []
    for u in utils:
        b = breaker_step(b, u, 0.90)
        seen.append(b.state)
    assert seen == states


@pytest.mark.parametrize("state, breaker, tasks, half_left, reason", [
    (N, CLOSED, 10, 0, None),
    (W, CLOSED, 10, 0, None),
    (C, CLOSED, 10, 0, Refusal.MEMORY_CRITICAL),
    (N, OPEN, 10, 0, Refusal.BREAKER_OPEN),
    (N, HALF, 10, 2, None),
    (N, HALF, 10, 0, Refusal.BREAKER_HALF_OPEN),
    (N, CLOSED, 101, 0, Refusal.TASK_CAP),
    (N, CLOSED, 100, 0, None),
])
def test_connection_refusal(state: MemoryState, breaker: BreakerState, tasks: int, half_left: int,
                            reason: Refusal | None) -> None:
    assert connection_refusal(state, breaker, tasks, 100, half_left) is reason


@pytest.mark.parametrize("state, breaker, held, reason", [
    (N, CLOSED, 0, None), (W, CLOSED, 0, None), (C, CLOSED, 0, Refusal.MEMORY_CRITICAL),
    (N, OPEN, 0, Refusal.BREAKER_OPEN), (N, HALF, 0, None),
    (N, CLOSED, 2000, Refusal.SESSION_MEMORY),
])
def test_command_refusal(state: MemoryState, breaker: BreakerState, held: int,
                         reason: Refusal | None) -> None:
    assert command_refusal(state, breaker, held, 1000) is reason


# -- the Governor over a fake v1 cgroup -----------------------------------------------------------

def fake_v1(root: Path, usage: int) -> Path:
    proc(root, "4:memory:/svc\n", MOUNTS_V1, rss=20 * MiB)
    base = root / "sys/fs/cgroup/memory"
    write(base / "memory.limit_in_bytes", V1_SENTINEL)
    v1_group(base / "svc", usage=usage, limit=str(100 * MiB), clean=0)
    return base / "svc/memory.usage_in_bytes"


def make_governor(root: Path, protection: bool = True, **memory: object) -> Governor:
    cfg = config.build({"memory": {"memory_exhaustion_protection": protection,
                                   "per_connection_memory_limit": MIN_SESSION, **memory}})
    return Governor(cfg, Sampler(root), tasks=lambda: 5)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gov, "REFRESH_AFTER", 0.0)  # every admission question re-samples


def test_governor_answers_follow_the_cgroup(tmp_path: Path, fresh: None,
                                            caplog: pytest.LogCaptureFixture) -> None:
    usage = fake_v1(tmp_path, 10 * MiB)
    g = make_governor(tmp_path)
    events: list[GovernorEvent] = []
    g.subscribe(events.append)
    snap = g.snapshot
    assert (snap.limit, snap.limit_source, snap.state) == (100 * MiB, LimitSource.CGROUP_V1, N)
    assert g.connection(0) is None
    with caplog.at_level(logging.INFO, logger="elemta.memory"):
        usage.write_text(str(80 * MiB))
        assert g.connection(0) is None  # warning: logged, not refused
        usage.write_text(str(95 * MiB))
        assert g.connection(0) is Refusal.MEMORY_CRITICAL
        assert g.command("MAIL", 0) is Refusal.MEMORY_CRITICAL
        assert g.command("RCPT", 0) is Refusal.MEMORY_CRITICAL
        assert g.data(1000) is None  # DATA streams on at critical
        usage.write_text(str(87 * MiB))  # inside the hysteresis band: still critical
        assert g.connection(0) is Refusal.MEMORY_CRITICAL
        usage.write_text(str(30 * MiB))
        assert g.connection(0) is None
        assert g.command("MAIL", 0) is None
    assert [e.name for e in events] == ["memory_warning", "memory_critical", "memory_recovered"]
    assert events[1].snapshot.ratio == pytest.approx(0.95)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Memory warning threshold exceeded") for m in messages)
    assert any(m.startswith("Memory critical threshold exceeded: cgroup 95.0% of 100.0 MiB "
                            "(binding); elemta 20.0 MiB = 20.0% of 100.0 MiB (cgroup-v1)")
               for m in messages)
    critical = next(r for r in caplog.records if r.getMessage().startswith("Memory critical"))
    fields = critical.__dict__["elemta_fields"]
    # elemta's own memory (the fake process: 20 MiB; the cgroup holds others) against the
    # limit, and the binding term (the cgroup's working set) against its ceiling
    assert fields == {"current_usage": 20 * MiB, "max_usage": 100 * MiB,
                      "utilization_percent": 20.0, "threshold": 0.9, "limit_source": "cgroup-v1",
                      "binding_term": "cgroup", "binding_usage": 95 * MiB,
                      "binding_ceiling": 100 * MiB, "binding_percent": 95.0}


def test_per_session_budget(tmp_path: Path, fresh: None) -> None:
    fake_v1(tmp_path, 10 * MiB)
    g = make_governor(tmp_path)
    assert g.data(MIN_SESSION) is None
    assert g.data(MIN_SESSION + 1) is Refusal.SESSION_MEMORY
    assert g.command("MAIL", MIN_SESSION + 1) is Refusal.SESSION_MEMORY


def test_protection_off_logs_but_never_refuses(tmp_path: Path, fresh: None,
                                               caplog: pytest.LogCaptureFixture) -> None:
    usage = fake_v1(tmp_path, 99 * MiB)
    g = make_governor(tmp_path, protection=False)
    with caplog.at_level(logging.INFO, logger="elemta.memory"):
        assert g.snapshot.state is C
        assert g.connection(0) is None
        assert g.command("MAIL", 0) is None
        assert g.data(10 * MiB) is None
        for _ in range(3):
            g.tick()
        assert g.snapshot.breaker is OPEN
        assert g.connection(0) is None
    usage.write_text(str(MiB))
    messages = [r.getMessage() for r in caplog.records]
    assert any("Would refuse CONNECT (breaker-open)" in m for m in messages)
    assert any("Circuit breaker opened" in m for m in messages)


def test_breaker_holds_after_memory_falls_then_half_opens(tmp_path: Path, fresh: None) -> None:
    usage = fake_v1(tmp_path, 95 * MiB)
    g = make_governor(tmp_path)
    events: list[str] = []
    g.subscribe(lambda e: events.append(e.name))
    for _ in range(3):
        g.tick()
    assert g.snapshot.breaker is OPEN
    usage.write_text(str(10 * MiB))
    assert g.connection(0) is Refusal.BREAKER_OPEN  # memory is fine, the breaker is not
    assert g.snapshot.state is N
    for _ in range(3):
        g.tick()
    assert g.snapshot.breaker is HALF
    admitted = [g.connection(0) for _ in range(gov.HALF_OPEN_ADMITS + 2)]
    assert admitted.count(None) == gov.HALF_OPEN_ADMITS
    for _ in range(3):
        g.tick()
    assert g.snapshot.breaker is CLOSED
    assert g.connection(0) is None
    assert "breaker_open" in events and "breaker_half_open" in events and "breaker_closed" in events


def test_gc_runs_at_threshold_rate_limited_and_counted(tmp_path: Path, fresh: None,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    usage = fake_v1(tmp_path, 50 * MiB)
    g = make_governor(tmp_path, monitoring_interval="1h")
    g.tick()
    assert g.gc_runs == 0
    usage.write_text(str(82 * MiB))
    rss = own_rss()
    with caplog.at_level(logging.INFO, logger="elemta.memory"):
        g.tick()
        g.tick()  # within the same interval: no second run
    assert g.gc_runs == 1
    snap = g.snapshot
    gc_lines = [r for r in caplog.records if r.getMessage().startswith("Forced garbage collection")]
    assert len(gc_lines) == 1
    fields = gc_lines[0].__dict__["elemta_fields"]
    # what GC can give back is this process's own heap: measured on the real process (the
    # fake tree's statm says 20 MiB), and the snapshot carries the logged figures
    assert abs(fields["rss_before"] - rss) < 0.2 * rss, (fields["rss_before"], rss)
    assert (snap.gc_runs, snap.last_gc_freed) == (1, fields["freed_bytes"])
    assert snap.last_gc_at is not None and abs(snap.last_gc_at - time.time()) < 60
    assert fields["threshold"] == 0.8 and fields["binding_term"] == "cgroup"


_CYCLIC_GARBAGE = """
import gc
from elemta.memory.reclaim import Reclaimer
gc.disable()
junk = []
for _ in range(250_000):
    node = [bytes(200)]
    node.append(node)
    junk.append(node)
del junk, node
done = Reclaimer().run()
print(done.rss_before, done.rss_after, done.freed)
"""


def test_forced_collection_gives_back_cyclic_garbage() -> None:
    # ~80 MiB in reference cycles, unreachable while automatic GC is off: only the forced
    # collection frees them, and malloc_trim/arena release hands the pages back to the OS.
    # A fresh interpreter: in this one, earlier tests' freed heap would absorb the garbage.
    out = subprocess.run([sys.executable, "-c", _CYCLIC_GARBAGE], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    before, after, freed = (int(x) for x in out.split())
    assert before - after > 40 * MiB, out
    assert freed == before - after


def test_task_cap(tmp_path: Path, fresh: None) -> None:
    fake_v1(tmp_path, 10 * MiB)
    cfg = config.build({"memory": {"max_goroutines": 10}})
    count = [10]
    g = Governor(cfg, Sampler(tmp_path), tasks=lambda: count[0])
    assert g.connection(0) is None
    count[0] = 11
    assert g.connection(0) is Refusal.TASK_CAP


def test_task_count_between_recounts_adds_admitted_connections(tmp_path: Path) -> None:
    # Counting walks every task, so admission counts at most every REFRESH_AFTER and adds
    # the connections it admitted since: a burst cannot slip past the cap between counts.
    fake_v1(tmp_path, 10 * MiB)
    cfg = config.build({"memory": {"max_goroutines": 10}})
    calls = [0]

    def tasks() -> int:
        calls[0] += 1
        return 7

    g = Governor(cfg, Sampler(tmp_path), tasks=tasks)
    answers = [g.connection(0)]
    counted = calls[0]
    answers += [g.connection(0) for _ in range(5)]
    cap = Refusal.TASK_CAP
    assert answers == [None, None, None, None, cap, cap]  # 7, 8, 9, 10, 11
    assert calls[0] == counted  # within REFRESH_AFTER: no recount


def test_limit_change_is_an_event(tmp_path: Path, fresh: None) -> None:
    fake_v1(tmp_path, 10 * MiB)
    g = make_governor(tmp_path)
    seen: list[GovernorEvent] = []
    g.subscribe(seen.append)
    assert g.snapshot.limit == 100 * MiB
    write(tmp_path / "sys/fs/cgroup/memory/svc/memory.limit_in_bytes", str(200 * MiB))
    write(tmp_path / "sys/fs/cgroup/memory/svc/memory.stat",
          f"hierarchical_memory_limit {200 * MiB}\ntotal_cache 0\n")
    g.tick()
    assert [e.name for e in seen] == ["cgroup_limit_changed"]
    assert seen[0].previous is not None and seen[0].previous.limit == 100 * MiB
    assert seen[0].snapshot.limit == 200 * MiB


def test_snapshot_fills_every_field(tmp_path: Path) -> None:
    fake_v1(tmp_path, 10 * MiB)
    g = make_governor(tmp_path)
    snap = g.tick()
    assert snap.cgroup is not None and snap.cgroup.limit == 100 * MiB
    assert snap.pressure is not None and snap.pressure.some_avg10 == 1.5
    assert snap.tasks == 5 and snap.max_tasks == 2000 and snap.max_sessions == 1000
    assert snap.host_total == 16 * GiB and snap.process_rss == 20 * MiB
    assert snap.process_pss == 20 * MiB  # no smaps_rollup in the fake /proc: RSS
    assert snap.utilization_percent == 20.0  # 20 MiB of the 100 MiB limit
    assert (snap.binding.term, snap.binding.percent) == (CGROUP, 10.0)


def test_subscriber_errors_do_not_break_the_governor(tmp_path: Path, fresh: None) -> None:
    usage = fake_v1(tmp_path, 10 * MiB)
    g = make_governor(tmp_path)

    def broken(event: GovernorEvent) -> None:
        raise RuntimeError("boom")

    g.subscribe(broken)
    usage.write_text(str(99 * MiB))
    assert g.connection(0) is Refusal.MEMORY_CRITICAL


def test_monitor_task_runs_and_stops(tmp_path: Path) -> None:
    usage = fake_v1(tmp_path, 10 * MiB)
    g = make_governor(tmp_path, monitoring_interval="50ms")

    async def run() -> int:
        g.start()
        usage.write_text(str(99 * MiB))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if g.snapshot.breaker is OPEN:
                break
        await g.stop()
        return g.gc_runs

    assert asyncio.run(run()) >= 1
    assert g.snapshot.breaker is OPEN


def test_reconfigure_applies_new_limit_at_once(tmp_path: Path, fresh: None) -> None:
    fake_v1(tmp_path, 10 * MiB)  # cgroup limit 100 MiB
    g = make_governor(tmp_path)
    seen: list[str] = []
    g.subscribe(lambda e: seen.append(e.name))
    assert g.snapshot.limit_source is LimitSource.CGROUP_V1
    # RSS is 20 MiB: a 21 MiB budget puts the process term above critical
    snap = g.reconfigure(config.build({"memory": {"max_memory_usage": 21 * MiB,
                                                  "per_connection_memory_limit": MiB}}))
    assert (snap.limit, snap.limit_source, snap.state) == (21 * MiB, LimitSource.CONFIG, C)
    assert seen == ["memory_warning", "memory_critical", "cgroup_limit_changed"]
    assert g.connection(0) is Refusal.MEMORY_CRITICAL


def test_effective_names_the_binding_term_beside_elemtas_own_usage() -> None:
    # the configured budget is the lowest limit, but the host is nearly full: the host term
    # binds, while usage / limit stays elemta's own memory against that budget
    eff = effective(sample(100 * MiB, total=16 * GiB, available=1 * GiB), 2 * GiB)
    assert (eff.usage, eff.limit, eff.source) == (100 * MiB, 2 * GiB, LimitSource.CONFIG)
    assert eff.utilization == 100 / 2048
    b = eff.binding
    assert (b.term, b.usage, b.ceiling) == (HOST, 15 * GiB, 16 * GiB)
    assert [t.term for t in eff.terms] == [PROCESS, HOST]


def test_delivery_concurrency_follows_memory_and_is_logged(tmp_path: Path, fresh: None,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    usage = fake_v1(tmp_path, 10 * MiB)
    g = make_governor(tmp_path)
    assert g.delivery_concurrency() == 20  # [delivery] concurrency
    with caplog.at_level(logging.INFO, logger="elemta.memory"):
        usage.write_text(str(80 * MiB))
        g.connection(0)  # a fresh sample
        assert g.delivery_concurrency() == 10
        usage.write_text(str(95 * MiB))
        g.connection(0)
        assert g.delivery_concurrency() == 0
        assert g.delivery_concurrency() == 0  # unchanged: not logged again
        usage.write_text(str(30 * MiB))
        g.connection(0)
        assert g.delivery_concurrency() == 20
    lines = [r.getMessage() for r in caplog.records if "delivery concurrency" in r.getMessage()]
    assert lines == ["delivery concurrency 20 -> 10 (memory warning, breaker closed)",
                     "delivery concurrency 10 -> 0 (memory critical, breaker closed)",
                     "delivery concurrency 0 -> 20 (memory normal, breaker closed)"]


def test_data_entry_reserves_buffers_for_every_session_in_data() -> None:
    term = TermFigures(Term.CGROUP, 30 * MiB, 160 * MiB)  # critical at 144 MiB
    buffers = MiB  # round figures: 114 MiB of room for reservations
    ok = MemoryState.NORMAL, BreakerState.CLOSED
    assert data_entry_refusal(*ok, (term,), 0.9, 0, buffers) is None
    assert data_entry_refusal(*ok, (term,), 0.9, 113, buffers) is None  # the 114th fits
    assert data_entry_refusal(*ok, (term,), 0.9, 114, buffers) is Refusal.DATA_BUFFERS
    # Any term that would pass its critical threshold refuses, not only the binding one.
    roomy = TermFigures(Term.PROCESS, 30 * MiB, 2048 * MiB)
    assert data_entry_refusal(*ok, (roomy, term), 0.9, 114, buffers) is Refusal.DATA_BUFFERS
    assert data_entry_refusal(MemoryState.CRITICAL, BreakerState.CLOSED, (roomy,), 0.9, 0,
                              buffers) is Refusal.MEMORY_CRITICAL
    assert data_entry_refusal(MemoryState.NORMAL, BreakerState.OPEN, (roomy,), 0.9, 0,
                              buffers) is Refusal.BREAKER_OPEN
