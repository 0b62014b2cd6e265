"""Relaying to a smarthost over SMTP: the client (delivery/smtp.py) against a real Postfix
(tests/postfixhub.py) and against elemta itself as the next hop; the daemon with
[delivery] relay_domains, which never turns into an open relay."""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import socketserver
import subprocess
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

import postfixhub
from daemon import Daemon, free_port, running, wait_until
from elemta.delivery.base import Envelope, RecipientResult
from elemta.delivery.client import Timeouts
from elemta.delivery.smtp import SmtpTransport
from postfixhub import DOMAIN, Postfix

pytestmark = pytest.mark.skipif(not postfixhub.installed(), reason="postfix not installed")


@pytest.fixture(scope="module")
def hub() -> Iterator[Postfix]:
    with postfixhub.running() as p:
        yield p


def body_file(tmp_path: Path, extra: bytes = b"") -> tuple[Path, bytes]:
    marker = uuid.uuid4().hex.encode()
    text = (b"From: a@example.org\r\nSubject: " + marker + b"\r\nMessage-ID: <" + marker +
            b"@test>\r\n\r\nhello\r\n.dot line\r\n" + extra)
    path = tmp_path / f"{marker.decode()}.eml"
    path.write_bytes(text)
    return path, marker


def envelope(path: Path, recipients: Sequence[str], sender: str = "a@example.org") -> Envelope:
    return Envelope(path.stem[:12].upper(), sender, tuple(recipients), path, path.stat().st_size)


def deliver(spec: str, *envelopes: Envelope, **kw: object
            ) -> tuple[list[list[RecipientResult]], SmtpTransport]:
    async def main() -> tuple[list[list[RecipientResult]], SmtpTransport]:
        t = SmtpTransport(spec, helo_name="relay.elemta.test", **kw)  # type: ignore[arg-type]
        try:
            return [list(await t.deliver(e)) for e in envelopes], t
        finally:
            await t.close()
    return asyncio.run(main())


def at(user: str) -> str:
    return f"{user}@{DOMAIN}"


# -- the client against Postfix ---------------------------------------------------------------


def test_one_message_to_three_recipients_then_a_second_on_the_same_connection(
        hub: Postfix, tmp_path: Path) -> None:
    p1, m1 = body_file(tmp_path)
    p2, m2 = body_file(tmp_path)
    results, t = deliver(f"smtp:[127.0.0.1]:{hub.port}",
                         envelope(p1, [at("alice"), at("bob"), at("carol")]),
                         envelope(p2, [at("alice")]))
    assert [[r.reply.code for r in rs] for rs in results] == [[250, 250, 250], [250]], results
    assert results[0][0].relay == f"hub.test[127.0.0.1]:{hub.port}"
    assert "queued as" in results[0][0].reply.text
    for user in ("alice", "bob", "carol"):
        copy = hub.wait_for(user, m1)
        assert f"Delivered-To: {at(user)}".encode() in copy
        assert b"Return-Path: <a@example.org>" in copy
        assert b"helo=relay.elemta.test" in copy or b"from relay.elemta.test" in copy, copy[:400]
        assert copy.replace(b"\n", b"\r\n").endswith(b"\r\n\r\nhello\r\n.dot line\r\n")
    hub.wait_for("alice", m2)
    assert t.stats.connections == 1 and t.stats.messages == 2 and t.stats.reused == 1
    # Postfix's own count of that session's commands: both messages on one connection.
    wait_until(lambda: "ehlo=1 mail=2 rcpt=4 data=2 rset=1 quit=1 commands=11" in hub.log,
               "postfix logs one session carrying both messages")


def test_per_recipient_replies_451_retried_550_failed(hub: Postfix, tmp_path: Path) -> None:
    path, marker = body_file(tmp_path)
    rcpts = [at("tempfail"), at("alice"), at("reject"), at("nobody")]
    [results], _ = deliver(f"smtp:[127.0.0.1]:{hub.port}", envelope(path, rcpts))
    got = {r.recipient: (r.reply.code, r.reply.kind) for r in results}
    assert got == {at("tempfail"): (451, "deferred"), at("alice"): (250, "delivered"),
                   at("reject"): (550, "failed"), at("nobody"): (550, "failed")}, results
    by = {r.recipient: r.reply.text for r in results}
    assert by[at("tempfail")].startswith("4.7.1 <tempfail@relay.test>: Recipient address "
                                         "rejected: Try again later")
    assert "User unknown in virtual mailbox table" in by[at("nobody")]
    hub.wait_for("alice", marker)
    assert hub.messages("tempfail") == [] or not any(marker in m for m in hub.messages("tempfail"))


