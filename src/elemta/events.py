"""Every structured event elemta logs, defined once: name, MESSAGE_ID, priority, fields.

The journal handler, the JSON formatter, the journal catalog (elemta.catalog) and the man page
all read this table, so an event cannot drift between them. Emit with `emit()`:

    emit(log, "memory_critical", "Memory critical threshold exceeded",
         current_usage=..., max_usage=..., utilization_percent=..., threshold=...)

Field names are given lower-case (the guide's JSON shape); the journal handler upper-cases them
(CURRENT_USAGE, ...) and adds ELEMTA_EVENT and MESSAGE_ID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

# syslog priorities, as journald's PRIORITY field
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6


@dataclass(frozen=True)
class Event:
    name: str
    message_id: str
    priority: int
    summary: str
    fields: tuple[str, ...]
    explanation: str  # for the journal catalog: what happened and what to do

    @property
    def level(self) -> int:
        return {ERR: logging.ERROR, WARNING: logging.WARNING, NOTICE: logging.WARNING}.get(
            self.priority, logging.INFO
        )


# current_usage / max_usage == utilization_percent: elemta's own memory against the effective
# limit. The threshold applies to the binding term's ratio (binding_usage / binding_ceiling).
_MEM = ("current_usage", "max_usage", "utilization_percent", "threshold", "limit_source",
        "binding_term", "binding_usage", "binding_ceiling", "binding_percent")

EVENTS: dict[str, Event] = {
    e.name: e
    for e in (
        Event(
            "memory_warning", "5db5be31ba3d4b0088f50035d3281044", WARNING,
            "Memory warning threshold exceeded", _MEM,
            "Memory utilization passed memory_warning_threshold. Nothing is rejected yet.\n"
            "Watch the trend (elemta_memory_utilization_percent); if it keeps growing see\n"
            "'Memory Grows Continuously' in elemta.toml(5).",
        ),
        Event(
            "memory_gc", "f24bda96f1604a188965a20e2508c5e9", INFO,
            "Forced garbage collection", (*_MEM, "freed_bytes", "rss_before", "rss_after"),
            "Utilization passed gc_threshold, so elemta ran gc.collect() and malloc_trim(0)\n"
            "to return freed heap to the system. Frequent runs cost CPU: raise gc_threshold\n"
            "(0.80 -> 0.85) or max_memory_usage ('Frequent Garbage Collections' in elemta.toml(5)).",
        ),
        Event(
            "memory_critical", "1e6dd59ab22a4a0fabfe7e1c220a7c92", ERR,
            "Memory critical threshold exceeded", _MEM,
            "Memory utilization passed memory_critical_threshold. New connections and MAIL/RCPT\n"
            "commands are answered 452 4.3.1 (clients retry later); messages already in DATA\n"
            "continue. If this happens often: raise max_memory_usage or the service's MemoryMax=,\n"
            "raise memory_critical_threshold (0.90 -> 0.95), or lower per_connection_memory_limit\n"
            "('Too Many 452 Errors' in elemta.toml(5)).",
        ),
        Event(
            "memory_recovered", "fca37e77b0214012a37653d3fd135a3e", NOTICE,
            "Memory back to normal", _MEM,
            "Utilization fell back below the warning threshold (minus the hysteresis margin).",
        ),
        Event(
            "memory_pressure_wakeup", "503fb6c78e9245dd8a62ab4db728789f", INFO,
            "Woken by systemd's memory pressure watch", (*_MEM, "wakeups"),
            "systemd (MemoryPressureWatch=, $MEMORY_PRESSURE_WATCH) reported memory pressure in\n"
            "the service's cgroup, so elemta sampled at once instead of at its next tick, and\n"
            "collected and trimmed its heap when at or above gc_threshold (threshold is\n"
            "gc_threshold here). Frequent lines mean the unit runs close to MemoryHigh=:\n"
            "raise it, or lower max_memory_usage so elemta refuses (452 4.3.1) earlier.",
        ),
        Event(
            "breaker_open", "b9527349dfa8418a9aa4fed8b7dd7cfa", ERR,
            "Circuit breaker opened: refusing all new connections", (*_MEM, "samples"),
            "Memory stayed critical for several consecutive samples, so the circuit breaker\n"
            "opened: every new connection gets 452 4.3.1 until utilization has stayed below\n"
            "the critical threshold for a while. Find what holds memory (/api/stats,\n"
            "/debug/pprof/heap) and see 'Too Many 452 Errors' in elemta.toml(5).",
        ),
        Event(
            "breaker_closed", "40d06686b78748efac1e1f622cf91c6c", NOTICE,
            "Circuit breaker closed: accepting connections again", _MEM,
            "Utilization stayed below the critical threshold long enough; normal service resumed.",
        ),
        Event(
            "leak_suspected", "5451de40e1454fec806caff9bafd3b1c", WARNING,
            "Task leak suspected", ("tasks", "threads", "sessions", "top_coroutines"),
            "The number of asyncio tasks and threads grew over several monitoring intervals\n"
            "while the number of SMTP sessions did not. The message names the most common\n"
            "coroutines. Take a heap profile (/debug/pprof/heap) and report it.",
        ),
        Event(
            "session_rejected", "696e1336af534376b6bf75119e5cbe58", INFO,
            "Session or command refused", ("reason", "command"),
            "A connection or command was refused with a temporary failure (452/421).",
        ),
        Event(
            "message_accepted", "fdb523c707984adda0b95fcd5a8c5e4c", INFO,
            "Message accepted", ("queue_id", "sender", "recipients", "size"),
            "A message was stored durably in every recipient's Maildir and answered 250\n"
            "(unless the message says the connection closed before the reply).",
        ),
        Event(
            "message_delivered", "293447a0a0f0470ea02175ae391ff04e", INFO,
            "Queued message delivered to one recipient",
            ("queue_id", "recipient", "transport", "relay", "dsn", "delay", "reply"),
            "The delivery agent handed the message on for this recipient and the server\n"
            "accepted it (reply). DELAY is the time since the message was accepted.",
        ),
        Event(
            "message_deferred", "5ef37f3e336d44daa539c5d8f5175b4b", NOTICE,
            "Queued message deferred for one recipient",
            ("queue_id", "recipient", "transport", "relay", "dsn", "delay", "reply"),
            "The server answered 4xx for this recipient (or could not be reached: the reply\n"
            "says why). The queue retries with back-off until maximal_queue_lifetime;\n"
            "'elemta queue flush' retries now.",
        ),
        Event(
            "message_failed", "97fb004b487c42fab221887af943295a", WARNING,
            "Queued message failed for one recipient",
            ("queue_id", "recipient", "transport", "relay", "dsn", "delay", "reply"),
            "The server answered 5xx for this recipient, or it was still deferred at\n"
            "maximal_queue_lifetime. Once no recipient is pending, the sender gets one\n"
            "bounce (a DSN listing every failed recipient; none for the null sender <>)\n"
            "and the message stays in the queue's failed state ('elemta queue show ID';\n"
            "'elemta queue delete ID' removes it).",
        ),
        Event(
            "config_reloaded", "0946329d9eae45a1b3e87632f4764ab5", NOTICE,
            "Configuration reloaded", ("config_path", "result"),
            "SIGHUP re-read the configuration. When result is 'rejected' the old configuration\n"
            "stays in force; the message says which key is wrong (elemta check-config).",
        ),
        Event(
            "cgroup_limit_changed", "b6f5849f80e145218ab7f21a4a436619", NOTICE,
            "Effective memory limit changed", ("old_limit", "new_limit", "limit_source"),
            "The cgroup memory limit (or the configured one) changed at run time, e.g. after\n"
            "'systemctl set-property elemta MemoryMax=...'. Thresholds now apply to the new limit.",
        ),
        Event(
            "previous_run_failed", "ec6729626bb141a1a80b41f7de5d4c41", WARNING,
            "The previous run did not stop cleanly", ("result", "exit_code", "exit_status",
                                                      "ended_at"),
            "systemd restarted elemta after its previous run ended badly: result is systemd's\n"
            "SERVICE_RESULT (watchdog: the event loop stopped answering and systemd killed it;\n"
            "oom-kill, signal, core-dump, exit-code). The unit's ExecStopPost= (elemta note-exit)\n"
            "recorded it; STATUS= ('systemctl status elemta') keeps the note for this run. Look\n"
            "at the journal just before ENDED_AT; a watchdog timeout with no memory events\n"
            "before it is worth a bug report.",
        ),
        Event(
            "memory_source_unavailable", "d2cb506827fe49a4957e74d7b22458b4", WARNING,
            "Cgroup memory figures unavailable: using process figures only", ("reason",),
            "elemta could not read its cgroup's memory files (missing or unreadable), so it\n"
            "limits itself by its processes' PSS against max_memory_usage and host RAM only.",
        ),
    )
}


def emit(logger: logging.Logger, name: str, message: str | None = None, **fields: Any) -> None:
    """Log event `name` with its fields; handlers turn them into journal/JSON fields."""
    event = EVENTS[name]
    unknown = set(fields) - set(event.fields)
    if unknown:
        raise ValueError(f"event {name}: undeclared fields {sorted(unknown)}")
    logger.log(
        event.level,
        message or event.summary,
        extra={"elemta_event": event, "elemta_fields": fields},
    )
