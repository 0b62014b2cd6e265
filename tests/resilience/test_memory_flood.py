"""Memory flood in a real cgroup: many concurrent big messages plus a ballast that pushes the
working set past critical. No OOM kill, answers throughout, every 250 intact, recovery.

`make test` runs a small flood (40 clients, 1-4 MiB); `make stress` the full one (200 clients,
5-20 MiB messages).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon import Daemon, running
from realcgroup import MemoryCgroup, ballast, join, oom_kills

STRESS = os.environ.get("ELEMTA_STRESS") == "1"
CLIENTS = 200 if STRESS else 40
SIZES_MIB = (5, 20) if STRESS else (1, 4)
HOLD = 8.0 if STRESS else 3.0
MiB = 1024 * 1024

LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-_=+*/%&#@\r\n"
BLOCK = LINE * (MiB // len(LINE))
BLOCK_STORED = BLOCK.replace(b"\r\n", b"\n")


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, str] = field(default_factory=dict)  # Message-ID -> sha256 of stored form
    replies: dict[str, int] = field(default_factory=dict)
    greetings: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1


def _reply(f: object) -> bytes:
    while True:
        line: bytes = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


def send_streamed(port: int, mid: str, mib: int, tally: Tally) -> None:
    """One message of `mib` MiB streamed from a shared block; sha256 computed on the way."""
    head = f"Message-ID: <{mid}>\r\nSubject: flood\r\n\r\n".encode()
    sha = hashlib.sha256(head.replace(b"\r\n", b"\n"))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        f = s.makefile("rb")
        greeting = _reply(f)
        tally.count(tally.replies, greeting[:9].decode(errors="replace").strip())
        if not greeting.startswith(b"220"):
            return
        for cmd in (b"EHLO flood.test", b"MAIL FROM:<flood@example.org>", b"RCPT TO:<flood@example.test>",
                    b"DATA"):
            s.sendall(cmd + b"\r\n")
            r = _reply(f)
            if r[:1] not in (b"2", b"3"):
                tally.count(tally.replies, r[:9].decode(errors="replace").strip())
                return
        s.sendall(head)
        for _ in range(mib):
            s.sendall(BLOCK)
            sha.update(BLOCK_STORED)
        s.sendall(b".\r\n")
        r = _reply(f)
        tally.count(tally.replies, r[:9].decode(errors="replace").strip())
        if r.startswith(b"250"):
            with tally.lock:
                tally.acked[mid] = sha.hexdigest()
        s.sendall(b"QUIT\r\n")


def sender(port: int, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            send_streamed(port, f"{seed}.{n}@flood.test", rng.randint(*SIZES_MIB), tally)
        except OSError:
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 0.2))


def prober(port: int, tally: Tally, stop: threading.Event) -> None:
    """A new connection every 100 ms: the daemon must always greet (220 or 452), never hang."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                line = s.makefile("rb").readline()
            tally.count(tally.greetings, line[:3].decode(errors="replace") or "closed")
        except OSError:
            with tally.lock:
                tally.unanswered += 1
        time.sleep(0.1)


