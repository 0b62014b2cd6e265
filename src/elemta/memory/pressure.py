"""Kernel memory-pressure wake-ups: a PSI trigger watched by the event loop.

PSI signals a trigger with POLLPRI only (the file always polls readable), so `add_reader` on the
trigger fd would fire constantly. The trigger is registered for EPOLLPRI in a private epoll,
whose own fd becomes readable only when the trigger fires; the loop watches that fd.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("elemta.memory")

# Tried in order: wake when tasks stalled on memory for 10% of a 1 s window; without
# CAP_SYS_RESOURCE the kernel accepts only windows that are multiples of 2 s.
PSI_TRIGGERS = (b"some 100000 1000000\0", b"some 200000 2000000\0")


class PressureTrigger:
    """One armed PSI trigger; calls `on_pressure` on the loop each time the kernel reports a stall."""

    def __init__(self, fd: int, ep: select.epoll, loop: asyncio.AbstractEventLoop,
                 on_pressure: Callable[[], None]) -> None:
        self._fd, self._ep, self._loop = fd, ep, loop
        self._on_pressure = on_pressure
        self.wakeups = 0
        loop.add_reader(ep.fileno(), self._ready)

    @classmethod
    def arm(cls, path: Path, on_pressure: Callable[[], None]) -> PressureTrigger | None:
        """Arm a trigger on `path` (a memory.pressure or /proc/pressure/memory file) in the
        running loop; None (logged at debug) where the kernel or permissions do not allow it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("no PSI trigger on %s: %s", path, exc.strerror)
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
            log.debug("no PSI trigger on %s: %s", path, exc.strerror)
            return None
        log.info("memory pressure trigger armed on %s (%s)", path, trigger.rstrip(b"\0").decode())
        return cls(fd, ep, asyncio.get_running_loop(), on_pressure)

    def _ready(self) -> None:
        if self._fd >= 0 and self._ep.poll(0):
            self.wakeups += 1
            self._on_pressure()

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        os.close(self._fd)
        self._fd = -1
