"""The Prometheus registry of one daemon: the guide's metric names plus SMTP counters.

Memory figures are read from the governor's latest Snapshot at scrape time (a custom
collector); nothing here measures memory. SMTP counters live in `SmtpStats`, which the SMTP
layer drives through the `SmtpObserver` hooks and which /api/stats reads too, so /metrics and
/api/stats always show the same numbers.

Every label has a bounded set of values: reply codes and enhanced codes elemta itself
generates, fixed rejection reasons, kernel event names, limit sources. No peer addresses.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

from .. import __version__
from ..memory.snapshot import BreakerState, MemoryState, Snapshot
from .heartbeat import STALL_AFTER


class SnapshotSource(Protocol):
    """What the reporting surfaces need from the governor: its latest Snapshot."""

    @property
    def snapshot(self) -> Snapshot | None: ...


# Message sizes: 1 KiB .. 64 MiB in powers of four (max_message_size defaults to 50 MiB).
SIZE_BUCKETS: tuple[float, ...] = tuple(float(1024 * 4**i) for i in range(9))

_STATUS = re.compile(r"([2345]\d\d)(?:$| (?:([245]\.\d{1,3}\.\d{1,3})(?: |$))?)")

# cgroup v1 memory.oom_control reports these flags beside the oom_kill count: states, not counts.
_V1_OOM_FLAGS = frozenset({"under_oom", "oom_kill_disable"})

# Connection refusals, by the enhanced code of the reply the SMTP layer sent.
REJECT_REASONS = {"4.3.2": "shutting_down", "4.7.0": "max_connections", "4.3.1": "memory"}


def parse_status(status: str) -> tuple[str, str]:
    """('452', '4.3.1') from '452 4.3.1 Insufficient system storage'; ('', '') if unparsable.

    Continuation lines of a multi-line reply ('250-PIPELINING') give ('', ''), so a reply
    counts once, by its last line (also when the whole reply comes as one string).
    """
    m = _STATUS.match(status.rstrip("\r\n").rsplit("\n", 1)[-1].lstrip("\r"))
    if m is None:
        return "", ""
    return m.group(1), m.group(2) or ""


@dataclass
class SmtpCounts:
    """A consistent copy of the SMTP counters."""

    replies: dict[tuple[str, str], int]  # (code, enhanced) -> count
    connections_accepted: int
    connections_rejected: dict[str, int]  # reason -> count
    messages_accepted: int
    recipients_accepted: int
    bytes_accepted: int
    size_buckets: list[int]  # cumulative counts per SIZE_BUCKETS bound, then +Inf

    def replies_by_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (code, _), n in self.replies.items():
            key = f"{code[0]}xx"
            out[key] = out.get(key, 0) + n
        return out


class SamplesSource(Protocol):
    """Anything with prometheus_client's collect(): a registry or a MultiProcessCollector."""

    def collect(self) -> Iterable[Metric]: ...


