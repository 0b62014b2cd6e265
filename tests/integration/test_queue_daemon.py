"""The queue in a real daemon: a message whose recipients go to different transports is queued
whole; the queue's maildir agent delivers the maildir ones, the LMTP ones wait (no LMTP server
listens on the configured port) with the reason recorded; kill -9 during a burst loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import threading
import time
from pathlib import Path

from daemon import Daemon, free_port, running, wait_until
from httpclient import get

LOCAL = "a@example.test"  # routed to maildir
REMOTE = "c@localhost"  # to the LMTP transport, which is down


def queue_extra(workdir: Path) -> str:
    return (f'[delivery]\ntransport = "lmtp:127.0.0.1:{free_port()}"\n'
            f'queue_dir = "{workdir / "queue"}"\n'
            'route = [{ domain = "example.test", transport = "maildir" }]\n')


def records(queue: Path) -> dict[str, dict[str, object]]:
    out = {}
    for p in queue.glob("*/*"):
        if p.is_file() and p.parent.name in ("incoming", "hold", "failed"):
            out[p.name] = json.loads(p.read_bytes())
    for p in queue.glob("deferred/*/*"):
        out[p.name] = json.loads(p.read_bytes())
    return out


def message_ids(d: Daemon, address: str) -> list[str]:
    ids = []
    for f in d.delivered(address):
        m = re.search(rb"^Message-ID: <([^>]+)>", f.read_bytes(), re.M)
        assert m is not None, f
        ids.append(m.group(1).decode())
    return ids


def test_mixed_routes_queue_the_message_and_deliver_each_recipient_its_way(tmp_path: Path) -> None:
    with running(tmp_path, queue_extra(tmp_path)) as d:
        with d.smtp() as s:
            s.sendmail("sender@example.org", [LOCAL, REMOTE],
                       b"Message-ID: <m1@test>\r\nSubject: q\r\n\r\nline\r\n.dot\r\n")
        # The maildir recipient: delivered from the queue, LF line ends, Return-Path added.
        wait_until(lambda: d.delivered(LOCAL), "delivery into the maildir")
        (f,) = d.delivered(LOCAL)
        data = f.read_bytes()
        assert data.startswith(b"Return-Path: <sender@example.org>\nReceived: from ")
        assert b"\r" not in data and data.endswith(b"\n\nline\n.dot\n")
        # The LMTP recipient: deferred, with why, in the record and the log.
        wait_until(lambda: "status=deferred" in d.log, "a deferral logged")
        wait_until(lambda: [r["attempts"] for r in records(tmp_path / "queue").values()] == [1],
                   "the attempt recorded")
        (rec,) = records(tmp_path / "queue").values()
        rcpts = {r["address"]: r for r in rec["recipients"]}  # type: ignore[union-attr]
        assert rcpts[LOCAL]["state"] == "delivered"
        assert rcpts[REMOTE]["state"] == "pending" and str(rcpts[REMOTE]["reply"]).startswith("4")
        assert rec["attempts"] == 1
        assert re.search(rf"to=<{LOCAL}>, relay=\S+, delay=[\d.]+, dsn=2\.0\.0, status=sent "
                         r"\(250 ", d.log)
        # The body file in the queue is CRLF, unstuffed, starts with Received: (no Return-Path).
        body = (tmp_path / "queue" / "body" / str(rec["id"])).read_bytes()
        assert body.startswith(b"Received: from ") and body.endswith(b"\r\nline\r\n.dot\r\n")
        # Figures, from the queue manager (its census follows changes within a second or so).
        wait_until(lambda: get(d, "/api/stats").json()["queue"]["messages"]["deferred"] == 1,
                   "the census counts the deferred message", timeout=10)
        stats = get(d, "/api/stats").json()["queue"]
        assert stats["bytes"] == len(body) and stats["concurrency"]["limit"] == 20
        metrics = get(d, "/metrics").body.decode()
        assert 'elemta_queue_messages{state="deferred"} 1.0' in metrics
        assert 'elemta_deliveries_total{result="delivered",transport="maildir"} 1.0' in metrics


def test_kill_9_during_a_burst_loses_no_accepted_message(tmp_path: Path) -> None:
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int, d: Daemon) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            mid = f"{n}.{i}@burst.test"
            try:
                with d.smtp(timeout=10) as s:
                    s.sendmail("s@example.org", [LOCAL, REMOTE],
                               f"Message-ID: <{mid}>\r\nSubject: b\r\n\r\n".encode() + (b"x" * 70 + b"\r\n") * 30)
            except (smtplib.SMTPException, OSError):
                return  # killed: this one was not acknowledged
            with lock:
                acked.append(mid)

    with running(tmp_path, queue_extra(tmp_path)) as d:
        threads = [threading.Thread(target=client, args=(n, d)) for n in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acked) >= 200, "200 messages acknowledged", timeout=120)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        stop.set()
        for t in threads:
            t.join()
        d.restart()
        sent = set(acked)
        wait_until(lambda: sent <= set(message_ids(d, LOCAL)),
                   "every acknowledged message delivered to the maildir recipient", timeout=120)
        got = message_ids(d, LOCAL)
        dupes = len(got) - len(set(got))
        # The LMTP recipient of every acknowledged message is still queued, deferred.
        def pending() -> set[str]:
            return {r["address"] for rec in records(tmp_path / "queue").values()
                    for r in rec["recipients"] if r["state"] == "pending"}  # type: ignore[union-attr]

        wait_until(lambda: pending() == {REMOTE}, "only the LMTP recipients left pending")
        queued = records(tmp_path / "queue")
        assert len(queued) >= len(sent)
        print(f"\nkill -9 burst: {len(sent)} acknowledged, {len(set(got))} delivered, "
              f"{dupes} duplicate(s), {len(queued)} queued for the LMTP recipient")
        assert dupes <= 20  # only messages in delivery at the kill may come twice


def test_sigterm_stops_the_queue_manager_cleanly(tmp_path: Path) -> None:
    with running(tmp_path, queue_extra(tmp_path)) as d:
        d.send([LOCAL, REMOTE])
        wait_until(lambda: "status=deferred" in d.log, "a deferral logged")
        assert d.stop(signal.SIGTERM) == 0
        assert d.log.rstrip().endswith('"msg": "stopped"}') or d.log.rstrip().endswith("stopped")
        d.restart()  # the queue is found again: the deferred message is still there
        wait_until(lambda: "1 deferred" in d.log, "the census at start counts it")


def test_a_stuck_queue_is_a_health_warning_not_unhealthy(tmp_path: Path) -> None:
    with running(tmp_path, queue_extra(tmp_path) + 'stuck_queue_age = "1s"\n') as d:
        assert get(d, "/health").json()["status"] == "ok"
        # The configured age, exported for ElemtaQueueMessageTooOld to compare against.
        assert "\nelemta_queue_stuck_age_seconds 1.0\n" in get(d, "/metrics").body.decode()
        d.send([REMOTE])
        wait_until(lambda: get(d, "/health").json()["status"] == "warning", "health warns",
                   timeout=30)
        h = get(d, "/health")
        assert h.status == 200
        # The oldest message's age or the transport deferring everything: whichever comes first.
        assert any(r.startswith("queue stuck: ") for r in h.json()["reasons"]), h.json()
        assert d.send([LOCAL]) == {}  # intake goes on


def test_an_orphan_body_left_by_a_crash_is_removed_at_start(tmp_path: Path) -> None:
    """A crash between the body's rename and the record's leaves body/<id> with no record (and
    the record's temp file): removed at the next start once it is older than any commit in
    flight could be. A body that has a record, and a fresh one, stay."""
    q = tmp_path / "queue"
    with running(tmp_path, queue_extra(tmp_path)) as d:
        d.send([REMOTE], b"Message-ID: <kept@test>\r\n\r\nwaits for LMTP\r\n")
        wait_until(lambda: list(q.glob("deferred/*/*")), "deferred")
        d.stop(signal.SIGKILL)
        (kept,) = [p.name for p in q.glob("deferred/*/*")]
        # As the crash leaves it (a worker killed right after QueueFile.commit's first rename).
        hour_ago = time.time() - 3700
        orphan, fresh = q / "body" / "0000000000AA", q / "body" / "0000000000BB"
        for body in (orphan, fresh):
            body.write_bytes(b"Subject: lost\r\n\r\nnever acknowledged\r\n")
        (q / "tmp" / f"0000000000AA.{d.proc.pid}.meta").write_bytes(b"{")
        os.utime(orphan, (hour_ago, hour_ago))
        os.utime(q / "body" / kept, (hour_ago, hour_ago))  # queued long ago, still waiting
        d.restart()
        wait_until(lambda: not orphan.exists(), "the orphan body removed")
        d.wait_for_log("removed 1 body file(s) without a record")
        assert fresh.exists() and (q / "body" / kept).exists()
        assert not list(q.glob("tmp/*"))
        assert set(records(q)) == {kept}
