"""The memory governor: the one place that turns memory figures into decisions.

Pure decisions first (which limit binds, state with hysteresis, circuit breaker, why to refuse),
then the Governor object that applies them: it answers admission questions with a refusal
reason or None (it knows no protocol: smtp/ words the reasons), runs the periodic monitor (GC,
breaker, leak detection), wakes at once on kernel memory pressure (memory/pressure.py),
publishes a Snapshot and tells subscribers of every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SESSION_BUFFERS, Config
from ..events import emit
from ..units import format_size
from .leaks import LeakDetector, describe_tasks
from .pressure import PressureTrigger, systemd_watch
from .reclaim import Reclaimer
from .refusal import Refusal
from .sampler import Sample, Sampler
from .snapshot import (
    BreakerState,
    LimitSource,
    MemoryState,
    Snapshot,
    Term,
    TermFigures,
    UsageSource,
    binding_of,
)

log = logging.getLogger("elemta.memory")

MiB = 1024 * 1024

# Leave a state only when utilization is this far below its threshold: a value hovering at
# exactly 90% must not flip between critical and warning on every sample.
HYSTERESIS = 0.05
# Admission questions re-sample when the last sample is older than this. A sample costs a few
# preads (microseconds; PSS is re-read only by the monitor, see sampler.py), so this bounds
# reaction time, not cost.
REFRESH_AFTER = 0.05
# Circuit breaker: open after this many consecutive critical monitor samples; from open, go
# half-open after this many calm ones (below critical - HYSTERESIS), then close after as many more.
BREAKER_OPEN_AFTER = 3
BREAKER_CALM_FOR = 3
HALF_OPEN_ADMITS = 5  # new connections let through per monitor sample while half-open
MIN_TICK_SPACING = 0.1  # pressure wake-ups do not re-run the monitor more often than this
REFUSAL_LOG_EVERY = 1.0  # at most one session_rejected line per reason, command and second


# -- pure decisions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Effective:
    """What one sample means.

    The published triple is elemta's own memory against the effective limit, so that
    usage / limit == utilization on every surface. The state is decided on the terms: each
    figure against its own ceiling, the highest ratio binds (`binding`), so a full host or a
    full shared cgroup raises the state even while elemta itself is small.
    """

    usage: int  # elemta's own memory
    usage_source: UsageSource
    limit: int  # min(max_memory_usage, cgroup limit, host RAM)
    source: LimitSource  # which of them is that minimum
    terms: tuple[TermFigures, ...]

    @property
    def utilization(self) -> float:
        return self.usage / self.limit

    @property
    def binding(self) -> TermFigures:
        return binding_of(self.terms)


def effective(sample: Sample, max_memory_usage: int) -> Effective:
    """The effective picture of one sample.

    elemta's own memory: the cgroup's working set when the cgroup holds only elemta's
    processes, else the PSS of its processes. Terms: that usage against max_memory_usage
    (`process`); the cgroup's working set against its limit when one exists below RAM
    (`cgroup`); otherwise (no limit, or a limit above RAM, which contains nothing) the host's
    used memory against MemTotal (`host`), because then the host is the container.
    """
    cg = sample.cgroup
    host_total = max(sample.host_total, 1)
    if cg is not None and sample.cgroup_own:
        own, own_source = cg.working_set, UsageSource.CGROUP
    else:
        own, own_source = sample.process_pss, UsageSource.PSS
    terms = [TermFigures(Term.PROCESS, own, max_memory_usage)]
    limits: list[tuple[int, LimitSource]] = []
    contained = cg is not None and cg.limit is not None and cg.limit < host_total
    if cg is not None and cg.limit is not None:
        source = LimitSource.CGROUP_V2 if cg.version == 2 else LimitSource.CGROUP_V1
        limits.append((cg.limit, source))
        if contained:
            terms.append(TermFigures(Term.CGROUP, cg.working_set, cg.limit))
    limits.append((max_memory_usage, LimitSource.CONFIG))
    limits.append((host_total, LimitSource.HOST))
    if not contained:
        used = max(0, host_total - sample.host_available)
        terms.append(TermFigures(Term.HOST, used, host_total))
    limit, source = min(limits, key=lambda x: x[0])  # first wins a tie: cgroup, config, host
    return Effective(usage=own, usage_source=own_source, limit=limit, source=source,
                     terms=tuple(terms))


def next_state(state: MemoryState, utilization: float, warning: float, critical: float,
               margin: float = HYSTERESIS) -> MemoryState:
    """Threshold states with hysteresis: rise at a threshold, fall only `margin` below it."""
    if utilization >= critical:
        return MemoryState.CRITICAL
    if state is MemoryState.CRITICAL and utilization >= critical - margin:
        return MemoryState.CRITICAL
    if utilization >= warning:
        return MemoryState.WARNING
    if state is not MemoryState.NORMAL and utilization >= warning - margin:
        return MemoryState.WARNING
    return MemoryState.NORMAL


_RANK = {MemoryState.NORMAL: 0, MemoryState.WARNING: 1, MemoryState.CRITICAL: 2}


def transition_events(old: MemoryState, new: MemoryState) -> list[str]:
    """Events a state change logs. Jumping from normal to critical crosses warning too."""
    if old is new:
        return []
    if _RANK[new] > _RANK[old]:
        names = ["memory_warning", "memory_critical"]
        return names[_RANK[old]:_RANK[new]]
    return ["memory_recovered"] if new is MemoryState.NORMAL else ["memory_warning"]


@dataclass(frozen=True)
class Breaker:
    state: BreakerState = BreakerState.CLOSED
    critical_streak: int = 0  # consecutive monitor samples at or above critical
    calm_streak: int = 0  # consecutive monitor samples below critical - margin


def breaker_step(b: Breaker, utilization: float, critical: float, margin: float = HYSTERESIS,
                 open_after: int = BREAKER_OPEN_AFTER, calm_for: int = BREAKER_CALM_FOR) -> Breaker:
    """One monitor sample through the circuit breaker (closed -> open -> half-open -> closed)."""
    hot = utilization >= critical
    calm = utilization < critical - margin
    streak = b.critical_streak + 1 if hot else 0
    if b.state is BreakerState.CLOSED:
        return Breaker(BreakerState.OPEN if streak >= open_after else BreakerState.CLOSED, streak, 0)
    if hot:
        return Breaker(BreakerState.OPEN, streak, 0)
    calm_streak = b.calm_streak + 1 if calm else 0
    if calm_streak >= calm_for:
        after = BreakerState.HALF_OPEN if b.state is BreakerState.OPEN else BreakerState.CLOSED
        return Breaker(after, 0, 0)
    return Breaker(b.state, 0, calm_streak)


def _memory_refusal(state: MemoryState, breaker: BreakerState) -> Refusal | None:
    """The refusal every admission question shares: breaker open, or memory critical."""
    if breaker is BreakerState.OPEN:
        return Refusal.BREAKER_OPEN
    if state is MemoryState.CRITICAL:
        return Refusal.MEMORY_CRITICAL
    return None


def connection_refusal(state: MemoryState, breaker: BreakerState, tasks: int, max_tasks: int,
                       half_open_left: int) -> Refusal | None:
    """Why a new connection is refused, or None to admit it."""
    if reason := _memory_refusal(state, breaker):
        return reason
    if tasks > max_tasks:
        return Refusal.TASK_CAP
    if breaker is BreakerState.HALF_OPEN and half_open_left <= 0:
        return Refusal.BREAKER_HALF_OPEN
    return None


def command_refusal(state: MemoryState, breaker: BreakerState, session_bytes: int,
                    per_session_limit: int) -> Refusal | None:
    """Why a command (MAIL, RCPT) is refused, or None."""
    if reason := _memory_refusal(state, breaker):
        return reason
    if session_bytes > per_session_limit:
        return Refusal.SESSION_MEMORY
    return None


def data_entry_refusal(state: MemoryState, breaker: BreakerState, terms: tuple[TermFigures, ...],
                       critical: float, in_data: int, buffers: int) -> Refusal | None:
    """Why the DATA command is refused (before 354), or None.

    Admission at connect, MAIL and RCPT cannot stop what sessions already past them do: each one
    entering DATA fills its buffers (`buffers`, about 330 KiB) within milliseconds of its 354,
    far faster than any sample sees, so hundreds of sessions reaching DATA together could pass
    the limit between two samples (measured: 700 one-MiB sessions OOM-killed a daemon in a
    160 MiB cgroup within a second, no 452 sent). So every session in DATA, this one included, is assumed
    still to fill its whole buffers on top of the usage sampled: counted twice once filled,
    which only halves how many may stream at once under a small limit (about 2,700 sessions
    under the 2 GiB default).
    """
    if reason := _memory_refusal(state, breaker):
        return reason
    reserved = (in_data + 1) * buffers
    if any(t.usage + reserved > critical * t.ceiling for t in terms):
        return Refusal.DATA_BUFFERS
    return None


def data_refusal(session_bytes: int, per_session_limit: int) -> Refusal | None:
    """Why a DATA chunk is refused, or None. Streaming costs no memory and DATA streams on at
    critical: only what the session itself holds can exceed its budget."""
    return Refusal.SESSION_MEMORY if session_bytes > per_session_limit else None


# -- the governor -----------------------------------------------------------------------------

def delivery_concurrency(state: MemoryState, breaker: BreakerState, configured: int) -> int:
    """How many deliveries may run now: all at normal, half at warning, none (paused) at
    critical or while the breaker is open. Running deliveries finish; only new ones wait."""
    if breaker is BreakerState.OPEN or state is MemoryState.CRITICAL:
        return 0
    if state is MemoryState.WARNING:
        return max(1, configured // 2)
    return configured


@dataclass(frozen=True)
class GovernorEvent:
    """What subscribers receive: the event name (as in events.py) and the snapshots around it."""

    name: str
    snapshot: Snapshot
    previous: Snapshot | None


Subscriber = Callable[[GovernorEvent], None]


def count_tasks() -> int:
    """asyncio tasks of the running loop plus threads; with the SMTP sessions (the daemon
    adds them), what max_goroutines caps.

    Threads named elemta-admin* serve the admin HTTP endpoint, which bounds them itself
    (observe/http.py): a client of that endpoint must not spend the SMTP budget.
    """
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = 0
    threads = sum(1 for t in threading.enumerate() if not t.name.startswith("elemta-admin"))
    return tasks + threads


def format_mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def describe(snap: Snapshot) -> str:
    """The binding term, then elemta's own figures, e.g. "host 95.0% of 23.5 GiB (binding);
    elemta 33.0 MiB = 1.61% of 2.0 GiB (config)"."""
    b = snap.binding
    return (f"{b.term.value} {b.percent}% of {format_size(b.ceiling)} (binding); elemta "
            f"{format_size(snap.usage)} = {snap.utilization_percent}% of "
            f"{format_size(snap.limit)} ({snap.limit_source.value})")