class SmtpStats:
    """The SmtpObserver the daemon attaches to SmtpContext.observer.

    The counters are prometheus_client Counter/Histogram objects in a private registry, so in
    multiprocess mode (workers) their values live in PROMETHEUS_MULTIPROC_DIR. `counts()` is
    derived from collected samples of `source`: this object's own registry in one process, a
    MultiProcessCollector over every worker's files in the supervisor. /metrics renders those
    same counts, so /metrics and /api/stats agree in both modes.
    """

    def __init__(self, source: SamplesSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._replies = Counter("elemta_smtp_replies", "SMTP replies", ["class", "code", "enhanced"],
                                registry=r)
        self._accepted = Counter("elemta_connections_accepted", "greeted", registry=r)
        self._rejected = Counter("elemta_connections_rejected", "refused", ["reason"], registry=r)
        for reason in (*REJECT_REASONS.values(), "other"):
            self._rejected.labels(reason)  # present (at 0) from the start
        self._messages = Counter("elemta_messages_accepted", "messages", registry=r)
        self._recipients = Counter("elemta_message_recipients_accepted", "recipients", registry=r)
        self._sizes = Histogram("elemta_message_size_bytes", "sizes", buckets=SIZE_BUCKETS,
                                registry=r)
        self._source: SamplesSource = source if source is not None else r
        # A one-line reply's labels depend only on its first 14 characters (code, space, an
        # enhanced code of at most 9, the character after it): its counter, by that prefix.
        self._reply_counters: dict[str, Any] = {}

    # -- SmtpObserver --------------------------------------------------------------------
    def reply(self, status: str) -> None:
        key = status[:14]
        counter = self._reply_counters.get(key)
        if counter is None:
            code, enhanced = parse_status(status)
            if not code:
                return
            counter = self._replies.labels(f"{code[0]}xx", code, enhanced)
            if "\n" not in status and len(self._reply_counters) < 512:
                self._reply_counters[key] = counter
        counter.inc()

    def message_accepted(self, size: int, recipients: int) -> None:
        self._messages.inc()
        self._recipients.inc(recipients)
        self._sizes.observe(size)

    def connection(self, outcome: str) -> None:
        if outcome == "accepted":
            self._accepted.inc()
        else:
            self._rejected.labels(REJECT_REASONS.get(outcome, "other")).inc()

    # -- readers ---------------------------------------------------------------------------
    def counts(self) -> SmtpCounts:
        replies: dict[tuple[str, str], int] = {}
        rejected: dict[str, int] = {}
        scalars: dict[str, int] = {}
        buckets: dict[float, int] = {}
        size_sum = 0.0
        for family in self._source.collect():
            for s in family.samples:
                n = int(s.value)
                if s.name == "elemta_smtp_replies_total":
                    key = (s.labels["code"], s.labels["enhanced"])
                    replies[key] = replies.get(key, 0) + n
                elif s.name == "elemta_connections_rejected_total":
                    reason = s.labels["reason"]
                    rejected[reason] = rejected.get(reason, 0) + n
                elif s.name == "elemta_message_size_bytes_bucket":
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0) + n
                elif s.name == "elemta_message_size_bytes_sum":
                    size_sum += s.value
                elif s.name.endswith("_total"):
                    scalars[s.name] = scalars.get(s.name, 0) + n
        bounds = [*SIZE_BUCKETS, float("inf")]
        return SmtpCounts(
            replies={k: v for k, v in replies.items() if v},
            connections_accepted=scalars.get("elemta_connections_accepted_total", 0),
            connections_rejected={k: v for k, v in rejected.items() if v},
            messages_accepted=scalars.get("elemta_messages_accepted_total", 0),
            recipients_accepted=scalars.get("elemta_message_recipients_accepted_total", 0),
            bytes_accepted=int(size_sum),
            size_buckets=[buckets.get(b, 0) for b in bounds],
        )


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


