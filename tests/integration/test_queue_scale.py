"""A queue of 100,000 messages (records and bodies written straight to disk, as a crashed or
long-unreachable Dovecot would leave them): the daemon starts in seconds and its RSS stays
within 20 MiB of an empty queue's (memory is O(active), not O(queue)). Prints the figures.

ELEMTA_QUEUE_SCALE=N changes the count (default 100000).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from test_queue_daemon import queue_extra

from daemon import Daemon, rss_of, running, wait_until
from httpclient import get

COUNT = int(os.environ.get("ELEMTA_QUEUE_SCALE", "100000"))
DUE_NOW = 2000  # in incoming/: the manager takes them into its active set at once


def fill(queue: Path, count: int) -> None:
    now = time.time()
    for sub in ("tmp", "body", "incoming", "deferred", "hold", "failed"):
        (queue / sub).mkdir(parents=True, exist_ok=True)
    body = b"Received: from x\r\nSubject: s\r\n\r\n" + b"y" * 1000 + b"\r\n"
    for n in range(count):
        qid = f"{n:012X}"
        due = now + 600 + (n % 400) * 10  # 400 future buckets of 10 s
        rec = {"id": qid, "sender": "s@example.org", "created": now - 3600, "size": len(body),
               "recipients": [{"address": "c@localhost", "transport": "lmtp:127.0.0.1:9",
                               "state": "pending", "reply": "451 4.4.1 down", "relay": ""}],
               "attempts": 3, "next_attempt": due, "seq": 1}
        if n < DUE_NOW:
            d = queue / "incoming"
        else:
            d = queue / "deferred" / str(-int(-due // 10))
            d.mkdir(exist_ok=True)
        (d / qid).write_text(json.dumps(rec))
        (queue / "body" / qid).write_bytes(body)


def settled_rss(d: Daemon) -> int:
    """RSS once the manager has taken what is due and the census has run."""
    wait_until(lambda: get(d, "/api/stats").json()["queue"]["messages"]["active"] == 0,
               "the due messages tried", timeout=120)
    return rss_of(d.proc.pid)


def test_a_100k_queue_costs_seconds_to_start_and_little_memory(tmp_path: Path) -> None:
    empty_dir, full_dir = tmp_path / "empty", tmp_path / "full"
    empty_dir.mkdir()
    full_dir.mkdir()
    t0 = time.monotonic()
    with running(empty_dir, queue_extra(empty_dir)) as d:
        empty_start = time.monotonic() - t0
        empty_rss = settled_rss(d)
    t = time.monotonic()
    fill(full_dir / "queue", COUNT)
    filled = time.monotonic() - t
    t0 = time.monotonic()
    with running(full_dir, queue_extra(full_dir)) as d:
        full_start = time.monotonic() - t0
        full_rss = settled_rss(d)
        # The census of 100,000 records takes seconds and runs at most a tenth of the time
        # (manager.CENSUS_GAP): under a loaded machine the count can take minutes to settle.
        wait_until(lambda: get(d, "/api/stats").json()["queue"]["messages"]["deferred"] == COUNT,
                   "the census counts every message deferred", timeout=300)
    mib = 1024 * 1024
    print(f"\nqueue of {COUNT} messages (written in {filled:.1f}s): start-up {full_start:.2f}s "
          f"(empty queue {empty_start:.2f}s); RSS {full_rss / mib:.1f} MiB (empty queue "
          f"{empty_rss / mib:.1f} MiB, +{(full_rss - empty_rss) / mib:.1f} MiB)")
    assert full_rss - empty_rss < 20 * mib
    assert full_start < 30
