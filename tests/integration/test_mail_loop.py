"""Mail loops: more than 50 Received: headers get 554 5.4.6 at the end of DATA, however the
client splits the stream; two elemta instances relaying a domain to each other stop the
message after 50 rounds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from test_smtp_relay import records

from daemon import Daemon, free_port, running, wait_until


def message(hops: int) -> bytes:
    return (b"".join(b"Received: from h%d.test by h%d.test; Mon, 30 Nov 2026 05:00:00 +0000\r\n"
                     % (i, i + 1) for i in range(hops))
            + b"Subject: loop\r\n\r\nReceived: in the body, not counted\r\n")


def send_raw(d: Daemon, data: bytes, segment: int) -> bytes:
    """One message over a plain socket, DATA written `segment` bytes per send: the reply."""
    with socket.create_connection((d.host, d.port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def reply() -> bytes:
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            return line
        assert reply().startswith(b"220")
        for cmd in (b"EHLO c.test", b"MAIL FROM:<s@example.org>", b"RCPT TO:<u@example.test>",
                    b"DATA"):
            s.sendall(cmd + b"\r\n")
            assert reply()[:1] in (b"2", b"3")
        payload = data + b".\r\n"
        for i in range(0, len(payload), segment):
            s.sendall(payload[i:i + segment])
        return reply()


@pytest.mark.parametrize("segment", [1, 7, 65536])
def test_fifty_hops_pass_fifty_one_are_a_loop(tmp_path: Path, segment: int) -> None:
    with running(tmp_path) as d:
        assert send_raw(d, message(50), segment).startswith(b"250 2.0.0 Ok: queued as")
        assert send_raw(d, message(51), segment) == \
            b"554 5.4.6 Too many hops: mail forwarding loop\r\n"
        wait_until(lambda: "51 Received: headers (a mail loop?)" in d.log, "the refusal logged")
        # The refused message left nothing behind: one message stored, the one with 50 hops.
        assert len(d.delivered("u@example.test")) == 1


def test_two_relays_pointing_at_each_other_stop_the_loop(tmp_path: Path) -> None:
    b_port = free_port()

    def extra(to: int, name: str, listen: int | None = None) -> str:
        return ((f'[server]\nlisten = ["127.0.0.1:{listen}"]\nhostname = "{name}"\n'
                 if listen else f'[server]\nhostname = "{name}"\n') +
                f'[delivery]\nrelay_domains = ["loop.test"]\n'
                f'relay_transport = "smtp:[127.0.0.1]:{to}"\n'
                f'queue_dir = "{tmp_path / name / "queue"}"\n'
                'minimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"\n')

    with running(tmp_path / "a.test", extra(b_port, "a.test")) as a, \
            running(tmp_path / "b.test", extra(a.port, "b.test", listen=b_port)) as b:
        a.send(["someone@loop.test"], b"Subject: round and round\r\n\r\nx\r\n",
               sender="me@example.test")
        wait_until(lambda: "5.4.6" in a.log + b.log, "the loop is stopped", timeout=120)
        both = a.log + b.log
        assert both.count("status=sent (250 2.0.0 Ok: queued as") == 50, "50 relays, then the refusal"
        assert "status=bounced (554 5.4.6 Too many hops: mail forwarding loop)" in both

        def left() -> list[list[object]]:
            return [[x["state"] for x in r["recipients"]]  # type: ignore[attr-defined]
                    for q in ("a.test", "b.test") for r in records(tmp_path / q / "queue")]
        # The message is nowhere but in one failed/ record: no copy goes round any more; the
        # sender (local on both) got the bounce saying why.
        wait_until(lambda: left() == [["failed"]], "one failed record left")
        wait_until(lambda: a.delivered("me@example.test") or b.delivered("me@example.test"),
                   "the bounce delivered")
        [dsn] = a.delivered("me@example.test") + b.delivered("me@example.test")
        assert b"Status: 5.4.6" in dsn.read_bytes()
