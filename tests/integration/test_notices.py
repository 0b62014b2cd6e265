"""Delay warnings ([delivery] delay_warning_time) and postmaster notices ([delivery]
notify_postmaster) with a real daemon relaying to a real Postfix hub (which answers 451 for
tempfail@ and 550 for reject@) or to a port where nothing listens. The notices are read back
from the Maildirs with Python's email package."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_bounce import dsn_of, report
from test_smtp_relay import relay_extra

import postfixhub
from daemon import Daemon, free_port, running, wait_until
from postfixhub import DOMAIN, Postfix

pytestmark = pytest.mark.skipif(not postfixhub.installed(), reason="postfix not installed")

FAST = ('minimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"\n',
        'minimal_backoff_time = "1s"\nmaximal_backoff_time = "1s"\n')
POSTMASTER = "postmaster@example.test"  # the first of the test daemon's [delivery] domains


@pytest.fixture(scope="module")
def hub() -> Iterator[Postfix]:
    with postfixhub.running() as p:
        yield p


def extra(tmp_path: Path, port: int, more: str = "") -> str:
    return relay_extra(tmp_path, port, more).replace(*FAST)


def send(d: Daemon, sender: str, to: list[str], body: bytes, mail_options: tuple[str, ...] = (),
         rcpt_options: tuple[str, ...] = ()) -> None:
    with d.smtp() as s:
        s.ehlo("client.test")
        assert s.sendmail(sender, to, body, list(mail_options), list(rcpt_options)) == {}


def records(queue: Path) -> list[dict[str, Any]]:
    """The queue's records; one that moves meanwhile (every second here) is read where it
    went, and of two copies of one (a move between its rename and unlink) the newer counts."""
    while True:
        try:
            found = [json.loads(p.read_bytes()) for p in [*queue.glob("*/*"),
                                                           *queue.glob("deferred/*/*")]
                     if p.is_file() and (p.parent.name in ("incoming", "hold", "failed")
                                         or p.parent.parent.name == "deferred")]
        except FileNotFoundError:
            continue
        newest: dict[str, dict[str, Any]] = {}
        for r in found:
            if r["id"] not in newest or r["seq"] > newest[r["id"]]["seq"]:
                newest[r["id"]] = r
        return list(newest.values())


def qid_of(queue: Path, sender: str, rcpt: str) -> str:
    [qid] = [str(r["id"]) for r in records(queue) if r["sender"] == sender and
             rcpt in [x["address"] for x in r["recipients"]]]
    return qid


def field(queue: Path, qid: str, name: str) -> float:
    [rec] = [r for r in records(queue) if r["id"] == qid]
    return float(rec.get(name, 0))


def tried(queue: Path, qid: str, attempts: float) -> bool:
    """Attempt `attempts` of message `qid` is over: its record is written back, after its
    delay notice (if one was due) was queued."""
    return field(queue, qid, "attempts") >= attempts


def mail_of(d: Daemon, address: str) -> list[bytes]:
    return [p.read_bytes() for p in d.delivered(address)]


def settled(queue: Path) -> bool:
    """No notice left in the queue: only messages some sender wrote."""
    return all(r["sender"] != "" or r["recipients"][0]["address"].endswith(f"@{DOMAIN}")
               for r in records(queue))


def test_one_delay_warning_per_message_honouring_notify_and_never_again_after_a_restart(
        hub: Postfix, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    cfg = extra(tmp_path, hub.port, 'delay_warning_time = "1s"\nnotify_postmaster = ["delay"]\n')
    with running(tmp_path, cfg) as d:
        tempfail, alice = f"tempfail@{DOMAIN}", f"alice@{DOMAIN}"
        body = b"Subject: slow\r\nMessage-ID: <slow-%d@test>\r\n\r\nbody text\r\n"
        # No NOTIFY: warned. RET=FULL: a delay notice still returns the headers only (RFC
        # 3461 4.3: RET is about failure notices).
        send(d, "s1@example.test", [tempfail, alice], body % 1, mail_options=("RET=FULL",))
        send(d, "s2@example.test", [tempfail], body % 2, rcpt_options=("NOTIFY=FAILURE",))
        send(d, "s3@example.test", [tempfail], body % 3, rcpt_options=("NOTIFY=SUCCESS,DELAY",))
        send(d, "<>", [tempfail], body % 4)  # a bounce itself: never warned
        ids = {s: qid_of(queue, s, tempfail) for s in
               ("s1@example.test", "s2@example.test", "s3@example.test", "")}

        wait_until(lambda: mail_of(d, "s1@example.test") and mail_of(d, "s3@example.test") and
                   f"{ids['s2@example.test']}: pending recipients asked for no delay notice" in d.log
                   and f"{ids['']}: from=<>: no delay notification" in d.log,
                   "the delay warnings sent and refused", 60)
        raw = mail_of(d, "s1@example.test")[0]
        assert raw.startswith(b"Return-Path: <>\n")
        msg = dsn_of(raw)
        assert msg["Subject"] == "Mail delivery delayed (still being retried)"
        per_message, [rcpt] = report(msg)  # alice@ was delivered: not listed
        assert rcpt["Final-Recipient"] == f"rfc822; {tempfail}"
        assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.7.1"
        assert rcpt["Remote-MTA"] == "dns; hub.test"
        assert rcpt["Diagnostic-Code"].startswith(f"smtp; 451 4.7.1 <{tempfail}>: Recipient "
                                                  "address rejected: Try again later")
        arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp()
        until = email.utils.parsedate_to_datetime(rcpt["Will-Retry-Until"]).timestamp()
        assert until - arrival == 432000  # created + maximal_queue_lifetime (5 d)
        original = list(msg.iter_parts())[2].get_payload()
        assert "Message-ID: <slow-1@test>" in original and "body text" not in original
        _, [rcpt3] = report(dsn_of(mail_of(d, "s3@example.test")[0]))
        assert rcpt3["Action"] == "delayed"
        assert mail_of(d, "s2@example.test") == []
        # The decision is in each record (written just after the notice is queued), so a
        # restart keeps it.
        wait_until(lambda: all(field(queue, q, "delay_warned") > 0 for q in ids.values()),
                   "each record marked as warned")
        assert d.log.count("sender delay notification") == 2
        # postmaster gets a copy of each warning ("delay" class), headers only.
        wait_until(lambda: len(d.delivered(POSTMASTER)) == 2, "two postmaster copies")
        for copy in mail_of(d, POSTMASTER):
            pm = dsn_of(copy)
            assert pm["Subject"].startswith("Postmaster Copy: ")
            assert report(pm)[1][0]["Action"] == "delayed" and b"body text" not in copy

        d.stop()
        before = {q: field(queue, q, "attempts") for q in ids.values()}
        d.restart()
        # Every message is tried (and deferred) again after the restart, and any notice that
        # attempt queued is delivered: no second warning.
        wait_until(lambda: all(tried(queue, q, before[q] + 1) for q in ids.values()) and
                   settled(queue), "each message tried again after the restart", 60)
        assert [len(d.delivered(f"s{i}@example.test")) for i in (1, 2, 3)] == [1, 0, 1]
        assert d.log.count("sender delay notification") == 2
        assert len(d.delivered(POSTMASTER)) == 2


def test_no_delay_warning_by_default(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: every attempt is deferred
    queue = tmp_path / "queue"
    with running(tmp_path, extra(tmp_path, port)) as d:
        send(d, "s@example.test", [f"tempfail@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n")
        qid = qid_of(queue, "s@example.test", f"tempfail@{DOMAIN}")
        started = time.time()
        # The second attempt comes at least minimal_backoff_time (1 s) after the first; any
        # notice it queued is delivered once the queue holds no notice.
        wait_until(lambda: tried(queue, qid, 2) and settled(queue), "two attempts", 60)
        assert time.time() - started >= 1
        assert d.delivered("s@example.test") == [] and "delay notification" not in d.log
        assert d.delivered(POSTMASTER) == []


def test_postmaster_gets_a_copy_of_each_bounce_without_the_body(
        hub: Postfix, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    with running(tmp_path, extra(tmp_path, hub.port, 'notify_postmaster = ["bounce"]\n')) as d:
        secret = b"the secret body line"
        send(d, "s@example.test", [f"reject@{DOMAIN}", f"alice@{DOMAIN}"],
             b"Subject: will bounce\r\nMessage-ID: <pm-1@test>\r\n\r\n" + secret + b"\r\n",
             mail_options=("RET=FULL",))
        send(d, "<>", [f"reject@{DOMAIN}"], b"Subject: a bounce\r\n\r\n" + secret + b"\r\n")
        wait_until(lambda: d.delivered("s@example.test") and d.delivered(POSTMASTER) and
                   "not bounced (a bounce is never bounced)" in d.log and settled(queue),
                   "the bounce and its postmaster copy delivered", 60)
        [bounce] = mail_of(d, "s@example.test")
        assert secret in bounce  # RET=FULL: the sender gets the whole message back
        [copy] = mail_of(d, POSTMASTER)  # none for the failed message from <>
        assert copy.startswith(b"Return-Path: <>\n") and secret not in copy
        pm = dsn_of(copy)
        assert pm["To"].addresses[0].addr_spec == POSTMASTER
        assert pm["Subject"] == "Postmaster Copy: Undelivered Mail Returned to Sender"
        _, [rcpt] = report(pm)  # headers only, whatever RET said
        assert rcpt["Final-Recipient"] == f"rfc822; reject@{DOMAIN}"
        assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.7.1"
        original = list(pm.iter_parts())[2].get_payload()
        assert "Message-ID: <pm-1@test>" in original
        assert "postmaster non-delivery notification" in d.log


def test_only_the_sender_gets_the_bounce_by_default(hub: Postfix, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    with running(tmp_path, extra(tmp_path, hub.port)) as d:
        send(d, "s@example.test", [f"reject@{DOMAIN}"], b"Subject: b\r\n\r\nbody\r\n")
        wait_until(lambda: d.delivered("s@example.test") and settled(queue),
                   "the bounce delivered", 60)
        assert d.delivered(POSTMASTER) == [] and "postmaster non-delivery" not in d.log
