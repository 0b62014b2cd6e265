"""Memory-pressure wake-ups: the kernel's PSI trigger, armed by us or by systemd.

PSI signals a trigger with POLLPRI only (the file always polls readable), so `add_reader` on the
trigger fd would fire constantly. The fd is registered in a private epoll (EPOLLPRI for a regular
file, EPOLLIN for a FIFO or socket), whose own fd becomes readable only when the watch fires; the
loop watches that fd, and each time it is readable is one wake-up.

systemd >= 254 (`MemoryPressureWatch=`) tells the service where to watch and what to write
(docs/MEMORY_PRESSURE.md in systemd): `$MEMORY_PRESSURE_WATCH` is the path (the unit's
memory.pressure, or a FIFO/socket an administrator put there; `/dev/null` means "do not watch"),
`$MEMORY_PRESSURE_WRITE` the base64 of the trigger to write after opening it. Without the
variables (systemd 252) elemta arms its own trigger on its cgroup's memory.pressure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import logging
import os
import select
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("elemta.memory")

# Tried in order: wake when tasks stalled on memory for 10% of a 1 s window; without
# CAP_SYS_RESOURCE the kernel accepts only windows that are multiples of 2 s.
PSI_TRIGGERS = (b"some 100000 1000000\0", b"some 200000 2000000\0")

DISABLED = Path("/dev/null")


@dataclass(frozen=True)
class SystemdWatch:
    """What systemd asked for: watch `path` (None: disabled) after writing `write` to it."""

    path: Path | None
    write: bytes


def systemd_watch(env: Mapping[str, str]) -> SystemdWatch | None:
    """The memory-pressure watch systemd passed in `env`; None when it passed none.

    Raises ValueError (naming the variable) for a $MEMORY_PRESSURE_WRITE that is not base64.
    """
    watch = env.get("MEMORY_PRESSURE_WATCH", "")
    if not watch:
        return None
    if Path(watch) == DISABLED:
        return SystemdWatch(None, b"")
    encoded = env.get("MEMORY_PRESSURE_WRITE", "")
    try:
        data = base64.b64decode(encoded, validate=True) if encoded else b""
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"$MEMORY_PRESSURE_WRITE is not base64: {exc}") from exc
    return SystemdWatch(Path(watch), data)


def _open_watch(path: Path, write: bytes) -> tuple[int, int, socket.socket | None]:
    """(fd, epoll mask, socket owning fd or None) for a systemd watch path; closes what it
    opened when it raises."""
    if stat.S_ISSOCK(os.stat(path).st_mode):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            if write:
                sock.sendall(write)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock.fileno(), select.EPOLLIN, sock
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        # Opened read-write so that a writer hanging up does not leave POLLHUP raised for
        # good; nothing is written: the only reader of what we wrote would be us.
        return fd, select.EPOLLIN, None
    try:
        if write:
            os.write(fd, write)
    except OSError:
        os.close(fd)
        raise
    return fd, select.EPOLLPRI, None


# Why opening a cgroup's memory.pressure for writing fails. Under systemd 252 (Debian 12) the
# unit must hand the file to the service (elemta-pressure) and exempt it from
# ProtectControlGroups= (ReadWritePaths=); systemd >= 254 does both for MemoryPressureWatch=.
_OPEN_HINTS = {
    errno.EACCES: " (the file belongs to root: is the unit's ExecStartPre=+elemta-pressure there?)",
    errno.EROFS: " (the cgroup tree is mounted read-only by ProtectControlGroups=: is the unit's "
                 "ReadWritePaths= for it there?)",
    errno.EPERM: " (this kernel lets only CAP_SYS_RESOURCE create PSI triggers)",
}


def _not_armed(path: Path, exc: OSError, hint: str) -> None:
    # Info, not debug: without a trigger the memory monitor wakes only on its timer, which an
    # administrator tuning monitoring_interval needs to know (Debian 12's normal case).
    log.info("memory pressure trigger not armed on %s: %s%s; the memory monitor wakes only "
             "every monitoring_interval", path, exc.strerror or exc, hint)


class PressureTrigger:
    """One armed watch; calls `on_pressure` on the loop each time it fires."""

    def __init__(self, fd: int, ep: select.epoll, loop: asyncio.AbstractEventLoop,
                 on_pressure: Callable[[], None], *, drain: bool = False,
                 sock: socket.socket | None = None, source: str = "elemta") -> None:
        self._fd, self._ep, self._loop = fd, ep, loop
        self._on_pressure = on_pressure
        self._drain = drain  # FIFO/socket: read what the writer sent, or POLLIN stays up
        self._sock = sock  # owns fd when the watch is a socket
        self.source = source  # "elemta": our own trigger; "systemd": $MEMORY_PRESSURE_WATCH
        self.wakeups = 0
        loop.add_reader(ep.fileno(), self._ready)

    @classmethod
    def arm(cls, path: Path, on_pressure: Callable[[], None]) -> PressureTrigger | None:
        """Arm our own trigger on `path` (a memory.pressure or /proc/pressure/memory file) in the
        running loop; None (logged at info, with the reason) where the kernel or permissions do
        not allow it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            _not_armed(path, exc, _OPEN_HINTS.get(exc.errno or 0, ""))
            return None
        try:
            for trigger in PSI_TRIGGERS:
                try:
                    os.write(fd, trigger)
                    break
                except OSError as exc:
                    if exc.errno != errno.EINVAL or trigger is PSI_TRIGGERS[-1]:
                        raise
            ep = select.epoll()
            ep.register(fd, select.EPOLLPRI)
        except OSError as exc:
            os.close(fd)
            _not_armed(path, exc, "")
            return None
        log.info("memory pressure trigger armed on %s (%s)", path, trigger.rstrip(b"\0").decode())
        return cls(fd, ep, asyncio.get_running_loop(), on_pressure)

    @classmethod
    def arm_systemd(cls, watch: SystemdWatch,
                    on_pressure: Callable[[], None]) -> PressureTrigger | None:
        """Follow systemd's memory-pressure protocol: open the path, write the trigger, wait for
        POLLPRI on a regular file (the PSI file), POLLIN on a FIFO or socket. None (logged as a
        warning: systemd asked and we could not) when the path cannot be watched, or when
        systemd said /dev/null."""
        if watch.path is None:
            log.info("memory pressure watch disabled by systemd ($MEMORY_PRESSURE_WATCH=/dev/null)")
            return None
        path = watch.path
        try:
            fd, mask, sock = _open_watch(path, watch.write)
        except OSError as exc:
            log.warning("cannot watch memory pressure at %s ($MEMORY_PRESSURE_WATCH): %s",
                        path, exc.strerror or exc)
            return None
        ep = select.epoll()
        try:
            ep.register(fd, mask)
        except OSError as exc:  # EPERM: a file that cannot be polled (not a PSI file)
            ep.close()
            if sock is not None:
                sock.close()
            else:
                os.close(fd)
            log.warning("cannot watch memory pressure at %s ($MEMORY_PRESSURE_WATCH): %s",
                        path, exc.strerror or exc)
            return None
        shown = watch.write.rstrip(b"\0").decode(errors="replace") or "nothing written"
        log.info("memory pressure: watching %s from systemd (%s)", path, shown)
        return cls(fd, ep, asyncio.get_running_loop(), on_pressure,
                   drain=mask == select.EPOLLIN, sock=sock, source="systemd")

    def _ready(self) -> None:
        if self._fd < 0:
            return
        # The loop saw the private epoll readable only because polling the watched fd returned
        # the requested event. For PSI that poll also consumed it (the kernel resets a trigger's
        # event on every poll), so the private epoll's own answer is now empty: asking it only
        # clears its ready list, and the wake-up counts either way. (Requiring a non-empty
        # answer here lost every PSI wake-up.)
        self._ep.poll(0)
        if self._drain and not self._read_all():
            return
        self.wakeups += 1
        self._on_pressure()

    def _read_all(self) -> bool:
        """Empty a FIFO/socket; False (and the watch closed) when a socket's peer hung up."""
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except BlockingIOError:
                return True
            except OSError as exc:
                log.warning("memory pressure watch failed: %s; no more wake-ups from it",
                            exc.strerror)
                self.close()
                return False
            if not chunk:
                log.warning("memory pressure watch closed by its peer; no more wake-ups from it")
                self.close()
                return False

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)
        self._fd = -1
