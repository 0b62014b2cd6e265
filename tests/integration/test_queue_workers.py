"""A queued LMTP transport with [server] workers = 2, delivering into a real Dovecot
(tests/dovecot.py): the supervisor runs the one delivery manager, the workers take mail in and
wake it. New mail goes on at once; `elemta queue`, the queue metrics, /api/stats and /health
answer for the whole daemon; kill -9 of a worker mid-burst loses nothing and duplicates
nothing; a second daemon on the same queue directory waits for the first instead of delivering
the same records beside it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from test_queue_dovecot import ids_in, queued

import dovecot
from daemon import Daemon, running, start, wait_until
from dovecot import Dovecot
from httpclient import get, metric_values

WORKERS = "[server]\nworkers = 2\n"


def extra(dc: Dovecot, queue: Path, more: str = "") -> str:
    return (f'{WORKERS}[delivery]\ntransport = "{dc.tcp}"\nqueue_dir = "{queue}"\n'
            + more)


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elemta.cli", "queue", *args, "--config",
                           str(d.config_path)], capture_output=True, text=True, timeout=60)


def worker_pids(d: Daemon) -> dict[int, int]:
    """index -> pid of each worker now (the last "worker N started (pid P)" line for each N)."""
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", d.log)}


def burst(d: Daemon, ids: list[str], acked: list[str], threads: int = 6,
          during: Callable[[], None] | None = None) -> None:
    """Send every id in `ids` (one message each, to alice and bob) over `threads` clients; a
    client whose connection dies goes on with a new one. Acknowledged ids land in `acked`."""
    todo = iter(ids)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                mid = next(todo, None)
            if mid is None:
                return
            try:
                with d.smtp(timeout=30) as s:
                    s.sendmail("s@example.org", ["alice@example.test", "bob@example.test"],
                               f"Message-ID: <{mid}>\r\n\r\n".encode() + b"w" * 500 + b"\r\n")
            except (smtplib.SMTPException, OSError):
                continue  # not acknowledged (its worker was killed): a lost message is not ours
            with lock:
                acked.append(mid)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for t in workers:
        t.start()
    if during is not None:
        during()
    for t in workers:
        t.join()


def duplicates(dc: Dovecot) -> dict[str, int]:
    return {u: sum(n - 1 for n in Counter(ids_in(dc, u)).values()) for u in ("alice", "bob")}


def test_workers_deliver_new_mail_at_once_and_answer_for_the_queue(tmp_path: Path) -> None:
    q = tmp_path / "queue"
    with dovecot.running() as dc, running(tmp_path, extra(dc, q, 'stuck_queue_age = "2s"\n')) as d:
        # Promptly: the worker's wake reaches the supervisor's manager (its fallback look at
        # incoming/ is once a second: without the wake the median was 1000 ms).
        latencies = []
        for n in range(10):
            t0 = time.monotonic()
            d.send("alice@example.test", f"Message-ID: <now{n}@test>\r\n\r\nhi\r\n".encode())
            wait_until(lambda n=n: f"now{n}@test" in ids_in(dc, "alice"),  # type: ignore[misc]
                       f"message {n} delivered")
            latencies.append(time.monotonic() - t0)
        median = statistics.median(latencies)
        print(f"\nworkers = 2, 250 to the file in Dovecot: median {median * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms")
        assert median < 0.3, latencies

        acked: list[str] = []
        burst(d, [f"{n}@w.test" for n in range(120)], acked)
        assert len(acked) == 120
        for user in ("alice", "bob"):
            wait_until(lambda u=user: set(acked) <= set(ids_in(dc, u)),  # type: ignore[misc]
                       f"the burst in {user}'s mailbox", timeout=120)
        wait_until(lambda: not queued(tmp_path), "the queue emptied")
        assert duplicates(dc) == {"alice": 0, "bob": 0}
        # Both workers took mail in, the supervisor delivered it all.
        took = set(re.findall(r"worker (\d): [^\n]*status=sent", d.log))
        assert took == set(), "a worker delivered"
        m = metric_values(get(d, "/metrics").body.decode())
        delivered = m[("elemta_deliveries_total", (("result", "delivered"),
                                                   ("transport", "lmtp")))]
        assert delivered == 10 + 2 * 120
        wait_until(lambda: metric_values(get(d, "/metrics").body.decode())[
            ("elemta_queue_messages", (("state", "incoming"),))] == 0,
            "the census (at most a second behind) counts the queue empty")

        # Dovecot down: deferred; `elemta queue`, /api/stats, /health see it through the
        # supervisor; flush after Dovecot is back delivers it.
        dc.stop()
        d.send("bob@example.test", b"Message-ID: <late@test>\r\n\r\nlater\r\n")
        wait_until(lambda: [r["attempts"] for r in queued(tmp_path)] == [1], "deferred")
        (qid,) = [p.name for p in q.glob("deferred/*/*")]
        listing = cli(d)
        assert listing.returncode == 0 and qid in listing.stdout, listing
        assert "bob@example.test" in cli(d, "show", qid).stdout
        assert cli(d, "hold", qid).stdout == f"{qid}: on hold\n"
        wait_until(lambda: get(d, "/api/stats").json()["queue"]["messages"]["hold"] == 1,
                   "/api/stats counts it on hold")
        wait_until(lambda: get(d, "/health").json()["status"] == "warning",
                   "a stuck queue warns", timeout=30)
        assert cli(d, "release", qid).stdout == f"{qid}: scheduled now\n"
        wait_until(lambda: [r["attempts"] for r in queued(tmp_path)] == [2], "tried again")
        dc.start()
        assert cli(d, "flush").stdout == "1 deferred message(s) scheduled now\n"
        wait_until(lambda: "late@test" in ids_in(dc, "bob"), "delivered after the flush")
        wait_until(lambda: get(d, "/api/stats").json()["queue"]["messages"]["deferred"] == 0,
                   "the census counts it gone")
        dc.check_log()
        # SIGTERM: workers drain, then the supervisor's manager stops and frees the lock.
        assert d.stop(signal.SIGTERM) == 0
        assert re.search(r"^(?!.*worker \d: ).*\bstopped\b", d.log, re.M), d.log[-2000:]
        with open(q / "manager.lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: BlockingIOError otherwise


def lock_holders(queue: Path, pids: list[int]) -> list[int]:
    """Which of `pids` have the queue's manager.lock open."""
    lock = str((queue / "manager.lock").resolve())
    out = []
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == lock:
                    out.append(pid)
    return out


