"""One Sample of everything the governor weighs: elemta's processes, cgroup figures, host RAM, PSI.

The sampler only measures; what the figures mean (which limit binds, the utilization) is the
governor's decision. Missing or unreadable cgroup files degrade to process and host figures with
one `memory_source_unavailable` warning, never an exception.

Process figures. With workers, pages shared after fork would be counted once per process if RSS
were summed, so elemta's own memory is the PSS of its processes (each shared page split among
the processes mapping it). PSS comes from /proc/PID/smaps_rollup, which the kernel builds by
walking every mapping: about 0.25 ms per worker-sized process against ~1 us for statm (a whole
admission sample, cgroup and meminfo parsing included, costs ~75 us; a rescan of a supervisor
and 4 workers ~2.5 ms, measured on a loaded 2-CPU machine). So the monitor (`rescan`) reads
smaps_rollup of every process of the daemon; the samples admission questions take in between
re-read only this process's statm and add its RSS change since that rescan.

Own cgroup. When every process in the memory cgroup (and its sub-cgroups) belongs to the
daemon's process tree (supervisor and workers: a systemd service's cgroup, a container), the
cgroup's working set is elemta's own memory, kernel memory and page tables included; the
monitor re-checks it with each rescan.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..events import emit
from .cgroup import CgroupReader, CgroupUnavailable, OpenFile, locate, parse_keyed, parse_pressure
from .snapshot import CgroupFigures, Pressure

log = logging.getLogger("elemta.memory")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_SUBGROUPS = 256  # sub-cgroups looked at when checking the cgroup is the daemon's own


@dataclass(frozen=True)
class Sample:
    taken_at: float  # time.monotonic()
    wall_time: float  # time.time()
    process_rss: int  # RSS summed over the daemon's processes
    process_pss: int  # PSS summed over the daemon's processes (shared pages once)
    host_total: int  # MemTotal
    host_available: int  # MemAvailable
    cgroup: CgroupFigures | None
    cgroup_own: bool  # the cgroup holds only the daemon's processes
    pressure: Pressure | None


def parse_pss(text: str) -> int | None:
    """Bytes of `Pss:` in smaps_rollup text; None when absent."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def descendants(pid: int) -> list[int] | None:
    """Every descendant of `pid`, from /proc/PID/task/TID/children: a read per thread of the
    daemon's processes instead of one per process on the host. None where the kernel has no
    such file (CONFIG_PROC_CHILDREN)."""
    if not _HAS_CHILDREN:
        return None
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # exited meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


_HAS_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _statm_rss(text: str) -> int:
    return int(text.split()[1]) * PAGE_SIZE


