"""Heap profile for /debug/pprof/heap: tracemalloc's top allocations by traceback, as text
(or, for ?format=pprof, every allocation site as samples that pprof.py encodes).

tracemalloc is started only when [api] enable_profiling is true, so profiling costs nothing
when it is off. `diff` compares with the snapshot the previous request took. With [server]
workers > 1 the supervisor answers with every worker's own report (WorkerHeaps), since the
sessions and their memory live in the workers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .pprof import HeapSample

log = logging.getLogger("elemta.observe")

FRAMES = 25
DEFAULT_TOP = 25
MAX_TOP = 500
# The pprof format carries more sites than a text report is read for, but every site costs
# (a process that imported everything holds ~12000 tracebacks; all of them take ~30 s to
# collect and encode under tracemalloc), so it too is the largest `top`.
PPROF_TOP = 1000
PPROF_MAX_TOP = 5000

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


    def samples(self, top: int = PPROF_TOP) -> list[HeapSample]:
        """The `top` allocation sites (by traceback, largest first), for the pprof format."""
        with self._lock:
            snap = tracemalloc.take_snapshot().filter_traces(_IGNORE)
        stats = snap.statistics("traceback")[:max(1, min(top, PPROF_MAX_TOP))]
        return [HeapSample(tuple((f.filename, f.lineno) for f in reversed(st.traceback)),
                           st.size, st.count) for st in stats]


class HeapReport(Protocol):
    """What /debug/pprof/heap asks: this process's profile, or (supervisor) its workers'."""

    def start(self) -> None: ...

    def report(self, top: int = DEFAULT_TOP, diff: bool = False, worker: int | None = None) -> str:
        """ValueError (answered 400) for a worker that does not exist."""
        ...

    def profile(self, worker: int | None = None, top: int = PPROF_TOP) -> list[HeapSample]:
        """The samples of the pprof format (labelled by worker with workers); ValueError as
        report()."""
        ...


class SelfHeap(HeapProfiler):
    """The one-process daemon: it holds the sessions, so it profiles itself."""

    def report(self, top: int = DEFAULT_TOP, diff: bool = False, worker: int | None = None) -> str:
        if worker is not None:
            raise ValueError("worker=: this daemon runs no workers ([server] workers = 1)")
        return super().report(top, diff)

    def profile(self, worker: int | None = None, top: int = PPROF_TOP) -> list[HeapSample]:
        if worker is not None:
            raise ValueError("worker=: this daemon runs no workers ([server] workers = 1)")
        return self.samples(top)


# With workers the supervisor holds no sessions: it asks each worker for its own report. The
# worker's answer travels through a file in a private directory: the request (top, diff, a
# nonce) is written there, the worker gets SIGUSR1, writes its report under the nonce's name
# and renames it into place; the supervisor waits up to WORKER_TIMEOUT for it.
WORKER_TIMEOUT = 10.0
# A pprof answer lists up to PPROF_TOP sites with whole tracebacks: seconds on a busy machine.
PPROF_WORKER_TIMEOUT = 60.0
ASK = signal.SIGUSR1


def _request_path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.request"


def _answer_path(directory: Path, index: int, nonce: str) -> Path:
    return directory / f"worker-{index}-{nonce}.txt"


def answer_request(profiler: HeapProfiler, directory: Path, index: int) -> None:
    """In a worker, on ASK (off the event loop: a snapshot takes a while)."""
    try:
        request = json.loads(_request_path(directory, index).read_text())
        if request.get("format") == "samples":  # for the supervisor's pprof answer
            text = json.dumps([[s.frames, s.size, s.count]
                               for s in profiler.samples(int(request["top"]))])
        else:
            text = profiler.report(int(request["top"]), bool(request["diff"]))
        final = _answer_path(directory, index, str(request["nonce"]))
        tmp = final.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, final)
    except Exception:  # the supervisor reports "no answer"; the worker serves on
        log.exception("heap profile request failed")


class WorkerHeaps:
    """The supervisor's /debug/pprof/heap: one section per worker, each from that worker."""

    def __init__(self, directory: Path, workers: Callable[[], list[tuple[int, int]]],
                 timeout: float = WORKER_TIMEOUT) -> None:
        self.directory = directory
        self.workers = workers  # (index, pid) of every worker serving now
        self.timeout = timeout
        self._lock = threading.Lock()  # one request at a time: one request file per worker

    def start(self) -> None:
        """The supervisor's own allocations are not traced: it holds no sessions."""

    def _chosen(self, worker: int | None) -> list[tuple[int, int]]:
        running = self.workers()
        chosen = [(i, p) for i, p in running if worker is None or i == worker]
        if not chosen:
            raise ValueError(f"worker={worker}: no such worker serving now "
                             f"(serving: {', '.join(str(i) for i, _ in running) or 'none'})")
        return chosen

    def profile(self, worker: int | None = None, top: int = PPROF_TOP) -> list[HeapSample]:
        """Every worker's samples, labelled worker=N (a worker that does not answer in time
        is left out)."""
        chosen = self._chosen(worker)
        out: list[HeapSample] = []
        with self._lock:
            for index, pid in chosen:
                text = self._exchange(index, pid, {"format": "samples", "top": top,
                                                   "diff": False}, PPROF_WORKER_TIMEOUT)
                if text is None:
                    continue
                label = (("worker", str(index)),)
                out.extend(HeapSample(tuple((str(f), int(n)) for f, n in frames), int(size),
                                      int(count), label)
                           for frames, size, count in json.loads(text))
        return out

    def report(self, top: int = DEFAULT_TOP, diff: bool = False, worker: int | None = None) -> str:
        chosen = self._chosen(worker)
        head = (f"# elemta heap profile of {len(chosen)} worker process(es), one section each; "
                f"the supervisor (pid {os.getpid()}) holds no sessions and is not profiled\n")
        with self._lock:
            return head + "".join(self._ask(i, p, top, diff) for i, p in chosen)

    def _ask(self, index: int, pid: int, top: int, diff: bool) -> str:
        title = f"\n## worker {index} (pid {pid})\n"
        try:
            text = self._exchange(index, pid, {"top": max(1, min(top, MAX_TOP)), "diff": diff})
        except ProcessLookupError:
            return title + "# the worker exited before it could answer\n"
        if text is None:
            return title + f"# no answer within {self.timeout:.0f}s\n"
        return title + text

    def _exchange(self, index: int, pid: int, request: dict[str, object],
                  timeout: float | None = None) -> str | None:
        """Ask one worker (see above); None without an answer in time; ProcessLookupError
        when the worker is gone."""
        for stale in self.directory.glob(f"worker-{index}-*"):
            stale.unlink(missing_ok=True)  # a late answer to a request that timed out
        nonce = uuid.uuid4().hex
        path = _request_path(self.directory, index)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**request, "nonce": nonce}))
        os.replace(tmp, path)
        answer = _answer_path(self.directory, index, nonce)
        os.kill(pid, ASK)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not answer.exists():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)  # this is the admin HTTP thread, never the event loop
        text = answer.read_text()
        answer.unlink()
        return text