def test_hop_down_is_a_4xx_for_every_recipient(tmp_path: Path) -> None:
    path, _ = body_file(tmp_path)
    port = free_port()
    [results], _ = deliver(f"smtp:[127.0.0.1]:{port}", envelope(path, [at("alice"), at("bob")]))
    assert [(r.reply.code, r.reply.text) for r in results] == \
        [(451, f"4.4.1 connect to 127.0.0.1:{port}: Connection refused")] * 2


def to_scripted_hop(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                     Awaitable[None]],
                    path: Path, timeouts: Timeouts) -> RecipientResult:
    """One message for alice relayed to a loopback hop whose side of the talk is `handle`."""
    async def main() -> list[RecipientResult]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t = SmtpTransport(f"smtp:[127.0.0.1]:{port}", timeouts=timeouts)
        try:
            return list(await t.deliver(envelope(path, [at("alice")])))
        finally:
            await t.close()
            server.close()
    [r] = asyncio.run(main())
    return r


def test_greeting_and_reply_timeouts_come_from_the_timeouts(tmp_path: Path) -> None:
    """A hop that greets and then says nothing: the EHLO reply times out after `command`."""
    path, _ = body_file(tmp_path)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mute.test ESMTP\r\n")
        await r.read()  # never answers; returns when the client hangs up
        w.close()
    r = to_scripted_hop(handle, path, Timeouts(command=0.3))
    assert (r.reply.code, r.reply.text) == (451, f"4.4.2 conversation with mute.test[127.0.0.1]:"
                                                 f"{r.relay.rsplit(':', 1)[1]}: timed out in "
                                                 "reply to EHLO")


RSS_CHILD = r"""
import asyncio, sys, time
from pathlib import Path
from elemta.delivery.base import Envelope
from elemta.delivery.smtp import SmtpTransport

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

async def main(spec, small, big):
    t = SmtpTransport(spec)
    env = lambda p: Envelope("BIG", "a@example.org", ("bob@relay.test",), p, p.stat().st_size)
    assert (await t.deliver(env(Path(small))))[0].reply.code == 250  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = status("VmRSS")
    start = time.monotonic()
    [r] = await t.deliver(env(Path(big)))
    took = time.monotonic() - start
    peak = status("VmHWM")
    await t.close()
    print(r.reply.code, base, peak, took, t.stats.reused)

asyncio.run(main(*sys.argv[1:]))
"""


def test_50_mib_message_relayed_with_under_2_mib_rss_growth(hub: Postfix, tmp_path: Path) -> None:
    big = tmp_path / "big.eml"
    line = b".x" + b"y" * 74 + b"\r\n"  # every line stuffed: the slow path
    lines = 50 * 1024 * 1024 // len(line)
    with open(big, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        f.write(line * lines)
    small, _ = body_file(tmp_path)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, f"smtp:[127.0.0.1]:{hub.port}",
                          str(small), str(big)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    code, base, peak, took, reused = out.split()
    grew = int(peak) - int(base)
    print(f"\n50 MiB via SMTP to Postfix: RSS {int(base) / 2**20:.1f} MiB, peak +{grew / 2**10:.0f}"
          f" KiB, {float(took):.2f} s ({50 / float(took):.0f} MiB/s)")
    assert code == "250" and reused == "1"
    assert grew < 2 * 2**20, f"peak RSS grew by {grew / 2**20:.1f} MiB"

    def stored() -> list[Path]:
        new = hub.dir / "mail" / "bob" / "new"
        return [p for p in new.iterdir() if p.stat().st_size > 50_000_000] if new.is_dir() else []
    wait_until(stored, "Postfix stores the 50 MiB message", 120)
    [copy] = stored()
    with open(copy, "rb") as f:
        assert f.read().count(b"\n.x") == lines  # unstuffed by Postfix, every line there


# -- the daemon relaying ------------------------------------------------------------------------


def relay_extra(tmp_path: Path, port: int, more: str = "") -> str:
    return (f'[delivery]\nrelay_domains = ["{DOMAIN}"]\n'
            f'relay_transport = "smtp:[127.0.0.1]:{port}"\n'
            f'queue_dir = "{tmp_path / "queue"}"\n'
            'minimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"\n' + more)


def records(queue: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_bytes()) for p in queue.glob("*/*")
            if p.is_file() and p.parent.name in ("incoming", "hold", "failed")] + \
        [json.loads(p.read_bytes()) for p in queue.glob("deferred/*/*")]


