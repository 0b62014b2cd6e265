"""A real cgroup v1 memory cgroup for tests, and a ballast process that fills it.

On this machine the memory controller is cgroup v1 (hybrid layout); tests that need one skip
with a reason elsewhere (pure v2 hosts are covered by the VM system test).
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
from pathlib import Path

import pytest

MiB = 1024 * 1024
V1_MEMORY = Path("/sys/fs/cgroup/memory")

# Allocates (and touches) memory in the cgroup given as argv[1] until its working set passes
# argv[2] (a fraction of the limit), prints "ready", holds until stdin closes.
BALLAST = r"""
import sys
from pathlib import Path
cg, target = Path(sys.argv[1]), float(sys.argv[2])
limit = int((cg / "memory.limit_in_bytes").read_text())
def ws():
    usage = int((cg / "memory.usage_in_bytes").read_text())
    stat = dict(l.split() for l in (cg / "memory.stat").read_text().splitlines())
    return usage - int(stat["total_inactive_file"])
held = []
while ws() < target * limit:
    held.append(b"\x01" * (2 << 20))
print("ready", ws(), flush=True)
sys.stdin.read()
"""


def own_v1_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = V1_MEMORY / path.lstrip("/")
            return d if d.is_dir() else None
    return None



@contextlib.contextmanager
def v1_memory_cgroup(limit: int = 256 * MiB) -> Iterator[Path]:
    """A fresh v1 memory cgroup with `limit`, under our own; every process in it is killed
    and the cgroup removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    parent = own_v1_memory_cgroup()
    if parent is None:
        pytest.skip("no cgroup v1 memory controller here (pure v2 hosts: see the VM tests)")
    cg = parent / f"elemta-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        yield cg
    finally:
        for _ in range(50):
            pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)




@pytest.fixture
def v1_cgroup() -> Iterator[Path]:
    """A fresh v1 memory cgroup limited to 256 MiB under our own; removed afterwards."""
    with v1_memory_cgroup(256 * MiB) as cg:
        yield cg


def join(cg: Path) -> Callable[[], None]:
    def preexec() -> None:
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    return preexec


@contextlib.contextmanager
def ballast(cg: Path, fraction: float = 0.93) -> Iterator[int]:
    """A process in `cg` holding memory until the working set passes `fraction` of the limit."""
    proc = subprocess.Popen([sys.executable, "-c", BALLAST, str(cg), str(fraction)],
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


def oom_kills(cg: Path) -> int:
    for line in (cg / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