class MemoryCollector:
    """Renders the governor's latest Snapshot; absent metrics mean no snapshot yet."""

    def __init__(self, source: Callable[[], Snapshot | None]) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        return []  # families depend on the snapshot (cgroup, PSI); skip the registry's check

    def collect(self) -> Iterator[Any]:
        snap = self._source()
        if snap is None:
            return
        yield _gauge("elemta_memory_usage_bytes",
                     "elemta's own memory: its cgroup's working set when the cgroup holds only "
                     "elemta, else the PSS of its processes", snap.usage)
        yield _gauge("elemta_memory_usage_source",
                     "How elemta_memory_usage_bytes is measured (value 1)", 1.0,
                     source=snap.usage_source.value)
        yield _gauge("elemta_memory_utilization_percent",
                     "elemta_memory_usage_bytes as percent of elemta_memory_limit_bytes",
                     snap.utilization_percent)
        limit = GaugeMetricFamily("elemta_memory_limit_bytes",
                                  "Effective memory limit: the lowest of config, cgroup limit "
                                  "and host RAM; source names it", labels=["source"])
        limit.add_metric([snap.limit_source.value], snap.limit)
        yield limit
        families = {
            "ratio": GaugeMetricFamily("elemta_memory_term_ratio",
                                       "Each term's usage over its ceiling (0-1); the highest "
                                       "binds and decides the state", labels=["term"]),
            "usage": GaugeMetricFamily("elemta_memory_term_usage_bytes",
                                       "Each term's usage (process: elemta's own; cgroup: "
                                       "working set; host: used RAM)", labels=["term"]),
            "ceiling": GaugeMetricFamily("elemta_memory_term_ceiling_bytes",
                                         "Each term's ceiling (process: max_memory_usage; "
                                         "cgroup: its limit; host: RAM)", labels=["term"]),
            "binding": GaugeMetricFamily("elemta_memory_binding_term",
                                         "1 for the term that binds (the highest ratio), 0 for "
                                         "the others", labels=["term"]),
        }
        binding = snap.binding
        for t in snap.terms:
            families["ratio"].add_metric([t.term.value], t.ratio)
            families["usage"].add_metric([t.term.value], t.usage)
            families["ceiling"].add_metric([t.term.value], t.ceiling)
            families["binding"].add_metric([t.term.value], 1.0 if t == binding else 0.0)
        yield from families.values()
        state = GaugeMetricFamily("elemta_memory_state",
                                  "Memory state: 1 for the current one", labels=["state"])
        for s in MemoryState:
            state.add_metric([s.value], 1.0 if s is snap.state else 0.0)
        yield state
        thresholds = GaugeMetricFamily("elemta_memory_threshold_ratio",
                                       "Configured utilization thresholds (0-1)",
                                       labels=["threshold"])
        thresholds.add_metric(["warning"], snap.warning_threshold)
        thresholds.add_metric(["gc"], snap.gc_threshold)
        thresholds.add_metric(["critical"], snap.critical_threshold)
        yield thresholds
        yield _gauge("elemta_circuit_breaker_open", "1 while the circuit breaker refuses connections",
                     0.0 if snap.breaker is BreakerState.CLOSED else 1.0)
        yield _gauge("elemta_memory_protection_enabled",
                     "memory_exhaustion_protection (0: log only, never refuse)",
                     1.0 if snap.protection else 0.0)
        yield _gauge("elemta_memory_snapshot_age_seconds", "Seconds since the governor's last sample",
                     max(0.0, time.monotonic() - snap.taken_at))
        yield _gauge("elemta_process_memory_rss_bytes",
                     "RSS summed over the daemon's processes (pages shared after fork counted "
                     "once per process)", snap.process_rss)
        yield _gauge("elemta_process_memory_pss_bytes",
                     "PSS summed over the daemon's processes (shared pages counted once)",
                     snap.process_pss)
        yield _gauge("elemta_session_memory_bytes", "In-memory bytes held by all SMTP sessions",
                     snap.session_bytes)
        yield _gauge("elemta_host_memory_total_bytes", "Host RAM", snap.host_total)
        yield _gauge("elemta_host_memory_available_bytes", "Host RAM available (MemAvailable)",
                     snap.host_available)
        yield _counter("elemta_gc_runs", "Forced garbage collections (gc.collect + malloc_trim)",
                       snap.gc_runs)
        yield _gauge("elemta_gc_last_freed_bytes", "Bytes RSS fell by in the last forced collection",
                     snap.last_gc_freed)
        if snap.last_gc_at is not None:
            yield _gauge("elemta_gc_last_run_timestamp_seconds",
                         "Unix time of the last forced collection", snap.last_gc_at)
        yield _gauge("elemta_goroutines_current", "SMTP sessions plus asyncio tasks and threads", snap.tasks)
        yield _gauge("elemta_goroutines_max", "max_goroutines: cap on sessions, tasks and threads",
                     snap.max_tasks)
        yield _gauge("elemta_sessions_active", "SMTP sessions open now", snap.sessions)
        yield _gauge("elemta_sessions_max", "max_connections: cap on SMTP sessions",
                     snap.max_sessions)
        cg = snap.cgroup
        if cg is not None:
            yield _gauge("elemta_cgroup_info", "The daemon's memory cgroup (value 1)", 1.0,
                         version=str(cg.version), path=cg.path)
            yield _gauge("elemta_cgroup_memory_current_bytes",
                         "cgroup memory.current (v1: memory.usage_in_bytes)", cg.current)
            yield _gauge("elemta_cgroup_memory_working_set_bytes",
                         "cgroup usage minus clean, unmapped page cache", cg.working_set)
            if cg.limit is not None:
                yield _gauge("elemta_cgroup_memory_max_bytes",
                             "Lowest cgroup memory limit up to the root", cg.limit)
            events = CounterMetricFamily("elemta_cgroup_memory_events",
                                         "cgroup memory.events counts (v1: failcnt, oom_kill)",
                                         labels=["event"])
            for name, n in sorted(cg.events.items()):
                if name not in _V1_OOM_FLAGS:
                    events.add_metric([name], n)
            yield events
            if "under_oom" in cg.events:
                yield _gauge("elemta_cgroup_memory_under_oom",
                             "cgroup v1 memory.oom_control under_oom (1: the OOM killer is busy)",
                             cg.events["under_oom"])
        psi = snap.pressure
        if psi is not None:
            yield _gauge("elemta_memory_pressure_some_avg10",
                         "PSI memory 'some' avg10 (percent of time stalled)", psi.some_avg10)
            yield _gauge("elemta_memory_pressure_full_avg10",
                         "PSI memory 'full' avg10 (percent of time stalled)", psi.full_avg10)
            yield _counter("elemta_memory_pressure_some_stall_seconds",
                           "PSI memory 'some' total stall time", psi.some_total_us / 1e6)
            yield _counter("elemta_memory_pressure_full_stall_seconds",
                           "PSI memory 'full' total stall time", psi.full_total_us / 1e6)