def states(queue: Path) -> dict[str, str]:
    return {r["address"]: r["state"] for rec in records(queue)  # type: ignore[union-attr]
            for r in rec["recipients"]}  # type: ignore[attr-defined]


def test_relay_domains_relayed_and_everything_else_refused(hub: Postfix, tmp_path: Path) -> None:
    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d:
        with d.smtp() as s:
            s.ehlo("client.test")
            s.mail("sender@example.org")
            # Never an open relay: a domain that is neither ours nor a relay domain.
            assert s.rcpt("victim@elsewhere.test") == (
                550, b"5.7.1 Relaying denied: we do not accept mail for that domain")
            assert s.rcpt("x@sub.relay.test")[0] == 550  # a subdomain is another domain
            assert s.docmd('RCPT TO:<"a b"@relay.test>') == (553, b"5.1.3 Bad recipient address syntax")
            assert s.rcpt(f"Alice@{DOMAIN.upper()}") == (250, b"2.1.5 Recipient ok")
            assert s.rcpt(at("tempfail"))[0] == 250
            assert s.rcpt(at("reject"))[0] == 250
            assert s.rcpt("user@example.test")[0] == 250  # still our own domain
            code, _ = s.data(b"Subject: relay\r\nMessage-ID: <relay-1@test>\r\n\r\nvia hub\r\n")
            assert code == 250
        copy = hub.wait_for("alice", b"relay-1@test")
        assert b"X-Original-To: Alice@relay.test" in copy  # the local part as sent
        assert b"by mx.test (elemta" in copy  # our own Received: went along
        want = {f"Alice@{DOMAIN}": "delivered", at("tempfail"): "pending",
                at("reject"): "failed", "user@example.test": "delivered"}
        wait_until(lambda: states(tmp_path / "queue") == want, "each recipient's outcome recorded")
        assert f"to=<Alice@{DOMAIN}>, relay=hub.test[127.0.0.1]:{hub.port}" in d.log
        assert "dsn=5.7.1, status=bounced (550 5.7.1 <reject@relay.test>" in d.log
        assert d.delivered("user@example.test")


