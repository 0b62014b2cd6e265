"""What the queue says to the LMTP server about a message: LHLO with [server] hostname, and
BODY=8BITMIME on MAIL FROM when the client sent the message with it. Dovecot does not log MAIL
parameters, so a tiny recording LMTP server (an edge-case stand-in) hears them; the LHLO name
is also checked in the Received line real Dovecot writes."""

from __future__ import annotations

import asyncio
import re
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from test_queue_dovecot import ids_in

import dovecot
from daemon import running, wait_until
from elemta.delivery.base import Envelope
from elemta.delivery.lmtp import LmtpTransport


class Recorder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Session)
        self.lines: list[str] = []
        self.messages = 0


class Session(socketserver.StreamRequestHandler):
    server: Recorder

    def handle(self) -> None:
        out = self.wfile
        out.write(b"220 rec.test LMTP\r\n")
        rcpts = 0
        for raw in self.rfile:
            line = raw.decode().rstrip("\r\n")
            self.server.lines.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "LHLO":
                out.write(b"250-rec.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                          b"250-SIZE\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb in ("MAIL", "RSET"):
                rcpts = 0
                out.write(b"250 2.1.0 OK\r\n")
            elif verb == "RCPT":
                rcpts += 1
                out.write(b"250 2.1.5 OK\r\n")
            elif verb == "DATA":
                out.write(b"354 go\r\n")
                out.flush()
                for body in self.rfile:
                    if body == b".\r\n":
                        break
                self.server.messages += 1
                out.write(b"250 2.0.0 Saved\r\n" * rcpts)
            elif verb == "QUIT":
                out.write(b"221 bye\r\n")
                return
            else:
                out.write(b"500 what\r\n")
            out.flush()


@contextmanager
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def extra(spec: str, workdir: Path) -> str:
    return f'[delivery]\ntransport = "{spec}"\nqueue_dir = "{workdir / "queue"}"\n'


def test_mail_from_carries_8bitmime_as_received_and_lhlo_names_the_host(tmp_path: Path) -> None:
    with recorder() as rec, running(tmp_path, extra(f"lmtp:127.0.0.1:{rec.server_address[1]}",
                                                    tmp_path)) as d:
        with d.smtp() as s:
            s.sendmail("s@example.org", ["alice@example.test"],
                       "Subject: caf\u00e9\r\n\r\n8 bit: \u00e9\r\n".encode(),
                       mail_options=["BODY=8BITMIME"])
            s.sendmail("s@example.org", ["bob@example.test"], b"Subject: plain\r\n\r\n7 bit\r\n")
        wait_until(lambda: rec.messages == 2, "both delivered to the recorder")
        mails = [ln for ln in rec.lines if ln.startswith("MAIL FROM:")]
        assert mails[0].endswith(" BODY=8BITMIME"), mails
        assert "BODY" not in mails[1], mails
        assert not any("SMTPUTF8" in m for m in mails)  # not used by the client
        assert {ln for ln in rec.lines if ln.startswith("LHLO")} == {"LHLO mx.test"}
        with socket.create_connection(("127.0.0.1", d.port)) as c:  # elemta offers 8BITMIME
            c.recv(1000)
            c.sendall(b"EHLO c.test\r\n")
            assert b"8BITMIME" in c.recv(1000)


def test_dovecot_records_the_lhlo_name(tmp_path: Path) -> None:
    with dovecot.running() as dc, running(tmp_path, extra(dc.tcp, tmp_path)) as d:
        d.send("alice@example.test", b"Message-ID: <lhlo@test>\r\n\r\nhi\r\n")
        wait_until(lambda: ids_in(dc, "alice") == ["lhlo@test"], "delivered")
        (msg,) = dc.messages("alice")
        assert re.search(rb"^Received: from mx\.test \(", msg, re.M), msg[:400]


def test_smtputf8_goes_on_where_the_server_offers_it(tmp_path: Path) -> None:
    # elemta does not offer SMTPUTF8 to its SMTP clients yet (aiosmtpd's enable_SMTPUTF8 is
    # off), so the queue's flag is only ever set by a future intake: the client alone here.
    body = tmp_path / "m.eml"
    body.write_bytes("Subject: \u00fcber\r\n\r\nx\r\n".encode())

    async def send() -> list[int]:
        t = LmtpTransport(f"lmtp:127.0.0.1:{rec.server_address[1]}", lhlo_name="mx.test")
        try:
            env = Envelope("0000000000CC", "s@example.org", ("j\u00fcrgen@example.test",),
                           body, body.stat().st_size, eight_bit=True, smtputf8=True)
            return [r.reply.code for r in await t.deliver(env)]
        finally:
            await t.close()

    with recorder() as rec:
        assert asyncio.run(send()) == [250]
    (mail,) = [ln for ln in rec.lines if ln.startswith("MAIL FROM:")]
    assert mail.endswith(" BODY=8BITMIME SMTPUTF8"), mail
