"""One Sample of everything the governor weighs: process RSS, cgroup figures, host RAM, PSI.

The sampler only measures; what the figures mean (which limit binds, the utilization) is the
governor's decision. Missing or unreadable cgroup files degrade to process and host figures with
one `memory_source_unavailable` warning, never an exception.
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


@dataclass(frozen=True)
class Sample:
    taken_at: float  # time.monotonic()
    wall_time: float  # time.time()
    process_rss: int  # this process plus its children
    host_total: int  # MemTotal
    host_available: int  # MemAvailable
    cgroup: CgroupFigures | None
    pressure: Pressure | None


class Sampler:
    def __init__(self, root: Path = Path("/"), tree_root: int | None = None):
        """`tree_root`: the supervisor's pid in a worker, so every process of the daemon sums
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
        self._meminfo = self._try_open(root / "proc/meminfo")
        self.pressure_path = self._pick_pressure()
        self._pressure = self._try_open(self.pressure_path) if self.pressure_path else None
        self._children_rss = 0

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

    def update_children(self) -> None:
        """Re-scan child processes (a /proc walk: done by the monitor, not per sample)."""
        me = os.getpid()
        try:
            if self.tree_root is None or self.tree_root == me:
                kids = psutil.Process().children(recursive=True)
            else:
                top = psutil.Process(self.tree_root)
                kids = [top, *top.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for kid in kids:
            if kid.pid == me:
                continue
            try:
                total += kid.memory_info().rss
            except psutil.Error:
                continue
        self._children_rss = total

    def process_rss(self) -> int:
        own = 0
        if self._statm is not None:
            try:
                own = int(self._statm.read().split()[1]) * PAGE_SIZE
            except (OSError, ValueError, IndexError):
                own = 0
        if own == 0:
            own = psutil.Process().memory_info().rss
        return own + self._children_rss

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
        return Sample(
            taken_at=time.monotonic(),
            wall_time=time.time(),
            process_rss=self.process_rss(),
            host_total=total,
            host_available=available,
            cgroup=figures,
            pressure=pressure,
        )

    def close(self) -> None:
        for f in (self._statm, self._meminfo, self._pressure):
            if f is not None:
                f.close()
        if self.cgroup is not None:
            self.cgroup.close()
