"""This process's memory cgroup: where it is and what it says, read over a root path.

Everything takes a `root` (normally "/"), so a fake tree in a temp dir stands in for /proc and
/sys in tests. Parsing is pure; reading keeps file descriptors open and re-reads them with
os.pread, which costs about a microsecond per file instead of ~25 us for open+read+close, so a
fresh sample on every admission question stays cheap.

Layouts: pure cgroup v2, pure v1, and hybrid (v2 mounted but the memory controller on v1). When
a v1 memory hierarchy is mounted and /proc/self/cgroup names a memory cgroup, v1 wins: that is
where the kernel charges this process's memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .snapshot import CgroupFigures, Pressure

# v1 says "no limit" with PAGE_COUNTER_MAX * page size (9223372036854771712 on 4 KiB pages,
# other values on other page sizes); anything this large is no limit at all.
UNLIMITED_FROM = 1 << 60
READ_SIZE = 1 << 16


class CgroupUnavailable(Exception):
    """The cgroup's memory figures cannot be read; the message says why, for the operator."""


@dataclass(frozen=True)
class Mount:
    root: str  # the path inside the hierarchy that is mounted (cgroup namespaces: not always /)
    mountpoint: str
    fstype: str
    super_options: frozenset[str]


@dataclass(frozen=True)
class Location:
    version: int  # 1 or 2
    path: str  # as /proc/self/cgroup names it
    directory: Path  # the cgroup's directory (under root)
    top: Path  # the mount point: walking up for limits stops here


# -- pure parsers -------------------------------------------------------------------------------

def parse_proc_cgroup(text: str, controller: str = "memory") -> tuple[str | None, str | None]:
    """(v1 `controller` cgroup path, v2 cgroup path) from /proc/self/cgroup; None when absent."""
    v1: str | None = None
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif controller in controllers.split(","):
            v1 = path
    return v1, v2


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        mounts.append(
            Mount(_unescape(lf[3]), _unescape(lf[4]), rf[0], frozenset(rf[2].split(",")))
        )
    return mounts


def parse_limit(text: str) -> int | None:
    """A limit file's value: None for v2 "max" and v1's huge sentinel."""
    value = text.strip()
    if value == "max":
        return None
    n = int(value)
    return None if n >= UNLIMITED_FROM else n


_KEYED = re.compile(r"^([\w()]+):?[ \t]+(\d+)", re.MULTILINE)


def parse_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.events, memory.oom_control, /proc/meminfo)."""
    return {k: int(v) for k, v in _KEYED.findall(text)}


def parse_pressure(text: str) -> Pressure:
    """PSI text ("some avg10=0.00 avg60=... total=N" and "full ...")."""
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        rows[kind] = dict(p.split("=", 1) for p in pairs if "=" in p)
    some, full = rows.get("some", {}), rows.get("full", {})
    return Pressure(
        some_avg10=float(some.get("avg10", 0.0)),
        full_avg10=float(full.get("avg10", 0.0)),
        some_total_us=int(some.get("total", 0)),
        full_total_us=int(full.get("total", 0)),
    )


# memory.stat names of the page cache figures, v2 then v1 (v1's total_* include sub-cgroups).
_FILE_KEYS = {
    2: ("file", "file_dirty", "file_writeback", "shmem", "file_mapped"),
    1: ("total_cache", "total_dirty", "total_writeback", "total_shmem", "total_mapped_file"),
}


def reclaimable_file(stat: dict[str, int], version: int) -> int:
    """The cgroup's page cache the kernel can drop at once, before it would OOM-kill anyone.

    Clean file pages that no process maps: not dirty or under writeback (they must reach the disk
    first), not shmem/tmpfs (no disk behind them), not mapped (dropping the interpreter's own
    code only makes it fault back in). Whether a page sits on the active or the inactive list
    does not matter: Linux 6.x's multi-generational LRU reports fresh pages as active and, under a
    bare memory.max, nothing ages them, so "usage - inactive_file" kept counting the mail the
    spool had just written as elemta's memory.
    """
    file, dirty, writeback, shmem, mapped = (stat.get(k, 0) for k in _FILE_KEYS[version])
    return max(0, file - dirty - writeback - shmem - mapped)


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def _relative(path: str, mount_root: str) -> str:
    """`path` inside a mount of `mount_root`; with a cgroup namespace the path is already relative."""
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        return path[len(mount_root):]
    return path


def locate(root: Path = Path("/"), controller: str = "memory") -> Location:
    """Find this process's cgroup for `controller`; raises CgroupUnavailable saying why not."""
    try:
        cg_text = (root / "proc/self/cgroup").read_text()
        mi_text = (root / "proc/self/mountinfo").read_text()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self/cgroup or mountinfo: {exc.strerror}") from None
    v1_path, v2_path = parse_proc_cgroup(cg_text, controller)
    mounts = parse_mountinfo(mi_text)
    if v1_path is not None:
        for m in mounts:
            if m.fstype == "cgroup" and controller in m.super_options:
                top = _under(root, m.mountpoint)
                return Location(1, v1_path, _join(top, _relative(v1_path, m.root)), top)
        raise CgroupUnavailable(f"/proc/self/cgroup names a v1 {controller} cgroup but none is mounted")
    if v2_path is not None:
        for m in mounts:
            if m.fstype == "cgroup2":
                top = _under(root, m.mountpoint)
                directory = _join(top, _relative(v2_path, m.root))
                if controller not in _controllers(top):
                    continue
                return Location(2, v2_path, directory, top)
        raise CgroupUnavailable(f"no cgroup v2 mount with the {controller} controller")
    raise CgroupUnavailable(f"/proc/self/cgroup names no {controller} cgroup")