def until(what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def _accepted_after(d: Daemon) -> bool:
    try:
        return d.send("after@example.test", b"Subject: after\r\n\r\nok\r\n") == {}
    except (smtplib.SMTPConnectError, smtplib.SMTPSenderRefused) as exc:
        assert exc.smtp_code == 452, exc  # only the governor's refusal may delay it
        return False


def _file_pages(cg: MemoryCgroup) -> str:
    """The cgroup's page cache figures (v1: the hierarchical totals), to explain a refusal."""
    stat = dict(line.split() for line in (cg.path / "memory.stat").read_text().splitlines())
    p = "total_" if cg.version == 1 else ""
    keys = [p + "active_file", p + "inactive_file", p + ("dirty" if p else "file_dirty")]
    return ", ".join(f"{k} {int(stat.get(k, 0)) >> 20} MiB" for k in keys)


def _wait_for_mail_to_flow(d: Daemon, cg: MemoryCgroup, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not _accepted_after(d):
        if time.monotonic() > deadline:
            # Once seen in the trixie VM (kernel 6.12, multi-generational LRU): the flood's
            # spool pages counted as active file kept the working set near the limit.
            raise AssertionError(
                f"still refused {timeout:.0f}s after the flood; working set "
                f"{cg.working_set() >> 20} MiB of a {cg.limit() >> 20} MiB limit; "
                + _file_pages(cg))
        time.sleep(0.05)


def events(d: Daemon) -> list[str]:
    out = []
    for line in d.log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event"):
            out.append(rec["event"])
    return out


@pytest.mark.root
@pytest.mark.slow
def test_memory_flood_in_a_real_cgroup(tmp_path: Path, real_cgroup: MemoryCgroup) -> None:
    cg = real_cgroup
    oom_before = oom_kills(cg)
    extra = (f'[memory]\nmonitoring_interval = "250ms"\n[server]\nmax_message_size = "{SIZES_MIB[1] + 1}MiB"\n'
             'max_connections = 400\n[logging]\nformat = "json"\n')
    tally = Tally()
    stop = threading.Event()
    with running(tmp_path / "d", extra, preexec_fn=join(cg)) as d:
        d.wait_for_log(cg.source)
        threads = [threading.Thread(target=sender, args=(d.port, tally, stop, i)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=prober, args=(d.port, tally, stop)))
        for t in threads:
            t.start()
        try:
            until("the flood is under way", lambda: len(tally.acked) >= 1)
            with ballast(cg, 0.95):
                held_from = time.monotonic()
                # Events, not a fixed hold: on a slow machine (the VM under emulation) three
                # critical monitor samples can take longer than HOLD.
                d.wait_for_log("Circuit breaker opened", timeout=90)
                until("a 452 greeting", lambda: tally.greetings.get("452", 0) > 0)
                # The pressure lasts at least HOLD (load on the daemon, not synchronisation).
                time.sleep(max(0.0, HOLD - (time.monotonic() - held_from)))
                critical_greetings = dict(tally.greetings)
            # After the ballast: normal service resumes (breaker closes, 220 again).
            d.wait_for_log("Circuit breaker closed", timeout=90)
            until("220 greetings again", lambda: tally.greetings.get("220", 0)
                  > critical_greetings.get("220", 0))
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert d.proc.poll() is None, "the daemon died"
        # Mail flows again: the first connection after the flood may still meet a critical
        # sample (the flood's spool pages are still active in the cgroup's working set on
        # trixie's 6.12 kernel), so a later one within the bound must get through.
        _wait_for_mail_to_flow(d, cg)
        ev = events(d)
        stored = {}
        for path in d.maildir.glob("example.test/flood/new/*"):
            data = path.read_bytes()
            start = data.index(b"Message-ID: <")
            mid = data[start + 13 : data.index(b">", start)].decode()
            stored[mid] = hashlib.sha256(data[start:]).hexdigest()

    lost = [m for m in tally.acked if m not in stored]
    damaged = [m for m, sha in tally.acked.items() if m in stored and stored[m] != sha]
    print(f"\nmemory flood: clients={CLIENTS} sizes={SIZES_MIB} MiB acked={len(tally.acked)} "
          f"lost={len(lost)} damaged={len(damaged)} replies={tally.replies} greetings={tally.greetings} "
          f"unanswered={tally.unanswered} oom_kills={oom_kills(cg) - oom_before} "
          f"limit_hits={cg.limit_hits()} events={sorted(set(ev))}")
    assert oom_kills(cg) == oom_before, "OOM kill in the cgroup"
    assert lost == [] and damaged == []
    assert len(tally.acked) >= CLIENTS // 2, "too little mail got through to prove anything"
    assert tally.unanswered == 0, "a connection got no greeting"
    assert critical_greetings.get("452", 0) > 0, "no 452 while the ballast held memory"
    assert tally.greetings.get("220", 0) > critical_greetings.get("220", 0), "no recovery to 220"
    assert "memory_critical" in ev and "breaker_open" in ev and "breaker_closed" in ev
    assert ev.index("breaker_open") < len(ev) - 1 - ev[::-1].index("breaker_closed")
