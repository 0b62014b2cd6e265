"""One scheduler per queue directory: whoever runs a delivery manager holds an exclusive
flock on <queue_dir>/manager.lock for as long as it schedules.

The kernel drops the lock with its last descriptor, so a process killed (-9 included) frees
it at once, and a daemon started while an earlier one still drains waits for it instead of
delivering the same records beside it. Blocking: call from an executor thread.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

NAME = "manager.lock"


class QueueLock:
    def __init__(self, queue_dir: Path) -> None:
        self.path = queue_dir / NAME
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def try_acquire(self) -> bool:
        """Take the lock if free (True), else False; writes our pid into the file for the
        admin (and for the waiting side's log line)."""
        if self._fd >= 0:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid the current holder wrote, or "?" (only informative: it may be stale)."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def forget_inherited(self) -> None:
        """In a child forked from the holder: close every descriptor of the lock file (a copy
        kept here would hold the lock after the parent died). By /proc, not by `_fd`: a fork
        may fall between another thread's open() and its assignment."""
        self._fd = -1
        target = str(self.path.resolve())
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == target:
                    os.close(int(name))
            except OSError:
                continue  # the listing's own descriptor, or already closed

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
