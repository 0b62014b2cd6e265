"""The memory governor: the one place that turns memory figures into decisions.

Pure decisions first (which limit binds, state with hysteresis, circuit breaker, what to refuse),
then the Governor object that applies them: it answers the SMTP layer's admission questions
(smtp.server.Admission), runs the periodic monitor (GC, breaker, leak detection), wakes at once on
kernel memory pressure (PSI trigger), publishes a Snapshot and tells subscribers of every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..events import emit
from ..smtp.server import REPLY_STORAGE, REPLY_TOO_BIG
from .leaks import LeakDetector, describe_tasks
from .sampler import Sample, Sampler
from .snapshot import BreakerState, LimitSource, MemoryState, Snapshot

log = logging.getLogger("elemta.memory")

MiB = 1024 * 1024

# Leave a state only when utilization is this far below its threshold: a value hovering at
# exactly 90% must not flip between critical and warning on every sample.
HYSTERESIS = 0.05
# Admission questions re-sample when the last sample is older than this. A sample costs a few
# preads (microseconds), so this bounds reaction time, not cost.
REFRESH_AFTER = 0.05
# Circuit breaker: open after this many consecutive critical monitor samples; from open, go
# half-open after this many calm ones (below critical - HYSTERESIS), then close after as many more.
BREAKER_OPEN_AFTER = 3
BREAKER_CALM_FOR = 3
HALF_OPEN_ADMITS = 5  # new connections let through per monitor sample while half-open
# PSI triggers, tried in order: wake when tasks stalled on memory for 10% of a 1 s window;
# without CAP_SYS_RESOURCE the kernel accepts only windows that are multiples of 2 s.
PSI_TRIGGERS = (b"some 100000 1000000\0", b"some 200000 2000000\0")
MIN_TICK_SPACING = 0.1  # pressure wake-ups do not re-run the monitor more often than this
REFUSAL_LOG_EVERY = 1.0  # at most one session_rejected line per reason, command and second


# -- pure decisions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Effective:
    usage: int  # bytes of the term that dominates utilization
    limit: int  # min(max_memory_usage, cgroup limit, host RAM)
    source: LimitSource  # which of them is that minimum
    utilization: float  # max of the terms: usage / bound
    bound: int  # the dominating term's ceiling (usually == limit; differs e.g. when the
    bound_source: LimitSource  # host is full while the configured budget is the lowest)


def effective(sample: Sample, max_memory_usage: int) -> Effective:
    """The effective picture of one sample.

    Terms: process RSS against max_memory_usage; the cgroup working set against the cgroup
    limit when one exists; otherwise (or when the cgroup limit is above RAM, which contains
    nothing) the host's used memory against MemTotal, because then the host is the container.
    """
    cg = sample.cgroup
    host_total = max(sample.host_total, 1)
    limits: list[tuple[int, LimitSource]] = []
    terms: list[tuple[float, int, int, LimitSource]] = [
        (sample.process_rss / max_memory_usage, sample.process_rss, max_memory_usage,
         LimitSource.CONFIG)
    ]
    cgroup_binds = cg is not None and cg.limit is not None and cg.limit < host_total
    if cg is not None and cg.limit is not None:
        source = LimitSource.CGROUP_V2 if cg.version == 2 else LimitSource.CGROUP_V1
        limits.append((cg.limit, source))
        if cgroup_binds:
            terms.append((cg.working_set / cg.limit, cg.working_set, cg.limit, source))
    limits.append((max_memory_usage, LimitSource.CONFIG))
    limits.append((host_total, LimitSource.HOST))
    if not cgroup_binds:
        used = max(0, host_total - sample.host_available)
        terms.append((used / host_total, used, host_total, LimitSource.HOST))
    limit, source = min(limits, key=lambda x: x[0])  # first wins a tie: cgroup, config, host
    utilization, usage, bound, bound_source = max(terms, key=lambda t: t[0])
    return Effective(usage=usage, limit=limit, source=source, utilization=utilization,
                     bound=bound, bound_source=bound_source)


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


def _memory_refusal(state: MemoryState, breaker: BreakerState) -> str | None:
    """The refusal every admission question shares: breaker open, or memory critical."""
    if breaker is BreakerState.OPEN:
        return "breaker-open"
    if state is MemoryState.CRITICAL:
        return "memory-critical"
    return None


def connection_refusal(state: MemoryState, breaker: BreakerState, tasks: int, max_tasks: int,
                       half_open_left: int) -> str | None:
    """Why a new connection is refused (a short reason), or None to admit it."""
    if reason := _memory_refusal(state, breaker):
        return reason
    if tasks > max_tasks:
        return "task-cap"
    if breaker is BreakerState.HALF_OPEN and half_open_left <= 0:
        return "breaker-half-open"
    return None


def command_refusal(state: MemoryState, breaker: BreakerState, session_bytes: int,
                    per_session_limit: int) -> str | None:
    """Why MAIL/RCPT is refused, or None."""
    if reason := _memory_refusal(state, breaker):
        return reason
    if session_bytes > per_session_limit:
        return "session-memory"
    return None


# -- the governor -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GovernorEvent:
    """What subscribers receive: the event name (as in events.py) and the snapshots around it."""

    name: str
    snapshot: Snapshot
    previous: Snapshot | None


Subscriber = Callable[[GovernorEvent], None]


def count_tasks() -> int:
    """asyncio tasks of the running loop plus threads: what max_goroutines caps.

    Threads named elemta-admin* serve the admin HTTP endpoint, which bounds them itself
    (observe/http.py): a client of that endpoint must not spend the SMTP budget.
    """
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = 0
    threads = sum(1 for t in threading.enumerate() if not t.name.startswith("elemta-admin"))
    return tasks + threads


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


def format_mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


class Governor:
    """Owns the memory state; implements smtp.server.Admission."""

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
        self._effective: Effective | None = None
        self._leaks = LeakDetector() if self.memory.goroutine_leak_detection else None
        self._malloc_trim = _load_malloc_trim()
        # (reason, command) -> (last logged, refusals not logged since)
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._psi: tuple[int, select.epoll] | None = None
        self.psi_wakeups = 0

    # -- what reporting surfaces read -------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            self._observe(self.sampler.sample(), monitor=False)
        assert self._snapshot is not None
        return self._snapshot

    @property
    def effective(self) -> Effective:
        """The effective picture behind the snapshot, with the dominating term's ceiling."""
        self.snapshot  # noqa: B018 - takes the first sample if none yet
        assert self._effective is not None
        return self._effective

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
            "memory limit %s (%s), usage %s (%s), state %s; %s; protection %s",
            format_mib(snap.limit), snap.limit_source.value, format_mib(snap.usage),
            self._of(snap), snap.state.value, where,
            "on" if snap.protection else "off (log only)",
        )
        self._arm_psi()
        self._task = asyncio.get_running_loop().create_task(self._monitor(), name="memory-monitor")
        return snap

    async def stop(self) -> None:
        if self._psi is not None:
            fd, ep = self._psi
            asyncio.get_running_loop().remove_reader(ep.fileno())
            ep.close()
            os.close(fd)
            self._psi = None
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
    def connection(self, sessions: int) -> str | None:
        snap = self._current()
        reason = connection_refusal(snap.state, snap.breaker, self._recent_tasks(),
                                    self.memory.max_goroutines, self._half_open_left)
        if reason is None:
            self._admitted_since_count += 1
            if snap.breaker is BreakerState.HALF_OPEN:
                self._half_open_left -= 1
        return self._refuse(reason, REPLY_STORAGE, "CONNECT")

    def _recent_tasks(self) -> int:
        now = time.monotonic()
        if now - self._tasks_counted_at > REFRESH_AFTER:
            self._tasks_counted, self._tasks_counted_at = self._tasks(), now
            self._admitted_since_count = 0
        return self._tasks_counted + self._admitted_since_count

    def command(self, verb: str, session_bytes: int) -> str | None:
        snap = self._current()
        reason = command_refusal(snap.state, snap.breaker, session_bytes,
                                 self.memory.per_connection_memory_limit)
        return self._refuse(reason, REPLY_STORAGE, verb)

    def data(self, session_bytes: int) -> str | None:
        # Called per DATA chunk: a comparison only, no sampling. Streaming costs no memory;
        # only what the session itself holds can exceed its budget.
        if session_bytes <= self.memory.per_connection_memory_limit:
            return None
        return self._refuse("session-memory", REPLY_TOO_BIG, "DATA")

    def _refuse(self, reason: str | None, reply: str, command: str) -> str | None:
        if reason is None:
            return None
        now = time.monotonic()
        key = (reason, command)
        last, suppressed = self._refusals.get(key, (float("-inf"), 0))
        if now - last >= REFUSAL_LOG_EVERY:
            more = f" ({suppressed} more since the last line)" if suppressed else ""
            if self.memory.memory_exhaustion_protection:
                msg = f"Refused {command} with {reply[:9]}: {reason}{more}"
            else:
                msg = f"Would refuse {command} ({reason}) but memory_exhaustion_protection = false{more}"
            emit(log, "session_rejected", msg, smtp_code=int(reply[:3]), reason=reason,
                 command=command)
            self._refusals[key] = (now, 0)
        else:
            self._refusals[key] = (last, suppressed + 1)
        return reply if self.memory.memory_exhaustion_protection else None

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
        eff = self._effective = effective(sample, m.max_memory_usage)
        previous = self._snapshot
        old_state, old_breaker = self._state, self._breaker.state
        self._state = next_state(old_state, eff.utilization, m.memory_warning_threshold,
                                 m.memory_critical_threshold)
        if monitor:
            self._breaker = breaker_step(self._breaker, eff.utilization, m.memory_critical_threshold)
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
            usage=eff.usage,
            limit=eff.limit,
            limit_source=eff.source,
            utilization=eff.utilization,
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
            eff.utilization >= m.gc_threshold and self._gc_due(snap.taken_at)
        ):
            self._wake.set()  # the monitor runs GC and the breaker now, not at its next tick

    def _mem_fields(self, snap: Snapshot, threshold: float) -> dict[str, Any]:
        # current_usage / max_usage is the utilization, as in the memory guide's example.
        eff = self.effective
        return {
            "current_usage": snap.usage,
            "max_usage": eff.bound,
            "utilization_percent": snap.utilization_percent,
            "threshold": threshold,
            "limit_source": eff.bound_source.value,
        }

    def _of(self, snap: Snapshot) -> str:
        """"95.0% of 256.0 MiB (cgroup-v1)": the utilization and the ceiling it is measured on."""
        eff = self.effective
        return f"{snap.utilization_percent}% of {format_mib(eff.bound)} ({eff.bound_source.value})"

    def _log_state(self, name: str, snap: Snapshot, old: MemoryState) -> None:
        m = self.memory
        if name == "memory_critical":
            suffix = ("new connections and MAIL/RCPT get 452 4.3.1" if m.memory_exhaustion_protection
                      else "memory_exhaustion_protection = false: not refusing")
            emit(log, name, f"Memory critical threshold exceeded: {self._of(snap)}; {suffix}",
                 **self._mem_fields(snap, m.memory_critical_threshold))
        elif name == "memory_warning":
            text = ("Memory back below the critical threshold (still above warning)"
                    if old is MemoryState.CRITICAL else "Memory warning threshold exceeded")
            emit(log, name, f"{text}: {self._of(snap)}",
                 **self._mem_fields(snap, m.memory_warning_threshold))
        else:
            emit(log, name, f"Memory back to normal: {self._of(snap)}",
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
        self.sampler.update_children()
        self._observe(self.sampler.sample(), monitor=True)
        snap = self.snapshot
        if snap.utilization >= self.memory.gc_threshold and self._gc_due(snap.taken_at):
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
        before = self.sampler.process_rss()
        self._last_gc_mono = time.monotonic()
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        after = self.sampler.process_rss()
        freed = max(0, before - after)
        self.gc_runs += 1
        self._last_gc_at = time.time()
        self._last_gc_freed = freed
        self._observe(self.sampler.sample(), monitor=False)
        snap = self.snapshot
        emit(log, "memory_gc",
             f"Forced garbage collection: freed {format_mib(freed)} (RSS {format_mib(before)} -> "
             f"{format_mib(after)}); now {self._of(snap)}",
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
                self.tick()
            except Exception:  # the monitor must outlive any one bad sample
                log.exception("memory monitor sample failed")

    # -- kernel pressure notification -------------------------------------------------------------
    def _arm_psi(self) -> None:
        """Ask the kernel to wake us on memory stalls (PSI trigger), where it offers that."""
        path = self.sampler.pressure_path
        if path is None or self.sampler.root != Path("/"):
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("no PSI trigger on %s: %s", path, exc.strerror)
            return
        try:
            for trigger in PSI_TRIGGERS:
                try:
                    os.write(fd, trigger)
                    break
                except OSError as exc:
                    if exc.errno != errno.EINVAL or trigger is PSI_TRIGGERS[-1]:
                        raise
            ep = select.epoll()
            # PSI signals with POLLPRI only (the file always polls readable), so watch it
            # through an epoll fd, which the event loop can watch for plain readability.
            ep.register(fd, select.EPOLLPRI)
        except OSError as exc:
            os.close(fd)
            log.debug("no PSI trigger on %s: %s", path, exc.strerror)
            return
        self._psi = (fd, ep)
        asyncio.get_running_loop().add_reader(ep.fileno(), self._on_pressure)
        log.info("memory pressure trigger armed on %s (%s)", path, trigger.rstrip(b"\0").decode())

    def _on_pressure(self) -> None:
        if self._psi is None:
            return
        if self._psi[1].poll(0):
            self.psi_wakeups += 1
            self._wake.set()
