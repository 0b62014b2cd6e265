"""A fresh ext4 filesystem for each server under test, so every one stores on equal terms.

On this machine's long-lived root ext4, creating a file costs 0.02 to 1 ms of kernel time
depending on which block group its directory landed in; the same server's throughput moved by
2x between runs for that reason alone. A new filesystem of the same size on a loop device (on
the same disk: fsync still reaches it) gives every server the same empty, unfragmented start.

Needs root, mkfs.ext4 and loop devices; otherwise `fresh_dir` yields a plain directory under
$ELEMTA_BENCH_DIR (default /var/tmp) and says so once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SIZE = "8G"  # sparse: only what is written takes space
_warned = False


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("mkfs.ext4") is not None and Path("/dev/loop-control").exists()


@contextlib.contextmanager
def fresh_dir() -> Iterator[Path]:
    """A directory on a just-made ext4 (or a plain temp dir when that is not possible)."""
    global _warned
    base = Path(os.environ.get("ELEMTA_BENCH_DIR", "/var/tmp"))
    if not available():
        if not _warned:
            print("freshfs: not root or no mkfs.ext4/loop devices: servers share", base)
            _warned = True
        yield base
        return
    work = Path(tempfile.mkdtemp(prefix="elemta-benchfs-", dir=base))
    work.chmod(0o755)  # Postfix's queue below must be reachable by the postfix user
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        _run("truncate", "-s", SIZE, str(image))
        # Inode tables and journal written now, not by a background thread during the run.
        _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
        _run("mount", "-o", "loop", str(image), str(mnt))
        mounted = True
        mnt.chmod(0o755)
        yield mnt
    finally:
        if mounted:
            _unmount(mnt)
        shutil.rmtree(work, ignore_errors=True)


def _unmount(mnt: Path) -> None:
    """Unmount; a server process still exiting may hold it for a moment, then detach lazily."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    _run("umount", "-l", str(mnt))


@contextlib.contextmanager
def spool_on_fresh_fs() -> Iterator[Path]:
    """$ELEMTA_BENCH_DIR pointed at a fresh filesystem (`fresh_dir`) for the servers started inside."""
    before = os.environ.get("ELEMTA_BENCH_DIR")
    with fresh_dir() as where:
        os.environ["ELEMTA_BENCH_DIR"] = str(where)
        try:
            yield where
        finally:
            if before is None:
                os.environ.pop("ELEMTA_BENCH_DIR", None)
            else:
                os.environ["ELEMTA_BENCH_DIR"] = before