class Sampler:
    def __init__(self, root: Path = Path("/"), tree_root: int | None = None):
        """`tree_root`: the supervisor's pid in a worker, so every process of the daemon weighs
        the same tree (supervisor plus all workers); None: this process and its children."""
        self.root = root
        self.tree_root = tree_root
        self.cgroup: CgroupReader | None = None
        self.unavailable: str | None = None  # why cgroup figures are missing, once warned
        try:
            self.cgroup = CgroupReader(locate(root))
        except CgroupUnavailable as exc:
            self._give_up(str(exc))
        self._statm = self._try_open(root / "proc/self/statm")
        self._rollup = self._try_open(root / "proc/self/smaps_rollup")
        self._meminfo = self._try_open(root / "proc/meminfo")
        self.pressure_path = self._pick_pressure()
        self._pressure = self._try_open(self.pressure_path) if self.pressure_path else None
        self._scanned = False
        self._others_rss = 0  # the other processes of the daemon, at the last rescan
        self._tree_pss = 0  # every process of the daemon (this one included), at the last rescan
        self._own_rss_at_scan = 0
        self._cgroup_own = False

    @staticmethod
    def _try_open(path: Path) -> OpenFile | None:
        try:
            return OpenFile(path)
        except OSError:
            return None

    def _pick_pressure(self) -> Path | None:
        own = self.cgroup.pressure_path if self.cgroup else None
        if own is not None:
            return own
        system = self.root / "proc/pressure/memory"
        return system if system.exists() else None

    def _give_up(self, reason: str) -> None:
        if self.cgroup is not None:
            self.cgroup.close()
            self.cgroup = None
        if self.unavailable is None:
            self.unavailable = reason
            emit(log, "memory_source_unavailable",
                 f"Cgroup memory figures unavailable ({reason}): using process figures only",
                 reason=reason)

    # -- the monitor's rescan -------------------------------------------------------------------
    def _others(self) -> list[int]:
        """The daemon's other processes. A fake root has none."""
        if self.root != Path("/"):
            return []
        me = os.getpid()
        top = me if self.tree_root is None else self.tree_root
        tree = descendants(top)
        if tree is None:  # no /proc/PID/task/TID/children: walk all of /proc (psutil)
            try:
                proc = psutil.Process(top)
                tree = [p.pid for p in proc.children(recursive=True)]
            except psutil.Error:
                return []
        return [p for p in ([top, *tree] if top != me else tree) if p != me]

    def rescan(self) -> None:
        """Re-read every process of the daemon (RSS and PSS) and whether the cgroup is its own."""
        own_rss = self._own_rss()
        own_pss = self._own_pss(own_rss)
        others = self._others()
        rss = pss = 0
        for pid in others:
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    r = _statm_rss(f.read().decode())
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            rss += r
            pss += self._pss_of(pid, r)
        self._others_rss, self._tree_pss = rss, own_pss + pss
        self._own_rss_at_scan = own_rss
        self._cgroup_own = self._is_own_cgroup({os.getpid(), *others})
        self._scanned = True

    @staticmethod
    def _pss_of(pid: int, rss: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                pss = parse_pss(f.read().decode("ascii", "replace"))
        except OSError:
            pss = None
        return rss if pss is None else pss  # no smaps_rollup (kernel < 4.14): RSS

    def _own_pss(self, own_rss: int) -> int:
        if self._rollup is not None:
            try:
                pss = parse_pss(self._rollup.read())
                if pss is not None:
                    return pss
            except (OSError, ValueError):
                pass
        return own_rss

    def _is_own_cgroup(self, pids: set[int]) -> bool:
        if self.cgroup is None:
            return False
        top = self.cgroup.location.directory
        seen = 0
        for directory, _, _ in os.walk(top):
            seen += 1
            if seen > MAX_SUBGROUPS:
                return False
            try:
                procs = (Path(directory) / "cgroup.procs").read_text().split()
            except OSError:
                return False
            if any(int(p) not in pids for p in procs):
                return False
        return seen > 0

    # -- per sample -----------------------------------------------------------------------------
    def _own_rss(self) -> int:
        if self._statm is not None:
            try:
                own = _statm_rss(self._statm.read())
                if own > 0:
                    return own
            except (OSError, ValueError, IndexError):
                pass
        return int(psutil.Process().memory_info().rss)

    def process_rss(self) -> int:
        return self._own_rss() + self._others_rss

    def _host(self) -> tuple[int, int]:
        if self._meminfo is not None:
            try:
                info = parse_keyed(self._meminfo.read())
                total = info["MemTotal"] * 1024
                return total, info.get("MemAvailable", info.get("MemFree", 0)) * 1024
            except (OSError, KeyError):
                pass
        vm = psutil.virtual_memory()
        return vm.total, vm.available

    def sample(self) -> Sample:
        if not self._scanned:
            self.rescan()
        figures = None
        if self.cgroup is not None:
            try:
                figures = self.cgroup.read()
            except CgroupUnavailable as exc:
                self._give_up(str(exc))
        pressure = None
        if self._pressure is not None:
            try:
                pressure = parse_pressure(self._pressure.read())
            except (OSError, ValueError):
                pressure = None
        total, available = self._host()
        own_rss = self._own_rss()
        return Sample(
            taken_at=time.monotonic(),
            wall_time=time.time(),
            process_rss=own_rss + self._others_rss,
            # PSS as of the last rescan plus what this process grew (or shrank) since
            process_pss=max(0, self._tree_pss + own_rss - self._own_rss_at_scan),
            host_total=total,
            host_available=available,
            cgroup=figures,
            cgroup_own=figures is not None and self._cgroup_own,
            pressure=pressure,
        )

    def close(self) -> None:
        for f in (self._statm, self._rollup, self._meminfo, self._pressure):
            if f is not None:
                f.close()
        if self.cgroup is not None:
            self.cgroup.close()
