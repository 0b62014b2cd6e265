"""Start-up cleans tmp/ as the Maildir convention allows: elemta's own leftovers, and any file
nobody has touched for 36 hours. Another writer's file in progress stays."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from daemon import running
from elemta.store.maildir import Maildir

HOUR = 3600


def elemta_name(pid: int, hostname: str = "mx.test") -> str:
    """A file name as elemta gives its spool files (time.Musec P pid Q counter _ queue id)."""
    return f"{int(time.time())}.M123456P{pid}Q7_0123456789AB.{hostname}"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def boot_time() -> float:
    return next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))


def test_start_up_removes_only_leftovers_and_abandoned_files(tmp_path: Path) -> None:
    tmp = tmp_path / "mail" / "example.test" / "user" / "tmp"
    for sub in ("tmp", "new", "cur"):
        (tmp.parent / sub).mkdir(parents=True)
    old = time.time() - 37 * HOUR
    files = {
        # Another program's files: kept while recent, removed once abandoned (36 h).
        "foreign_recent": ("1764460000.M5P4242.imap.example", None, True),
        "foreign_old": ("1764300000.M6P4243.imap.example", old, False),
        "foreign_almost_old": ("1764300001.M7P4244.imap.example", time.time() - 35 * HOUR, True),
        # elemta's leftovers: the process that wrote them is gone.
        "own_dead_writer": (elemta_name(dead_pid()), None, False),
        # elemta's name, but a live process holds that pid (maybe a second elemta on this
        # maildir): kept until abandoned.
        "own_live_writer": (elemta_name(os.getpid()), None, True),
        "own_live_writer_old": (elemta_name(os.getpid()).replace("Q7", "Q8"), old, False),
        # ...unless the file was last written before this boot (a power cut, a crash): pids
        # start again at boot, so the live process with that pid is not its writer.
        "own_before_boot": (elemta_name(os.getpid()).replace("Q7", "Q9"), boot_time() - 60, False),
        # Written by an elemta on another host (its hostname in the name): not ours to judge.
        "other_host": (elemta_name(dead_pid(), "mx2.test"), None, True),
    }
    for name, mtime, _ in files.values():
        (tmp / name).write_bytes(b"partial")
        if mtime is not None:
            os.utime(tmp / name, (mtime, mtime))
    with running(tmp_path) as d:  # returns once the daemon serves: tmp/ was cleaned before
        left = {p.name for p in tmp.iterdir()}
        wrong = {what for what, (name, _, kept) in files.items() if (name in left) != kept}
        assert wrong == set(), f"removed or kept wrongly: {sorted(wrong)}"
        assert "removed 4 stale file(s) from tmp/" in d.log, d.log


def test_a_leftover_with_the_starting_process_pid_is_removed(tmp_path: Path) -> None:
    """Pids repeat (a container's daemon is pid 1 every time): a file named with the pid of the
    process now starting was written by an earlier one, since this one has written nothing."""
    tmp = tmp_path / "example.test" / "user" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / elemta_name(os.getpid())).write_bytes(b"partial")
    assert Maildir(tmp_path, "mx.test").clean_tmp() == 1
    assert not list(tmp.iterdir())
