"""Forced collection: gc.collect() frees cycles, glibc malloc_trim(0) returns freed heap to the
OS. Only this process's heap is affected, so only its own RSS is measured around it."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def load_malloc_trim() -> Callable[[int], int] | None:
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


def own_rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


@dataclass(frozen=True)
class Reclaimed:
    rss_before: int
    rss_after: int

    @property
    def freed(self) -> int:
        """Bytes RSS fell by (0 when it grew: another thread may allocate meanwhile)."""
        return max(0, self.rss_before - self.rss_after)


class Reclaimer:
    def __init__(self) -> None:
        self._trim = load_malloc_trim()

    def run(self) -> Reclaimed:
        before = own_rss()
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        return Reclaimed(before, own_rss())