def _join(top: Path, relative: str) -> Path:
    rel = relative.strip("/")
    return top / rel if rel else top


def _controllers(top: Path) -> set[str]:
    try:
        return set((top / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def ancestors(location: Location) -> list[Path]:
    """The cgroup's directory and each parent up to the mount point, leaf first."""
    out = [location.directory]
    d = location.directory
    while d != location.top and d.parent != d and location.top in d.parents:
        d = d.parent
        out.append(d)
    return out


# -- cheap re-reads -----------------------------------------------------------------------------

class OpenFile:
    """A file kept open and re-read from offset 0 with pread (one syscall per read)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> str:
        return os.pread(self.fd, READ_SIZE, 0).decode("ascii", "replace")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(path: Path, what: str) -> OpenFile:
    try:
        return OpenFile(path)
    except OSError as exc:
        raise CgroupUnavailable(f"cannot open {what} {path}: {exc.strerror}") from None


def _open_optional(paths: Iterable[Path]) -> list[OpenFile]:
    out = []
    for p in paths:
        try:
            out.append(OpenFile(p))
        except OSError:
            continue
    return out


class CgroupReader:
    """Reads one cgroup's memory figures; the limit is the lowest on the way up to the mount."""

    def __init__(self, location: Location):
        self.location = location
        d = location.directory
        opened: list[OpenFile] = []
        try:
            if location.version == 2:
                self._current = _open(d / "memory.current", "cgroup v2 usage")
                opened.append(self._current)
                self._stat = _open(d / "memory.stat", "cgroup v2 stats")
                opened.append(self._stat)
                limit_names: tuple[str, ...] = ("memory.max", "memory.high")
                self._events = _open_optional([d / "memory.events"])
            else:
                self._current = _open(d / "memory.usage_in_bytes", "cgroup v1 usage")
                opened.append(self._current)
                self._stat = _open(d / "memory.stat", "cgroup v1 stats")
                opened.append(self._stat)
                limit_names = ("memory.limit_in_bytes",)
                self._events = _open_optional([d / "memory.failcnt", d / "memory.oom_control"])
        except CgroupUnavailable:
            for f in opened:
                f.close()
            raise
        # A parent without the file (v2 root) simply does not limit.
        self._limits = _open_optional(a / n for a in ancestors(location) for n in limit_names)
        self._pressure_path = d / "memory.pressure" if location.version == 2 else None

    def read(self) -> CgroupFigures:
        try:
            current = int(self._current.read().strip())
            stat = parse_keyed(self._stat.read())
            limit = self._lowest_limit(stat)
            events: dict[str, int] = {}
            for f in self._events:
                if f.path.name == "memory.failcnt":
                    events["failcnt"] = int(f.read().strip())
                else:
                    events.update(parse_keyed(f.read()))
        except (OSError, ValueError) as exc:
            raise CgroupUnavailable(f"cannot read {self.location.directory}: {exc}") from None
        reclaimable = reclaimable_file(stat, self.location.version)
        return CgroupFigures(
            version=self.location.version,
            path=self.location.path,
            current=current,
            limit=limit,
            working_set=max(0, current - reclaimable),
            reclaimable_file=reclaimable,
            events=events,
        )

    def _lowest_limit(self, stat: dict[str, int]) -> int | None:
        found = [parse_limit(f.read()) for f in self._limits]
        if "hierarchical_memory_limit" in stat:
            # v1 also reports the lowest limit above us, even beyond a namespaced mount root.
            found.append(parse_limit(str(stat["hierarchical_memory_limit"])))
        limits = [x for x in found if x is not None]
        return min(limits) if limits else None

    @property
    def pressure_path(self) -> Path | None:
        """The cgroup's own PSI file (v2 only), when it exists."""
        p = self._pressure_path
        return p if p is not None and p.exists() else None

    def close(self) -> None:
        for f in (self._current, self._stat, *self._events, *self._limits):
            f.close()