class Governor:
    """Owns the memory state; answers the SMTP layer's admission questions (smtp.server.Admission)."""

    def __init__(self, config: Config, sampler: Sampler | None = None, *,
                 sessions: Callable[[], int] = lambda: 0,
                 session_bytes: Callable[[], int] = lambda: 0,
                 tasks: Callable[[], int] = count_tasks):
        self.config = config
        self.memory = config.memory
        self.sampler = sampler if sampler is not None else Sampler()
        self._sessions = sessions
        self._session_bytes = session_bytes
        self._tasks = tasks
        # Counting tasks walks them all (O(sessions)); admission re-counts at most every
        # REFRESH_AFTER and adds the connections it admitted since, which over-counts slightly.
        self._tasks_counted = 0
        self._tasks_counted_at = float("-inf")
        self._admitted_since_count = 0
        self._subscribers: list[Subscriber] = []
        self._state = MemoryState.NORMAL
        self._breaker = Breaker()
        self._half_open_left = 0
        self.gc_runs = 0
        self._last_gc_at: float | None = None  # wall time
        self._last_gc_mono = float("-inf")
        self._last_gc_freed = 0
        self._last_tick = float("-inf")
        self._snapshot: Snapshot | None = None
        self._leaks = LeakDetector() if self.memory.goroutine_leak_detection else None
        self._reclaimer = Reclaimer()
        # (reason, command) -> (last logged, refusals not logged since)
        self._refusals: dict[tuple[Refusal, str], tuple[float, int]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._psi: PressureTrigger | None = None
        self._last_concurrency: int | None = None
        self._pressure_woken = 0  # systemd wake-ups not yet handled by the monitor
        self._pressure_unlogged = 0
        self._pressure_logged_at = float("-inf")

    @property
    def psi_wakeups(self) -> int:
        return self._psi.wakeups if self._psi is not None else 0

    # -- what reporting surfaces read -------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            self._observe(self.sampler.sample(), monitor=False)
        assert self._snapshot is not None
        return self._snapshot

    def delivery_concurrency(self) -> int:
        """The governor's decision on delivery concurrency now; logged when it changes."""
        snap = self.snapshot
        n = delivery_concurrency(snap.state, snap.breaker, self.config.delivery.concurrency)
        last = self._last_concurrency
        if n != last:
            self._last_concurrency = n
            if last is not None:
                log.warning("delivery concurrency %d -> %d (memory %s, breaker %s)", last, n,
                            snap.state.value, snap.breaker.value)
        return n

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback` on every state change; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Snapshot:
        """First sample (logged), PSI trigger, monitor task. Call in the running loop."""
        snap = self.snapshot
        cg = snap.cgroup
        where = f"cgroup v{cg.version} {cg.path}" if cg is not None else "no cgroup figures"
        log.info(
            "memory limit %s (%s), usage %s (%s; %s), state %s; %s; protection %s",
            format_mib(snap.limit), snap.limit_source.value, format_mib(snap.usage),
            snap.usage_source.value, describe(snap), snap.state.value, where,
            "on" if snap.protection else "off (log only)",
        )
        if self.sampler.root == Path("/"):
            self._psi = self._arm_pressure()
        self._task = asyncio.get_running_loop().create_task(self._monitor(), name="memory-monitor")
        return snap

    def _arm_pressure(self) -> PressureTrigger | None:
        """systemd's watch when it passed one ($MEMORY_PRESSURE_WATCH, systemd >= 254), else
        (or when that cannot be watched) our own trigger on the cgroup's memory.pressure."""
        try:
            watch = systemd_watch(os.environ)
        except ValueError as exc:
            log.warning("%s; arming elemta's own trigger instead", exc)
            watch = None
        if watch is not None:
            trigger = PressureTrigger.arm_systemd(watch, self._systemd_pressure)
            if trigger is not None or watch.path is None:  # /dev/null: systemd said don't
                return trigger
        path = self.sampler.pressure_path
        return PressureTrigger.arm(path, self._wake.set) if path is not None else None

    def _systemd_pressure(self) -> None:
        self._pressure_woken += 1
        self._wake.set()

    def _log_pressure_wakeup(self, snap: Snapshot) -> None:
        """One memory_pressure_wakeup line per monitoring_interval at most: the kernel may
        signal every PSI window (1-2 s) while the pressure lasts."""
        woken, self._pressure_woken = self._pressure_woken, 0
        self._pressure_unlogged += woken
        now = time.monotonic()
        if now - self._pressure_logged_at < self.memory.monitoring_interval:
            return
        emit(log, "memory_pressure_wakeup",
             f"Woken by systemd's memory pressure watch ({self._pressure_unlogged} since the "
             f"last line): {describe(snap)}, state {snap.state.value}",
             wakeups=self._pressure_unlogged, **self._mem_fields(snap, self.memory.gc_threshold))
        self._pressure_logged_at, self._pressure_unlogged = now, 0

    async def stop(self) -> None:
        if self._psi is not None:
            self._psi.close()
        if self._task is not None:
            # A flag, not cancel(): asyncio.wait_for in 3.11 can swallow a cancellation that
            # races with the wake-up event, which would leave stop() waiting forever.
            self._stopped = True
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def close(self) -> None:
        self.sampler.close()

    def reconfigure(self, config: Config) -> Snapshot:
        """Apply a reloaded configuration (SIGHUP): new limits and thresholds take effect at
        once; the state, breaker and GC counters carry over. A new monitoring_interval applies
        from the monitor's next wait."""
        self.config = config
        self.memory = config.memory
        if not self.memory.goroutine_leak_detection:
            self._leaks = None
        elif self._leaks is None:
            self._leaks = LeakDetector()
        self._observe(self.sampler.sample(), monitor=False)
        return self.snapshot

    # -- Admission ----------------------------------------------------------------------------
    def connection(self, sessions: int) -> Refusal | None:
        snap = self._current()
        reason = connection_refusal(snap.state, snap.breaker, self._recent_tasks(),
                                    self.memory.max_goroutines, self._half_open_left)
        if reason is None:
            self._admitted_since_count += 1
            if snap.breaker is BreakerState.HALF_OPEN:
                self._half_open_left -= 1
        return self._refuse(reason, "CONNECT")

    def _recent_tasks(self) -> int:
        now = time.monotonic()
        if now - self._tasks_counted_at > REFRESH_AFTER:
            self._tasks_counted, self._tasks_counted_at = self._tasks(), now
            self._admitted_since_count = 0
        return self._tasks_counted + self._admitted_since_count

    def command(self, verb: str, session_bytes: int) -> Refusal | None:
        snap = self._current()
        reason = command_refusal(snap.state, snap.breaker, session_bytes,
                                 self.memory.per_connection_memory_limit)
        return self._refuse(reason, verb)

    def enter_data(self, in_data: int) -> Refusal | None:
        snap = self._current()
        reason = data_entry_refusal(snap.state, snap.breaker, snap.terms,
                                    self.memory.memory_critical_threshold, in_data,
                                    SESSION_BUFFERS)
        return self._refuse(reason, "DATA")

    def data(self, session_bytes: int) -> Refusal | None:
        # Called per DATA chunk: a comparison only, no sampling.
        return self._refuse(data_refusal(session_bytes, self.memory.per_connection_memory_limit),
                            "DATA")

    def _refuse(self, reason: Refusal | None, command: str) -> Refusal | None:
        if reason is None:
            return None
        now = time.monotonic()
        key = (reason, command)
        last, suppressed = self._refusals.get(key, (float("-inf"), 0))
        if now - last >= REFUSAL_LOG_EVERY:
            more = f" ({suppressed} more since the last line)" if suppressed else ""
            if self.memory.memory_exhaustion_protection:
                msg = f"Refused {command}: {reason.value}{more}"
            else:
                msg = (f"Would refuse {command} ({reason.value}) but "
                       f"memory_exhaustion_protection = false{more}")
            emit(log, "session_rejected", msg, reason=reason.value, command=command)
            self._refusals[key] = (now, 0)
        else:
            self._refusals[key] = (last, suppressed + 1)
        return reason if self.memory.memory_exhaustion_protection else None

    # -- sampling and state -------------------------------------------------------------------
    def _current(self) -> Snapshot:
        """The snapshot an admission answer rests on: re-sampled when older than REFRESH_AFTER.

        With protection off nothing is refused, so the monitor's samples are enough for the
        log-only answers and admission costs nothing extra.
        """
        snap = self.snapshot
        if self.memory.memory_exhaustion_protection and time.monotonic() - snap.taken_at > REFRESH_AFTER:
            self._observe(self.sampler.sample(), monitor=False)
            snap = self.snapshot
        return snap

    def _observe(self, sample: Sample, monitor: bool) -> None:
        """Weigh one sample: state (every sample), breaker (monitor samples), events."""
        m = self.memory
        eff = effective(sample, m.max_memory_usage)
        previous = self._snapshot
        old_state, old_breaker = self._state, self._breaker.state
        ratio = eff.binding.ratio
        self._state = next_state(old_state, ratio, m.memory_warning_threshold,
                                 m.memory_critical_threshold)
        if monitor:
            self._breaker = breaker_step(self._breaker, ratio, m.memory_critical_threshold)
            if self._breaker.state is BreakerState.HALF_OPEN:
                self._half_open_left = HALF_OPEN_ADMITS
        # Counting tasks and summing session buffers walks every session: done by the monitor;
        # the samples admission questions take in between carry the last counts over.
        if monitor or previous is None:
            tasks, session_bytes = self._tasks(), self._session_bytes()
        else:
            tasks, session_bytes = previous.tasks, previous.session_bytes
        snap = Snapshot(
            taken_at=sample.taken_at,
            wall_time=sample.wall_time,
            process_rss=sample.process_rss,
            process_pss=sample.process_pss,
            usage=eff.usage,
            usage_source=eff.usage_source,
            limit=eff.limit,
            limit_source=eff.source,
            utilization=eff.utilization,
            terms=eff.terms,
            state=self._state,
            breaker=self._breaker.state,
            protection=m.memory_exhaustion_protection,
            warning_threshold=m.memory_warning_threshold,
            gc_threshold=m.gc_threshold,
            critical_threshold=m.memory_critical_threshold,
            sessions=self._sessions(),
            max_sessions=self.config.server.max_connections,
            session_bytes=session_bytes,
            tasks=tasks,
            max_tasks=m.max_goroutines,
            gc_runs=self.gc_runs,
            last_gc_at=self._last_gc_at,
            last_gc_freed=self._last_gc_freed,
            host_total=sample.host_total,
            host_available=sample.host_available,
            cgroup=sample.cgroup,
            pressure=sample.pressure,
        )
        self._snapshot = snap
        changes = transition_events(old_state, self._state)
        for name in changes:
            self._log_state(name, snap, old_state)
        if old_breaker is not self._breaker.state:
            changes.append(self._log_breaker(old_breaker, snap))
        if previous is not None and (previous.limit, previous.limit_source) != (snap.limit,
                                                                                snap.limit_source):
            emit(log, "cgroup_limit_changed",
                 f"Effective memory limit changed: {format_mib(previous.limit)} -> "
                 f"{format_mib(snap.limit)} ({snap.limit_source.value})",
                 old_limit=previous.limit, new_limit=snap.limit, limit_source=snap.limit_source.value)
            changes.append("cgroup_limit_changed")
        for name in changes:
            self._publish(name, snap, previous)
        if (not monitor and _RANK[self._state] > _RANK[old_state]) or (
            ratio >= m.gc_threshold and self._gc_due(snap.taken_at)
        ):
            self._wake.set()  # the monitor runs GC and the breaker now, not at its next tick

    @staticmethod
    def _mem_fields(snap: Snapshot, threshold: float) -> dict[str, Any]:
        # current_usage / max_usage is the utilization, as in the memory guide's example; the
        # threshold applies to the binding term's ratio, named beside it.
        b = snap.binding
        return {
            "current_usage": snap.usage,
            "max_usage": snap.limit,
            "utilization_percent": snap.utilization_percent,
            "limit_source": snap.limit_source.value,
            "threshold": threshold,
            "binding_term": b.term.value,
            "binding_usage": b.usage,
            "binding_ceiling": b.ceiling,
            "binding_percent": b.percent,
        }

    def _log_state(self, name: str, snap: Snapshot, old: MemoryState) -> None:
        m = self.memory
        if name == "memory_critical":
            suffix = ("new connections and MAIL/RCPT get 452 4.3.1" if m.memory_exhaustion_protection
                      else "memory_exhaustion_protection = false: not refusing")
            emit(log, name, f"Memory critical threshold exceeded: {describe(snap)}; {suffix}",
                 **self._mem_fields(snap, m.memory_critical_threshold))
        elif name == "memory_warning":
            text = ("Memory back below the critical threshold (still above warning)"
                    if old is MemoryState.CRITICAL else "Memory warning threshold exceeded")
            emit(log, name, f"{text}: {describe(snap)}",
                 **self._mem_fields(snap, m.memory_warning_threshold))
        else:
            emit(log, name, f"Memory back to normal: {describe(snap)}",
                 **self._mem_fields(snap, m.memory_warning_threshold))

    def _log_breaker(self, old: BreakerState, snap: Snapshot) -> str:
        new = snap.breaker
        fields = self._mem_fields(snap, self.memory.memory_critical_threshold)
        if new is BreakerState.OPEN:
            emit(log, "breaker_open", samples=self._breaker.critical_streak, **fields)
            return "breaker_open"
        if new is BreakerState.CLOSED:
            emit(log, "breaker_closed", **fields)
            return "breaker_closed"
        log.warning("circuit breaker half-open: letting up to %d new connections through per "
                    "sample", HALF_OPEN_ADMITS)
        return "breaker_half_open"

    def _publish(self, name: str, snap: Snapshot, previous: Snapshot | None) -> None:
        event = GovernorEvent(name, snap, previous)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("governor subscriber %r failed on %s", callback, name)

    # -- the monitor ----------------------------------------------------------------------------
    def tick(self) -> Snapshot:
        """One monitor sample: state and breaker, GC when due, leak detection."""
        self._last_tick = time.monotonic()
        self.sampler.rescan()
        self._observe(self.sampler.sample(), monitor=True)
        snap = self.snapshot
        if snap.ratio >= self.memory.gc_threshold and self._gc_due(snap.taken_at):
            self.collect()
            snap = self.snapshot
        if self._leaks is not None and self._leaks.observe(snap.tasks, snap.sessions):
            top = describe_tasks()
            emit(log, "leak_suspected",
                 f"Task leak suspected: {snap.tasks} tasks+threads, {snap.sessions} sessions; "
                 f"most common: {top}",
                 tasks=snap.tasks, threads=threading.active_count(), sessions=snap.sessions,
                 top_coroutines=top)
            self._publish("leak_suspected", snap, snap)
        return snap

    def _gc_due(self, now: float) -> bool:
        return now - self._last_gc_mono >= self.memory.monitoring_interval

    def collect(self) -> int:
        """gc.collect() then malloc_trim(0); logs and returns the RSS it gave back."""
        self._last_gc_mono = time.monotonic()
        done = self._reclaimer.run()
        before, after, freed = done.rss_before, done.rss_after, done.freed
        self.gc_runs += 1
        self._last_gc_at = time.time()
        self._last_gc_freed = freed
        self._observe(self.sampler.sample(), monitor=False)
        snap = self.snapshot
        emit(log, "memory_gc",
             f"Forced garbage collection: freed {format_mib(freed)} (RSS {format_mib(before)} -> "
             f"{format_mib(after)}); now {describe(snap)}",
             freed_bytes=freed, rss_before=before, rss_after=after,
             **self._mem_fields(snap, self.memory.gc_threshold))
        self._publish("memory_gc", snap, snap)
        return freed

    async def _monitor(self) -> None:
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.memory.monitoring_interval)
            self._wake.clear()
            wait = MIN_TICK_SPACING - (time.monotonic() - self._last_tick)
            if wait > 0:
                await asyncio.sleep(wait)
            if self._stopped:
                break
            try:
                snap = self.tick()
                if self._pressure_woken:
                    self._log_pressure_wakeup(snap)
            except Exception:  # the monitor must outlive any one bad sample
                log.exception("memory monitor sample failed")
