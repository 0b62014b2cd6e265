"""systemd integration: sd_notify (READY, STATUS, RELOADING+MONOTONIC_USEC, STOPPING, WATCHDOG),
socket activation.

Outside systemd (no NOTIFY_SOCKET, no WATCHDOG_USEC, no LISTEN_FDS) every part is a silent no-op.

The watchdog is pinged from a task on the event loop itself, so a loop that stops turning stops the
pings and systemd restarts the service (WatchdogSec= in elemta.service). The STATUS= line is a pure
function of the governor's Snapshot, so it tells the same story as /api/stats and the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..memory.snapshot import BreakerState, MemoryState, Snapshot
from ..units import format_size

log = logging.getLogger("elemta.systemd")

LISTEN_FDS_START = 3
API_FD_NAME = "api"  # FileDescriptorName=api: the admin HTTP listener; every other name is SMTP


# ---------------------------------------------------------------- pure functions


def phase(snap: Snapshot | None, *, draining: bool = False) -> str:
    """The first word(s) of STATUS=: what the daemon does with new mail right now."""
    if draining:
        return "draining"
    if snap is not None and snap.protection and (
        snap.breaker is BreakerState.OPEN or snap.state is MemoryState.CRITICAL
    ):
        return "refusing new mail (452 4.3.1)"
    return "accepting"


def status_text(phase_text: str, sessions: int, snap: Snapshot | None,
                notes: Sequence[str] = ()) -> str:
    """E.g. "accepting; memory 1.6% of 2.0 GiB (config), host 95% of 24.0 GiB binding;
    3 sessions; breaker closed": elemta's own usage against the effective limit, then the term
    that decides the state; then `notes` (how this run came to be, workers replaced)."""
    noun = "session" if sessions == 1 else "sessions"
    tail = "".join(f"; {n}" for n in notes)
    if snap is None:
        return f"{phase_text}; {sessions} {noun}{tail}"
    b = snap.binding
    return (
        f"{phase_text}; memory {snap.utilization * 100:.1f}% of {format_size(snap.limit)} "
        f"({snap.limit_source.value}), {b.term.value} {b.ratio * 100:.0f}% of "
        f"{format_size(b.ceiling)} binding; {sessions} {noun}; breaker {snap.breaker.value}{tail}"
    )


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not supervised."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2 / 1_000_000


def parse_listen_fds(env: Mapping[str, str], pid: int) -> dict[int, str]:
    """{fd: name} from LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES (sd_listen_fds_with_names(3))."""
    if env.get("LISTEN_PID", "") != str(pid):
        return {}
    count = env.get("LISTEN_FDS", "")
    if not count.isdigit():
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    return {
        LISTEN_FDS_START + i: (names[i] if i < len(names) else "unknown") for i in range(int(count))
    }


def extend_timeout_usec(drain_timeout: float, margin: float = 10.0) -> int:
    """EXTEND_TIMEOUT_USEC= value covering the whole drain plus closing down."""
    return int((drain_timeout + margin) * 1_000_000)


# ---------------------------------------------------------------- socket activation


@dataclass
class InheritedSockets:
    smtp: list[socket.socket] = field(default_factory=list)
    api: list[socket.socket] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.smtp or self.api)


def inherited_sockets(env: Mapping[str, str] | None = None) -> InheritedSockets:
    """Sockets systemd passed us (elemta.socket), sorted by FileDescriptorName; empty otherwise.

    Unsets LISTEN_* so that child processes do not think the sockets are theirs.
    """
    environ = os.environ if env is None else env
    fds: dict[int, str] = {}
    if env is None and environ.get("LISTEN_FDS"):
        try:
            from systemd import daemon as sd_daemon

            with_names = getattr(sd_daemon, "listen_fds_with_names", None)
            if with_names is not None:
                fds = dict(with_names(True))
        except ImportError:  # pragma: no cover - python3-systemd is a dependency
            pass
    if not fds:
        fds = parse_listen_fds(environ, os.getpid())
        if env is None:
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(var, None)
    out = InheritedSockets()
    for fd, name in sorted(fds.items()):
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sock.setblocking(False)
        (out.api if name == API_FD_NAME else out.smtp).append(sock)
    return out


# ---------------------------------------------------------------- sd_notify


class SnapshotSource(Protocol):
    """What the memory governor offers to reporting surfaces."""

    @property
    def snapshot(self) -> Snapshot | None: ...

    def subscribe(self, callback: Callable[[Any], None]) -> object:
        """`callback(event)` on every state change (the event is only a trigger here)."""
        ...


def _notify_function() -> Callable[[str], object] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon as sd_daemon
    except ImportError:  # pragma: no cover - python3-systemd is a dependency
        log.warning("NOTIFY_SOCKET is set but python3-systemd is missing: not notifying systemd")
        return None
    notify: Callable[[str], object] = sd_daemon.notify
    return notify


class SystemdNotifier:
    """The daemon's conversation with systemd. All methods are no-ops outside systemd."""

    def __init__(self, sessions: Callable[[], int], monitoring_interval: float,
                 healthy: Callable[[], bool] = lambda: True) -> None:
        """`healthy`: with workers, whether every worker reported recently; the watchdog is
        pinged only then, so a hung worker the supervisor fails to replace still gets the
        service restarted."""
        self._notify = _notify_function()
        self._healthy = healthy
        self._sessions = sessions
        self._interval = monitoring_interval
        self._source: SnapshotSource | None = None
        self._draining = False
        self._reloading = False
        self._last_status = ""
        self._notes: dict[str, str] = {}  # what STATUS= keeps saying after the journal scrolled
        self._tasks: list[asyncio.Task[None]] = []
        self.watchdog_every = watchdog_interval(os.environ, os.getpid())

    @property
    def active(self) -> bool:
        return self._notify is not None

    def send(self, *lines: str) -> None:
        if self._notify is not None:
            self._notify("\n".join(lines))

    def status(self) -> str:
        snap = self._source.snapshot if self._source is not None else None
        text = "reloading configuration" if self._reloading else phase(snap, draining=self._draining)
        return status_text(text, self._sessions(), snap, tuple(self._notes.values()))

    def note(self, key: str, text: str) -> None:
        """Keep `text` at the end of STATUS= for the rest of this run (the latest per `key`)."""
        self._notes[key] = text
        self.refresh_status()

    def refresh_status(self, _event: object = None) -> None:
        text = self.status()
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    async def ready(self, source: SnapshotSource | None, first_sample_timeout: float = 30.0) -> None:
        """READY=1 once listeners are bound (the caller's job) and the governor has sampled once."""
        self._source = source
        if source is not None:
            deadline = asyncio.get_running_loop().time() + first_sample_timeout
            while source.snapshot is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            source.subscribe(self.refresh_status)
        self._last_status = self.status()
        self.send("READY=1", f"STATUS={self._last_status}", f"MAINPID={os.getpid()}")
        loop = asyncio.get_running_loop()
        if self.active:
            self._tasks.append(loop.create_task(self._status_loop(), name="systemd-status"))
        if self.watchdog_every is not None and self.active:
            self._tasks.append(loop.create_task(self._watchdog_loop(), name="systemd-watchdog"))
            log.info("systemd watchdog: pinging every %.1fs from the event loop", self.watchdog_every)

    def reloading(self) -> None:
        self._reloading = True
        # Type=notify-reload (systemd >= 253) wants the CLOCK_MONOTONIC time of the reload's
        # start beside RELOADING=1; older systemd ignores the field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={self.status()}")

    def reloaded(self, source: SnapshotSource | None = None) -> None:
        self._reloading = False
        if source is not None:
            self._source = source
        self._last_status = self.status()
        self.send("READY=1", f"STATUS={self._last_status}")

    def stopping(self, drain_timeout: float) -> None:
        self._draining = True
        self._last_status = self.status()
        self.send(
            "STOPPING=1",
            f"EXTEND_TIMEOUT_USEC={extend_timeout_usec(drain_timeout)}",
            f"STATUS={self._last_status}",
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.refresh_status()

    async def _watchdog_loop(self) -> None:
        # Runs on the event loop: if the loop freezes, the pings stop and systemd restarts us.
        assert self.watchdog_every is not None
        while True:
            if self._healthy():
                self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_every)
