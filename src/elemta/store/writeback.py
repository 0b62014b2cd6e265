"""Start writing a file's dirty pages out without waiting: sync_file_range(2) with
SYNC_FILE_RANGE_WRITE, through ctypes (the os module has no binding for it).

What it is for: two new files that must both be durable before a reply (the queue's body and
record). Started together, their blocks are allocated in the same journal transaction, so the
first fdatasync's commit covers the second file too, which then returns without a commit of its
own: one journal commit and one thread, where two fdatasyncs side by side needed a second
thread (and its hand-offs) for the same single commit. bench/syncpair.py, 20 writers of a
10 KiB and a 300-byte file on a fresh ext4 here, 3 alternating rounds: 3,940 pairs/s and 200 us
of CPU a pair against 3,148 and 308 us side by side (bench/relay.py's figures moved less than
their noise).

start() never raises: where the call is missing or refused (another kernel, a seccomp filter
answering EPERM) it says False and the caller syncs the way it did before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2


def _bind() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _bind()


def start(fd: int) -> bool:
    """Begin writeback of all of `fd`'s dirty pages; True if the kernel took the request."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0
