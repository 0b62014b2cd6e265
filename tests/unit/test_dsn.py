"""The DSN builder and the header reader of queue/dsn.py and queue/bounce.py."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from elemta.queue.bounce import read_headers
from elemta.queue.dsn import Failure, build, remote_mta, status_of


def test_status_and_remote_mta() -> None:
    assert status_of(Failure("a@b", "550 5.1.1 <a@b>: no", "hub[1.2.3.4]:25")) == "5.1.1"
    assert status_of(Failure("a@b", "554 Transaction failed", "hub[1.2.3.4]:25")) == "5.0.0"
    assert status_of(Failure("a@b", "550 4.1.1 mixed up", "hub[1.2.3.4]:25")) == "5.0.0"
    assert status_of(Failure("a@b", "451 4.4.1 connect", "1.2.3.4:25", expired=True)) == "5.4.7"
    assert remote_mta("hub.test[127.0.0.1]:25") == "hub.test"
    assert remote_mta("127.0.0.1:25") is None and remote_mta("/var/mail") is None


def test_hostile_reply_text_cannot_break_the_report() -> None:
    evil = "550 5.7.1 x\r\nFinal-Recipient: rfc822; forged@x\r\n" + "y" * 5000
    head, tail = build(queue_id="Q", sender="s@x.test", reporting_mta="mx.test", arrival=0,
                       now=0, failures=[Failure("a@x.test", evil, "h[1.1.1.1]:25")],
                       message_id="m@mx.test")
    raw = head + b"Subject: s\r\n" + tail
    assert max(len(line) for line in raw.split(b"\r\n")) < 998
    assert raw.count(b"\r\nFinal-Recipient:") == 1  # no field injected by the reply text
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    groups = list(msg.iter_parts())[1].get_payload()
    assert [g["Final-Recipient"] for g in groups[1:]] == ["rfc822; a@x.test"]


def test_read_headers_stops_at_the_empty_line_and_at_the_limit(tmp_path: Path) -> None:
    p = tmp_path / "b"
    p.write_bytes(b"A: 1\r\nB: 2\r\n\r\nbody\r\n" + b"z" * 200_000)
    assert read_headers(p) == b"A: 1\r\nB: 2\r\n"
    p.write_bytes(b"\r\nonly body\r\n")
    assert read_headers(p) == b""
    p.write_bytes(b"X: " + b"y" * 70 + b"\r\n" * 1 + (b"H: " + b"v" * 70 + b"\r\n") * 10_000)
    got = read_headers(p, limit=1000)
    assert len(got) <= 1000 and got.endswith(b"\r\n") and got.startswith(b"X: ")
