"""Task/thread leak detection: tasks growing over several intervals while sessions do not.

Each SMTP session counts as one task (daemon.py), so `tasks - sessions` (the excess: asyncio
tasks and threads) is flat under any steady load, however busy. A leak shows as an excess that
never falls and has grown by a clear margin across the whole window while the session count
has not grown.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW = 6  # monitoring intervals (30 s at the default 5 s)
MIN_GROWTH = 20  # tasks+threads: below this a "leak" is noise
MIN_RATIO = 0.2  # ... and at least this fraction of where the window started


@dataclass(frozen=True)
class Point:
    tasks: int  # asyncio tasks + threads
    sessions: int

    @property
    def excess(self) -> int:
        return self.tasks - self.sessions


def suspect(points: Sequence[Point], floor: int, window: int = WINDOW) -> bool:
    """True when `points` (oldest first) show a leak whose excess passes `floor`."""
    if len(points) < window:
        return False
    pts = points[-window:]
    excess = [p.excess for p in pts]
    if any(b < a for a, b in itertools.pairwise(excess)):
        return False  # fell at some point: churn, not a leak
    growth = excess[-1] - excess[0]
    if growth < max(MIN_GROWTH, MIN_RATIO * max(excess[0], 0)):
        return False
    if pts[-1].sessions > pts[0].sessions:
        return False  # load is ramping up; tasks may legitimately follow it
    return excess[-1] >= floor


class LeakDetector:
    """Feed one point per monitoring interval; `observe` says when to warn (once per leak)."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.points: deque[Point] = deque(maxlen=window)
        self._floor = 0  # excess a new warning must reach: re-arms only on further growth

    def observe(self, tasks: int, sessions: int) -> bool:
        self.points.append(Point(tasks, sessions))
        if suspect(list(self.points), self._floor, self.window):
            # A leak that goes on warns again only after a whole new window of growth.
            self._floor = self.points[-1].excess + MIN_GROWTH
            self.points.clear()
            return True
        if self._floor and self.points[-1].excess < self._floor - 2 * MIN_GROWTH:
            self._floor = 0  # the excess fell well below the warned level: a new leak warns again
        return False


def describe_tasks(limit: int = 5) -> str:
    """The most common coroutines (and thread stack tops): "name x count, ..."."""
    counts: collections.Counter[str] = collections.Counter()
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        tasks = set()
    for task in tasks:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", None) or type(coro).__name__
        counts[f"task {name}"] += 1
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        top = frame.f_code.co_qualname if frame is not None else "?"
        counts[f"thread {top}"] += 1
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common(limit))