class SmtpCollector:
    def __init__(self, stats: SmtpStats) -> None:
        self._stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        c = self._stats.counts()
        replies = CounterMetricFamily("elemta_smtp_replies",
                                      "SMTP replies sent, by code class, code and enhanced code",
                                      labels=["class", "code", "enhanced"])
        for (code, enhanced), n in sorted(c.replies.items()):
            replies.add_metric([f"{code[0]}xx", code, enhanced], n)
        yield replies
        yield _counter("elemta_connections_accepted", "SMTP connections greeted with 220",
                       c.connections_accepted)
        rejected = CounterMetricFamily("elemta_connections_rejected",
                                       "SMTP connections refused at the greeting, by reason",
                                       labels=["reason"])
        for reason in sorted({*REJECT_REASONS.values(), "other", *c.connections_rejected}):
            rejected.add_metric([reason], c.connections_rejected.get(reason, 0))
        yield rejected
        yield _counter("elemta_messages_accepted", "Messages stored durably and answered 250",
                       c.messages_accepted)
        yield _counter("elemta_message_recipients_accepted",
                       "Recipients of messages answered 250", c.recipients_accepted)
        sizes = HistogramMetricFamily("elemta_message_size_bytes", "Size of accepted messages")
        bounds = [*(str(b) for b in SIZE_BUCKETS), "+Inf"]
        sizes.add_metric([], list(zip(bounds, (float(n) for n in c.size_buckets), strict=True)),
                         float(c.bytes_accepted))
        yield sizes


class BuildInfoCollector:
    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield _gauge("elemta_build_info", "elemta version (value 1)", 1.0,
                     version=__version__, python=platform.python_version())


class LoopCollector:
    def __init__(self, heartbeat_age: Callable[[], float], stall_after: float) -> None:
        self._age = heartbeat_age
        self._stall_after = stall_after

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield _gauge("elemta_event_loop_heartbeat_age_seconds",
                     "Seconds since the event loop last ran its heartbeat", self._age())
        # Alert rules compare the age with this, so they follow the daemon's own bound.
        yield _gauge("elemta_event_loop_stall_after_seconds",
                     "Heartbeat age above which /health reports the loop stalled",
                     self._stall_after)


HEALTH_STATUSES = ("ok", "warning", "unhealthy")


class HealthCollector:
    """The /health verdict as a gauge: alert rules see what a load balancer sees."""

    def __init__(self, status: Callable[[], str]) -> None:
        self._status = status

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        current = self._status()
        g = GaugeMetricFamily("elemta_health_status",
                              "/health verdict: 1 for the current status (unhealthy: 503)",
                              labels=["status"])
        for s in HEALTH_STATUSES:
            g.add_metric([s], 1.0 if s == current else 0.0)
        yield g


def build_registry(
    snapshot: Callable[[], Snapshot | None],
    stats: SmtpStats,
    heartbeat_age: Callable[[], float],
    stall_after: float = STALL_AFTER,
    health_status: Callable[[], str] | None = None,
) -> CollectorRegistry:
    """A fresh registry for one daemon: elemta's collectors plus process_* and python_gc_*."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    for collector in (MemoryCollector(snapshot), SmtpCollector(stats), BuildInfoCollector(),
                      LoopCollector(heartbeat_age, stall_after)):
        registry.register(collector)
    if health_status is not None:
        registry.register(HealthCollector(health_status))
    return registry

