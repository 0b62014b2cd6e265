"""The memory governor in a real daemon: a real memory cgroup (v1 or v2) with a ballast process, and
real SMTP traffic pushing a small max_memory_usage over each threshold."""

from __future__ import annotations

import re
import resource
import socket
import time
from pathlib import Path

import pytest

from daemon import Daemon, running
from realcgroup import MemoryCgroup, ballast, join, oom_kills

MiB = 1024 * 1024
STORAGE = b"452 4.3.1 Insufficient system storage"

def pss_of(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.makefile("rb").readline()


class Session:
    """A raw SMTP session: one command, one (last) reply line."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.file = self.sock.makefile("rb")
        self.banner = self.file.readline()

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        while True:
            reply = self.file.readline()
            if reply[3:4] != b"-":
                return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.mark.root
@pytest.mark.slow
def test_real_cgroup_limit_ballast_and_recovery(tmp_path: Path, real_cgroup: MemoryCgroup) -> None:
    cg = real_cgroup
    oom_kills_before = oom_kills(cg)
    with running(tmp_path / "d", preexec_fn=join(cg)) as d:
        d.wait_for_log(f"memory limit 256.0 MiB ({cg.source})")
        assert str(d.proc.pid) in cg.procs.read_text().split()
        assert d.send("a@example.test") == {}
        idle = Session(d.port)
        assert idle.cmd("EHLO client.test").startswith(b"250")

        with ballast(cg) as working_set:
            assert working_set > 0.9 * 256 * MiB
            assert greeting(d.port).startswith(STORAGE)
            assert idle.cmd("MAIL FROM:<s@example.org>").startswith(b"452 4.3.1")
            d.wait_for_log("Memory critical threshold exceeded")
            assert f"({cg.source})" in _lines(d, "Memory critical threshold exceeded")[0]
            assert d.proc.poll() is None

        # The ballast is gone: the next sample sees it; mail flows again (the breaker, if
        # it opened, closes after its calm samples: bounded wait).
        deadline = time.monotonic() + 60
        while not greeting(d.port).startswith(b"220"):
            assert time.monotonic() < deadline, "still refusing after the ballast exited"
            time.sleep(0.2)
        assert idle.cmd("MAIL FROM:<s@example.org>").startswith(b"250")
        idle.close()
        assert d.send("b@example.test") == {}
        assert len(d.delivered("b@example.test")) == 1
        assert d.proc.poll() is None
        assert oom_kills(cg) == oom_kills_before
        d.wait_for_log("Memory back to normal")


@pytest.mark.root
@pytest.mark.slow
def test_real_cgroup_breaker_opens_holds_and_closes(tmp_path: Path, real_cgroup: MemoryCgroup) -> None:
    extra = '[memory]\nmonitoring_interval = "100ms"\n'
    with running(tmp_path / "d", extra, preexec_fn=join(real_cgroup)) as d:
        d.wait_for_log(f"memory limit 256.0 MiB ({real_cgroup.source})")
        with ballast(real_cgroup):
            d.wait_for_log("Circuit breaker opened")
            assert greeting(d.port).startswith(STORAGE)
        # Memory is back at once, the breaker is not: it waits for calm samples, lets a few
        # connections through half-open, then closes.
        d.wait_for_log("Memory back to normal")
        d.wait_for_log("Circuit breaker closed", timeout=30)
        log = d.log
        assert log.index("Circuit breaker opened") < log.index("circuit breaker half-open") < log.index(
            "Circuit breaker closed")
        assert greeting(d.port).startswith(b"220")
        assert d.send("c@example.test") == {}


@pytest.mark.root
@pytest.mark.slow
def test_real_cgroup_protection_off_logs_but_accepts(tmp_path: Path, real_cgroup: MemoryCgroup) -> None:
    extra = "[memory]\nmemory_exhaustion_protection = false\n"
    with running(tmp_path / "d", extra, preexec_fn=join(real_cgroup)) as d:
        d.wait_for_log(f"memory limit 256.0 MiB ({real_cgroup.source})")
        d.wait_for_log("protection off (log only)")
        with ballast(real_cgroup):
            # The monitor (5 s interval) logs the crossing; admission never refuses.
            d.wait_for_log("Memory critical threshold exceeded", timeout=15)
            assert greeting(d.port).startswith(b"220")
            assert d.send("d@example.test") == {}
        assert "memory_exhaustion_protection = false: not refusing" in d.log
        assert "Would refuse" in d.log


def _lines(d: Daemon, text: str) -> list[str]:
    return [line for line in d.log.splitlines() if text in line]


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} file descriptors, the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.slow
def test_real_traffic_crosses_each_threshold(tmp_path: Path) -> None:
    _raise_fd_limit(8192)  # the client side holds up to a few thousand sessions
    # Calibrate: this daemon's resting memory after one message, on this machine, as the
    # governor counts it (PSS: the test's cgroup is not the daemon's own).
    with running(tmp_path / "calibrate", '[memory]\nmax_memory_usage = "1GiB"\n') as d:
        assert d.send("a@example.test") == {}
        resting = pss_of(d.proc.pid)
    # A budget the resting daemon fills to ~68%: every concurrent session (a few KiB each)
    # pushes it further, past warning (75%), gc (80%) and critical (90%).
    budget = int(resting / 0.68)
    extra = (f"[memory]\nmax_memory_usage = {budget}\nmonitoring_interval = \"200ms\"\n"
             "max_goroutines = 20000\nper_connection_memory_limit = \"1MiB\"\n"
             "[server]\nmax_connections = 5000\n")
    sessions: list[Session] = []
    with running(tmp_path / "d", extra) as d:
        d.wait_for_log(f"memory limit {budget / MiB:.1f} MiB (config)")
        early = Session(d.port)
        assert early.cmd("EHLO client.test").startswith(b"250")
        refused = None
        try:
            for _ in range(5000):
                s = Session(d.port)
                if s.banner.startswith(STORAGE):
                    refused = s.banner
                    s.close()
                    break
                assert s.banner.startswith(b"220"), s.banner
                sessions.append(s)
            assert refused is not None, f"never refused after {len(sessions)} sessions"
            # a session opened before the crossing may go on, but MAIL is refused now
            assert early.cmd("MAIL FROM:<s@example.org>").startswith(b"452 4.3.1")
            d.wait_for_log("Forced garbage collection")
        finally:
            for s in [early, *sessions]:
                s.close()
        log = d.log
    order = [log.find(t) for t in ("Memory warning threshold exceeded",
                                   "Memory critical threshold exceeded")]
    assert -1 not in order and order == sorted(order), log[-3000:]
    gc_line = _lines_in(log, "Forced garbage collection")[0]
    assert re.search(r"freed [\d.]+ MiB \(RSS [\d.]+ MiB -> [\d.]+ MiB\)", gc_line)
    warning = _lines_in(log, "Memory warning threshold exceeded")[0]
    assert re.search(r": process 7\d\.\d+% of [\d.]+ MiB \(binding\); elemta [\d.]+ MiB = "
                     r"7\d\.\d+% of [\d.]+ MiB \(config\)", warning), warning
    assert "Refused CONNECT: memory-critical" in log
    assert "Refused MAIL: memory-critical" in log


def _lines_in(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]
