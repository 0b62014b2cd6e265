"""Disk admission, like Postfix's queue_minfree: MAIL is refused with 452 4.3.1 while the mail
filesystems (maildir_root, and queue_dir when a queued transport is configured) have less free
space than [delivery] queue_minfree, or than a declared SIZE= plus queue_minfree.

statvfs runs on the executor once a second (a stuck NFS mount must not block the event loop);
MAIL reads the last sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("elemta.queue")

REPLY_NO_SPACE = "452 4.3.1 Insufficient system storage"
REPLY_TOO_BIG_FOR_SPACE = "452 4.3.1 Insufficient system storage for a message of that size"
SAMPLE_EVERY = 1.0


def disk_refusal(free: int | None, minfree: int, size: int) -> str | None:
    """The reply MAIL gets, or None: `free` bytes available (None: unknown), `size` declared."""
    if free is None or minfree <= 0:
        return None
    if free < minfree:
        return REPLY_NO_SPACE
    if size > free - minfree:
        return REPLY_TOO_BIG_FOR_SPACE
    return None


def declared_size(options: Sequence[str]) -> int:
    for opt in options:
        key, _, value = opt.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def free_bytes(paths: Sequence[Path]) -> int:
    """Least space available to an unprivileged writer among the filesystems of `paths` (the
    nearest existing ancestor of a path not created yet)."""
    out = None
    for path in paths:
        p = path.absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        st = os.statvfs(p)
        free = st.f_bavail * st.f_frsize
        out = free if out is None else min(out, free)
    assert out is not None
    return out


class DiskWatch:
    def __init__(self, paths: Sequence[Path], executor: ThreadPoolExecutor) -> None:
        self.paths = list(paths)
        self._executor = executor
        self.free: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> None:
        try:
            self.free = await asyncio.get_running_loop().run_in_executor(
                self._executor, free_bytes, self.paths)
        except OSError as exc:
            log.error("cannot read free space of %s: %s", ", ".join(map(str, self.paths)), exc)

    async def start(self) -> None:
        await self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="elemta-disk")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            await self.sample()

    def refusal(self, minfree: int, size: int) -> str | None:
        return disk_refusal(self.free, minfree, size)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