def test_kill_9_of_a_worker_mid_burst_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    with dovecot.running() as dc, running(tmp_path, extra(dc, tmp_path / "queue")) as d:
        acked: list[str] = []
        victim = worker_pids(d)[1]

        def kill_one() -> None:
            wait_until(lambda: len(acked) >= 100, "100 acknowledged", timeout=120)
            subprocess.run(["kill", "-9", str(victim)], check=True)

        burst(d, [f"{n}@k.test" for n in range(400)], acked, during=kill_one)
        d.wait_for_log(f"(pid {victim}) was killed by SIGKILL")
        wait_until(lambda: worker_pids(d)[1] != victim, "worker 1 replaced")
        # Only the supervisor holds the lock, though the replacement was forked while it did:
        # a worker's copy would keep it after a kill -9 of the supervisor, and the next daemon
        # would wait for the orphaned workers to drain.
        assert lock_holders(tmp_path / "queue", [d.proc.pid, *worker_pids(d).values()]) == [
            d.proc.pid]
        sent = set(acked)
        for user in ("alice", "bob"):
            wait_until(lambda u=user: sent <= set(ids_in(dc, u)),  # type: ignore[misc]
                       f"every acknowledged message in {user}'s mailbox", timeout=300)
        wait_until(lambda: not queued(tmp_path), "the queue emptied", timeout=120)
        dupes = duplicates(dc)
        print(f"\nkill -9 of worker 1 (pid {victim}) mid-burst: {len(sent)} of 400 "
              f"acknowledged, all delivered; duplicates {dupes}")
        assert len(sent) >= 300
        assert dupes == {"alice": 0, "bob": 0}  # workers never deliver: nothing was in flight


def test_a_second_daemon_on_the_queue_waits_for_the_first(tmp_path: Path) -> None:
    q = tmp_path / "queue"
    with dovecot.running() as dc, running(tmp_path / "a", extra(dc, q)) as a:
        b = start(tmp_path / "b", extra(dc, q))
        try:
            b.wait_for_log("is delivered by another elemta process")
            refused = cli(b, "flush")  # the admin of the waiting one says who delivers
            assert refused.returncode != 0 and "another elemta process" in refused.stderr, refused
            acked: list[str] = []
            ids = [f"{n}@two.test" for n in range(300)]
            # Both take mail in; a stops (SIGTERM) in the middle and b's manager takes over.
            t = threading.Thread(target=burst, args=(b, ids[1::2], acked, 3))
            t.start()
            burst(a, ids[::2], acked, 3,
                  during=lambda: (wait_until(lambda: len(acked) >= 100, "100 acknowledged",
                                             timeout=120), a.stop(signal.SIGTERM)))
            t.join()
            b.wait_for_log("the other process stopped; delivering now")
            sent = set(acked)
            for user in ("alice", "bob"):
                wait_until(lambda u=user: sent <= set(ids_in(dc, u)),  # type: ignore[misc]
                           f"every acknowledged message in {user}'s mailbox", timeout=300)
            wait_until(lambda: not list(q.glob("incoming/*")) and not list(q.glob("deferred/*/*")),
                       "the queue emptied", timeout=120)
            assert duplicates(dc) == {"alice": 0, "bob": 0}
        finally:
            b.stop(signal.SIGKILL)
        assert "Traceback" not in b.log, b.log


def test_the_governor_pauses_and_resumes_the_supervisors_deliveries(tmp_path: Path) -> None:
    q = tmp_path / "queue"
    with dovecot.running() as dc, running(tmp_path, extra(dc, q)) as d:
        dc.stop()
        d.send("alice@example.test", b"Message-ID: <paused@test>\r\n\r\nwait\r\n")
        wait_until(lambda: [r["attempts"] for r in queued(tmp_path)] == [1], "deferred")
        normal = d.config_path.read_text()
        # A budget far below what the daemon uses: critical, so no new delivery may start.
        d.config_path.write_text(normal + '[memory]\nmax_memory_usage = "4MiB"\n'
                                          'per_connection_memory_limit = "1MiB"\n')
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: get(d, "/api/stats").json()["queue"]["concurrency"]["limit"] == 0,
                   "the supervisor's governor pauses deliveries")
        assert re.search(r"^(?!.*worker \d: ).*delivery concurrency 20 -> 0 \(memory critical",
                         d.log, re.M), d.log[-2000:]
        dc.start()
        assert cli(d, "flush").stdout == "1 deferred message(s) scheduled now\n"
        # A window to observe a negative: the scheduler looks at incoming/ at least every
        # second, so three seconds cover several of its turns.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert ids_in(dc, "alice") == [], "delivered while paused"
            time.sleep(0.1)
        assert [p.parent.name for p in q.glob("incoming/*")] == ["incoming"]
        d.config_path.write_text(normal)
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: ids_in(dc, "alice") == ["paused@test"], "delivered once resumed",
                   timeout=30)
        d.wait_for_log("delivery concurrency 0 -> 20 (memory normal")
