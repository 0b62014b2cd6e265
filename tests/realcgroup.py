"""A real memory cgroup for tests (cgroup v1 or v2), and a ballast process that fills it.

This machine is hybrid (the memory controller on v1); Debian 12 and 13 run pure cgroup v2 by
default, and the VM system test (tests/system/) runs these tests there. v1 is used when the
memory controller is mounted there, else v2: a child of our own v2 cgroup with the memory
controller enabled in our `cgroup.subtree_control`. v2's "no internal processes" rule forbids
that while our cgroup holds processes (unless it is the root), so they are first moved into a
leaf child, `elemta-test-runner` (run the tests in a delegated scope, e.g.
`systemd-run --scope -p Delegate=yes pytest ...`, to keep that inside a subtree of their own).

ELEMTA_REQUIRE_REAL_CGROUP=1 turns the skip (no root, no memory controller) into a failure:
the VM sets it, so a skip can never hide these tests on the systems users run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from elemta.memory.cgroup import parse_keyed, reclaimable_file

MiB = 1024 * 1024
V1_MEMORY = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")  # the unified hierarchy on a pure v2 host
RUNNER_LEAF = "elemta-test-runner"
REQUIRE_ENV = "ELEMTA_REQUIRE_REAL_CGROUP"


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup, with the file names of its hierarchy's version."""

    path: Path
    version: int

    @property
    def source(self) -> str:
        """How elemta names this limit in its logs and /api/stats ("cgroup-v1"/"cgroup-v2")."""
        return f"cgroup-v{self.version}"

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def working_set(self) -> int:
        """Usage minus the clean page cache, the figure elemta reads (its own definition)."""
        usage = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        stat = parse_keyed((self.path / "memory.stat").read_text())
        return int((self.path / usage).read_text()) - reclaimable_file(stat, self.version)

    def limit(self) -> int:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        return int((self.path / name).read_text())

    def _events(self) -> dict[str, int]:
        if self.version == 1:
            lines = (self.path / "memory.oom_control").read_text().splitlines()
        else:
            lines = (self.path / "memory.events").read_text().splitlines()
        return {k: int(v) for k, _, v in (ln.partition(" ") for ln in lines) if v.isdigit()}

    def oom_kills(self) -> int:
        return self._events().get("oom_kill", 0)

    def limit_hits(self) -> int:
        """How often usage reached the limit (v1 memory.failcnt, v2 memory.events max)."""
        if self.version == 1:
            return int((self.path / "memory.failcnt").read_text())
        return self._events().get("max", 0)


# Allocates (and touches) memory in the cgroup given as argv[1] (version argv[2]) until its
# working set passes argv[3] (a fraction of the limit), prints "ready", and keeps it there until
# stdin closes: the kernel deactivates and reclaims the cgroup's file pages under the limit, and
# the working set (usage - clean page cache, as elemta counts it) would sink below the target,
# so it tops up.
BALLAST = r"""
import select, sys
from pathlib import Path
from elemta.memory.cgroup import parse_keyed, reclaimable_file
cg, v1, target = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
limit = int((cg / ("memory.limit_in_bytes" if v1 else "memory.max")).read_text())
def ws():
    usage = int((cg / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
    stat = parse_keyed((cg / "memory.stat").read_text())
    return usage - reclaimable_file(stat, 1 if v1 else 2)
held = []
def fill():
    while ws() < target * limit:
        held.append(b"\x01" * (2 << 20))
fill()
print("ready", ws(), flush=True)
while not select.select([sys.stdin], [], [], 0.05)[0]:
    fill()
"""


def own_v1_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = V1_MEMORY / path.lstrip("/")
            return d if d.is_dir() else None
    return None


def _words(path: Path) -> list[str]:
    return path.read_text().split()


def v2_memory_parent() -> Path | str:
    """Our own v2 cgroup, made able to hold memory-limited children; or why it cannot be."""
    if not (V2_ROOT / "cgroup.controllers").is_file():
        return f"no cgroup v2 hierarchy at {V2_ROOT} (hybrid hosts with v2 elsewhere have no memory there)"
    rel = next((ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                if ln.startswith("0::")), None)
    if rel is None:
        return "no cgroup v2 entry in /proc/self/cgroup"
    own = V2_ROOT / rel.lstrip("/")
    if own.name == RUNNER_LEAF:  # an earlier test already moved us here
        own = own.parent
    if "memory" not in _words(own / "cgroup.controllers"):
        return f"the memory controller is not delegated to {own} (cgroup.controllers)"
    if "memory" not in _words(own / "cgroup.subtree_control"):
        if own != V2_ROOT and _words(own / "cgroup.procs"):
            # No internal processes: a cgroup that distributes a controller holds none itself.
            leaf = own / RUNNER_LEAF
            leaf.mkdir(exist_ok=True)
            for pid in _words(own / "cgroup.procs"):
                with contextlib.suppress(ProcessLookupError):
                    (leaf / "cgroup.procs").write_text(pid)
        try:
            (own / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            return f"cannot enable memory in {own}/cgroup.subtree_control: {exc}"
    return own


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but no real memory cgroup: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def memory_cgroup(limit: int = 256 * MiB) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup with `limit` under our own (v1 if the memory controller is
    there, else v2); every process in it is killed and the cgroup removed afterwards."""
    if os.geteuid() != 0:
        _unavailable("needs root to create a memory cgroup")
    v1 = own_v1_memory_cgroup()
    if v1 is not None:
        cg = MemoryCgroup(v1 / f"elemta-test-{uuid.uuid4().hex[:8]}", 1)
        cg.path.mkdir()
        limit_file = "memory.limit_in_bytes"
    else:
        parent = v2_memory_parent()
        if isinstance(parent, str):
            _unavailable(parent)
        cg = MemoryCgroup(parent / f"elemta-test-{uuid.uuid4().hex[:8]}", 2)
        cg.path.mkdir()
        limit_file = "memory.max"
    try:
        (cg.path / limit_file).write_text(str(limit))
        if cg.version == 2:  # as v1's limit_in_bytes: memory only, no swap behind it
            with contextlib.suppress(OSError):
                (cg.path / "memory.swap.max").write_text("0")
        yield cg
    finally:
        for _ in range(50):
            for pid in _words(cg.procs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                cg.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)  # killed processes leave the cgroup asynchronously


@pytest.fixture
def real_cgroup() -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup (v1 or v2) limited to 256 MiB under our own; removed afterwards."""
    with memory_cgroup(256 * MiB) as cg:
        yield cg


def join(cg: MemoryCgroup) -> Callable[[], None]:
    def preexec() -> None:
        cg.procs.write_text(str(os.getpid()))

    return preexec


@contextlib.contextmanager
def ballast(cg: MemoryCgroup, fraction: float = 0.93) -> Iterator[int]:
    """A process in `cg` holding memory until the working set passes `fraction` of the limit."""
    proc = subprocess.Popen([sys.executable, "-c", BALLAST, str(cg.path), str(cg.version),
                             str(fraction)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=join(cg))
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("ready"), ready
        yield int(ready.split()[1])
    finally:
        proc.stdin.close()
        proc.wait(20)


def oom_kills(cg: MemoryCgroup) -> int:
    return cg.oom_kills()
