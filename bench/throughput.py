"""The workloads every server under test gets, and the figures taken from each.

Postfix's smtp-source is the client for the throughput workloads:
  10 KiB 1/conn     20 sessions, one message per connection
  10 KiB 100/conn   20 sessions, all of a session's messages over one connection (-d)
  1 MiB             4 sessions, one message per connection
CPU is the server's process tree (utime + stime, reaped children included) over each
workload, taken after the server has finished with the mail (Postfix: queue empty).
Then peak RSS growth of the tree while one big message is received (raw socket sender),
and RSS/PSS per idle session (N sessions after EHLO, held open).

Run `bench/run_all.py` (what `make bench` runs) for the side-by-side table; this module
only measures one server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from common import (
    MiB,
    Server,
    idle_sessions,
    peak_rss,
    send_one_big,
    smtp_source,
    tree_cpu,
    tree_pss,
    tree_rss,
)

KiB = 1024


@dataclass(frozen=True)
class Sizes:
    messages: int = 5000  # per 10 KiB workload: several seconds each, so noise averages out
    big_messages: int = 300  # for the 1 MiB workload
    sessions: int = 20
    big_sessions: int = 4
    big_mib: int = 50
    idle: int = 1000


@dataclass(frozen=True)
class Workload:
    key: str  # prefix of the figures' keys
    size: int
    messages: int
    sessions: int
    keep_connection: bool  # smtp-source -d: all of a session's messages over one connection


def workloads(s: Sizes) -> tuple[Workload, ...]:
    return (
        Workload("small_1", 10 * KiB, s.messages, s.sessions, False),
        Workload("small_100", 10 * KiB, s.messages, s.sessions, True),
        Workload("mib", MiB, s.big_messages, s.big_sessions, False),
    )


def measure(server: Server, sizes: Sizes) -> dict[str, float]:
    """Every figure for one server in one round; keys are the row keys of run_all's table."""
    out: dict[str, float] = {}
    # Warm-up: imports, first forks and caches happen here, not in the first figure.
    smtp_source(server.port, 20, 2, 10 * KiB, False)
    server.settle()

    # Idle sessions first: after the big message a server's heap has freed space that new
    # sessions would reuse for free (aiosmtpd frees ~200 MiB), which hides their real cost.
    # A first batch warms the allocator's arenas that every later session reuses.
    with idle_sessions(server.port, min(200, sizes.idle)):
        time.sleep(0.3)
    server.shed_idle()  # Postfix: do not reuse the smtpd processes of the warm-up
    time.sleep(0.3)
    rss0, pss0 = tree_rss(server.pid), tree_pss(server.pid)
    with idle_sessions(server.port, sizes.idle):
        time.sleep(0.5)  # let every session settle into its idle wait
        rss1, pss1 = tree_rss(server.pid), tree_pss(server.pid)
    out["idle_rss_kib"] = (rss1 - rss0) / sizes.idle / KiB
    out["idle_pss_kib"] = (pss1 - pss0) / sizes.idle / KiB
    server.shed_idle()
    server.settle()

    # Then the big message, while the server holds as little as it ever will.
    with peak_rss(server.pid) as r:
        send_one_big(server.port, sizes.big_mib * MiB)
    out["big_rss_mib"] = (r[1] - r[0]) / MiB
    server.settle()

    for w in workloads(sizes):
        cpu0 = tree_cpu(server.pid)
        elapsed = smtp_source(server.port, w.messages, w.sessions, w.size, w.keep_connection)
        server.settle()
        cpu = tree_cpu(server.pid) - cpu0
        out[f"{w.key}_rate"] = w.messages / elapsed
        out[f"{w.key}_cpu_msg_ms"] = cpu / w.messages * 1000
        out[f"{w.key}_cpu_mib_ms"] = cpu / (w.messages * w.size / MiB) * 1000

    return out
