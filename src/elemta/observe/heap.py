"""Heap profile for /debug/pprof/heap: tracemalloc's top allocations by traceback, as text.

tracemalloc is started only when [api] enable_profiling is true, so profiling costs nothing
when it is off. `diff` compares with the snapshot the previous request took.
"""

from __future__ import annotations

import threading
import tracemalloc

FRAMES = 25
DEFAULT_TOP = 25
MAX_TOP = 500

_IGNORE = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


class HeapProfiler:
    def __init__(self) -> None:
        self._previous: tracemalloc.Snapshot | None = None
        self._lock = threading.Lock()

    @staticmethod
    def start() -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)

    def report(self, top: int = DEFAULT_TOP, diff: bool = False) -> str:
        top = max(1, min(top, MAX_TOP))
        with self._lock:
            snap = tracemalloc.take_snapshot().filter_traces(_IGNORE)
            previous, self._previous = self._previous, snap
        current, peak = tracemalloc.get_traced_memory()
        lines = [
            f"# elemta heap profile (tracemalloc, {tracemalloc.get_traceback_limit()} frames)",
            f"# traced: {current} bytes now, {peak} bytes peak; top {top} by traceback"
            + (" (difference since the previous request)" if diff and previous else ""),
        ]
        if diff and previous is not None:
            for d in snap.compare_to(previous, "traceback")[:top]:
                lines.append("")
                lines.append(f"{d.size_diff:+d} bytes ({d.size} now) in {d.count_diff:+d} blocks "
                             f"({d.count} now)")
                lines.extend("  " + line for line in d.traceback.format())
        else:
            if diff:
                lines.append("# no previous snapshot: full profile follows")
            for s in snap.statistics("traceback")[:top]:
                lines.append("")
                lines.append(f"{s.size} bytes in {s.count} blocks")
                lines.extend("  " + line for line in s.traceback.format())
        return "\n".join(lines) + "\n"