def test_bare_lf_in_a_queued_body_goes_out_as_crlf(hub: Postfix, tmp_path: Path) -> None:
    """A bare LF (kept as received) goes to the hop as CRLF, the line after it dot-stuffed:
    Postfix ends a line at a bare LF, so sent as-is the ".two" line would lose its dot. The
    queue records which bodies hold one (Meta.crlf): a clean body is not checked again."""
    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d:
        with d.smtp() as s:
            s.ehlo("client.test")
            assert s.mail("sender@example.org")[0] == 250
            assert s.rcpt(at("alice"))[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(b"Subject: lf\r\nMessage-ID: <bare-1@test>\r\n\r\none\n.two\r\n.\r\n")
            assert s.getreply()[0] == 250
            assert s.mail("sender@example.org")[0] == 250
            assert s.rcpt(at("alice"))[0] == 250
            assert s.data(b"Subject: crlf\r\nMessage-ID: <clean-1@test>\r\n\r\n.three\r\n")[0] == 250
        assert hub.wait_for("alice", b"bare-1@test").endswith(b"\n\none\n.two\n")
        assert hub.wait_for("alice", b"clean-1@test").endswith(b"\n\n.three\n")


def test_hop_down_deferred_then_delivered_after_flush(tmp_path: Path) -> None:
    port = free_port()
    with running(tmp_path, relay_extra(tmp_path, port)) as d:
        d.send([at("bob"), at("carol")], b"Subject: later\r\nMessage-ID: <later-1@test>\r\n\r\nx\r\n")
        wait_until(lambda: d.log.count("status=deferred") == 2, "both recipients deferred")
        assert f"(451 4.4.1 connect to 127.0.0.1:{port}: Connection refused)" in d.log
        assert set(states(tmp_path / "queue").values()) == {"pending"}
        with postfixhub.running(port) as hub:
            flush = subprocess.run([sys.executable, "-m", "elemta.cli", "queue", "flush",
                                    "--config", str(d.config_path)], capture_output=True,
                                   text=True, timeout=60)
            assert flush.returncode == 0, flush
            hub.wait_for("bob", b"later-1@test")
            hub.wait_for("carol", b"later-1@test")
            wait_until(lambda: records(tmp_path / "queue") == [], "the message leaves the queue")
            assert d.log.count("status=sent") == 2


# -- elemta as the next hop ---------------------------------------------------------------------


def hop_extra(tmp_path: Path, size: str = "50MiB") -> str:
    users = tmp_path / "hop-users"
    users.write_text(f"alice@{DOMAIN}\nbob@{DOMAIN}\n")
    return (f'[server]\nhostname = "hop.test"\nmax_message_size = "{size}"\n'
            f'[delivery]\ndomains = ["{DOMAIN}"]\nrecipients = "file:{users}"\n')


def test_elemta_relays_to_elemta(tmp_path: Path) -> None:
    with running(tmp_path / "hop", hop_extra(tmp_path)) as hop, \
            running(tmp_path / "edge", relay_extra(tmp_path / "edge", hop.port)) as edge:
        with edge.smtp() as s:
            refused = s.sendmail("s@example.org", [at("alice"), at("bob"), at("nobody")],
                                 b"Subject: two hops\r\nMessage-ID: <hop-1@test>\r\n\r\n"
                                 b"..leading dot\r\n")
        assert refused == {}  # the edge takes any address of a relay domain
        wait_until(lambda: hop.delivered(at("alice")) and hop.delivered(at("bob")),
                   "the hop stores both copies")
        data = hop.delivered(at("alice"))[0].read_bytes()
        assert data.count(b"Received: from ") == 2 and data.endswith(b"\n\n..leading dot\n")
        assert b"Return-Path: <s@example.org>" in data
        wait_until(lambda: "status=bounced" in edge.log, "the unknown user failed")
        assert f"to=<{at('nobody')}>, relay=hop.test[127.0.0.1]:{hop.port}" in edge.log
        assert "status=bounced (550 5.1.1 <nobody@relay.test>: Recipient address rejected: " \
               "User unknown)" in edge.log


def test_a_message_above_the_hops_size_fails_before_mail(tmp_path: Path) -> None:
    with running(tmp_path / "hop", hop_extra(tmp_path, size="2KiB")) as hop, \
            running(tmp_path / "edge", relay_extra(tmp_path / "edge", hop.port)) as edge:
        edge.send([at("alice")], b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 40)
        wait_until(lambda: "status=bounced" in edge.log, "the message failed")
        assert "dsn=5.3.4, status=bounced (552 5.3.4 message size " in edge.log
        assert "exceeds size limit 2048 of the server)" in edge.log
        assert "MAIL FROM" not in hop.log and hop.delivered(at("alice")) == []
        wait_until(lambda: states(tmp_path / "edge" / "queue").get(at("alice")) == "failed",
                   "the failure recorded")


# -- what goes over the wire (a tiny recording server: the one edge case Postfix cannot show) --


class Recorder(socketserver.ThreadingTCPServer):
    """An ESMTP server that accepts everything and records each command line it gets."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, dsn: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.lines: list[bytes] = []
        self.sizes: list[int] = []  # SIZE= of each MAIL
        self.dsn = dsn  # offer the DSN extension
        self.port = self.server_address[1]


class RecorderHandler(socketserver.StreamRequestHandler):
    server: Recorder

    def handle(self) -> None:
        self.wfile.write(b"220 rec.test ESMTP\r\n")
        while line := self.rfile.readline():
            self.server.lines.append(line.rstrip(b"\r\n"))
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.wfile.write(b"250-rec.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n" +
                                 (b"250-DSN\r\n" if self.server.dsn else b"") +
                                 b"250 SIZE 1000000\r\n")
            elif verb == b"MAIL":
                self.server.sizes.append(int(line.split(b"SIZE=")[1].split()[0]))
                self.wfile.write(b"250 2.0.0 ok\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go\r\n")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                self.wfile.write(b"250 2.0.0 kept\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 2.0.0 ok\r\n")


def test_body_8bitmime_is_relayed_with_the_message(tmp_path: Path) -> None:
    rec = Recorder()
    threading.Thread(target=rec.serve_forever, daemon=True).start()
    try:
        with running(tmp_path, relay_extra(tmp_path, rec.port)) as d:
            with d.smtp() as s:
                s.sendmail("s@example.org", [at("alice")], "Subject: é\r\n\r\nnaïve\r\n".encode(),
                           mail_options=["BODY=8BITMIME"])
                s.sendmail("s@example.org", [at("bob")], b"Subject: ascii\r\n\r\nplain\r\n")
            wait_until(lambda: d.log.count("status=sent") == 2, "both relayed")
        mails = [x for x in rec.lines if x.startswith(b"MAIL FROM")]
        assert mails[0].startswith(b"MAIL FROM:<s@example.org> SIZE=") and \
            mails[0].endswith(b" BODY=8BITMIME"), mails
        assert b"BODY=" not in mails[1], mails
        assert rec.lines[0] == b"EHLO mx.test"  # [server] hostname
    finally:
        rec.shutdown()
        rec.server_close()


def test_kill_9_while_relaying_loses_no_accepted_message(hub: Postfix, tmp_path: Path) -> None:
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int, d: Daemon) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            mid = f"{n}.{i}.{uuid.uuid4().hex[:8]}@kill.test"
            try:
                with d.smtp(timeout=10) as s:
                    s.sendmail("s@example.org", [at("bob")],
                               f"Message-ID: <{mid}>\r\nSubject: k\r\n\r\n".encode() +
                               (b"x" * 70 + b"\r\n") * 30)
            except (smtplib.SMTPException, OSError):
                return  # killed: this one was not acknowledged
            with lock:
                acked.append(mid)

    def arrived() -> list[str]:
        return [m.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()
                for m in hub.messages("bob") if b"@kill.test>" in m]

    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d:
        threads = [threading.Thread(target=client, args=(n, d)) for n in range(4)]
        for t in threads:
            t.start()
        # Killed while messages are being relayed: some already at the hub, some not yet.
        wait_until(lambda: len(acked) >= 150 and arrived(), "150 acknowledged, relaying under way",
                   timeout=120)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        stop.set()
        for t in threads:
            t.join()
        at_kill = len(set(arrived()))
        d.restart()
        sent = set(acked)
        wait_until(lambda: sent <= set(arrived()), "every acknowledged message at the hub",
                   timeout=180)
        got = arrived()
        dupes = len(got) - len(set(got))
        print(f"\nkill -9 while relaying: {len(sent)} acknowledged, {at_kill} at the hub at the "
              f"kill, {len(set(got))} after the restart, {dupes} duplicate(s)")
        assert dupes <= 20  # only messages in flight at the kill may come twice
        wait_until(lambda: records(tmp_path / "queue") == [], "the queue empties")


def test_data_is_pipelined_with_mail_and_rcpt(tmp_path: Path) -> None:
    """A server offering PIPELINING gets MAIL, RCPT and DATA in one group (RFC 2920), as
    Postfix's client sends them: this one answers only once it has all three."""
    path, _ = body_file(tmp_path)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 strict.test ESMTP\r\n")
        assert (await r.readline()).startswith(b"EHLO")
        w.write(b"250-strict.test\r\n250 PIPELINING\r\n")
        group = [await r.readline() for _ in range(3)]
        assert group[2] == b"DATA\r\n", group
        w.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
        while await r.readline() not in (b".\r\n", b""):
            pass
        w.write(b"250 2.0.0 kept\r\n")
        await r.read()
        w.close()
    r = to_scripted_hop(handle, path, Timeouts(command=2))
    assert str(r.reply) == "250 2.0.0 kept", r
