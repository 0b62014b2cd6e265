"""The LMTP transport against a real Dovecot LMTP server (tests/dovecot.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

import dovecot
from dovecot import Dovecot
from elemta.delivery.base import Envelope, RecipientResult
from elemta.delivery.client import Timeouts
from elemta.delivery.lmtp import LmtpTransport, TransportSpec, parse_transport

ALL = tuple(f"{u}@example.test" for u in ("alice", "bob", "dave"))


@pytest.fixture(scope="module")
def dc() -> Iterator[Dovecot]:
    with dovecot.running() as d:
        yield d


def body_file(tmp_path: Path, text: bytes | None = None, size: int = 0) -> tuple[Path, bytes]:
    marker = uuid.uuid4().hex
    if text is None:
        text = (f"From: a@example.org\r\nSubject: {marker}\r\nMessage-ID: <{marker}@test>\r\n\r\n"
                "hello\r\n").encode()
    path = tmp_path / f"{marker}.eml"
    path.write_bytes(text)
    return path, text


def envelope(path: Path, recipients: Sequence[str], sender: str = "a@example.org") -> Envelope:
    return Envelope(path.stem, sender, tuple(recipients), path, path.stat().st_size)


def deliver(spec: str, *envelopes: Envelope, **kw: object) -> tuple[list[list[RecipientResult]],
                                                                     LmtpTransport]:
    async def main() -> tuple[list[list[RecipientResult]], LmtpTransport]:
        t = LmtpTransport(spec, **kw)  # type: ignore[arg-type]
        try:
            return [list(await t.deliver(e)) for e in envelopes], t
        finally:
            await t.close()
    return asyncio.run(main())


def stored(dc: Dovecot, user: str, body: bytes) -> list[bytes]:
    """The copies of `body` Dovecot stored for `user` (it prepends Return-Path and Received)."""
    return [m for m in dc.messages(user) if m.replace(b"\n", b"\r\n").endswith(body)]


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_one_message_to_three_users(dc: Dovecot, tmp_path: Path, via: str) -> None:
    path, body = body_file(tmp_path)
    [results], _t = deliver(getattr(dc, via), envelope(path, ALL))
    assert [r.recipient for r in results] == list(ALL)
    assert [r.reply.code for r in results] == [250, 250, 250], results
    assert all("Saved" in r.reply.text for r in results)
    if via == "tcp":
        assert results[0].relay == f"lmtp.test[127.0.0.1]:{dc.port}"
    else:
        assert results[0].relay == dc.socket_path
    for rcpt in ALL:
        copies = stored(dc, rcpt, body)
        assert len(copies) == 1, (rcpt, dc.messages(rcpt))
        assert copies[0].startswith(b"Return-Path: <a@example.org>")
        assert b"by lmtp.test with LMTP" in copies[0]


def test_unknown_user_among_known(dc: Dovecot, tmp_path: Path) -> None:
    path, body = body_file(tmp_path)
    rcpts = ("alice@example.test", "nobody@example.test", "bob@example.test")
    [results], _ = deliver(dc.tcp, envelope(path, rcpts))
    assert [r.reply.code for r in results] == [250, 550, 250], results
    assert results[1].reply.kind == "failed"
    assert results[1].reply.text.startswith("5.1.1 <nobody@example.test>")
    assert len(stored(dc, "alice", body)) == 1 and len(stored(dc, "bob", body)) == 1


def test_only_unknown_users_sends_no_data(dc: Dovecot, tmp_path: Path) -> None:
    path, _ = body_file(tmp_path)
    [results], t = deliver(dc.tcp, envelope(path, ["x@example.test", "y@example.test"]))
    assert [r.reply.code for r in results] == [550, 550]
    assert t.stats.messages == 0


def test_quota_is_per_recipient(dc: Dovecot, tmp_path: Path) -> None:
    path, body = body_file(tmp_path, b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 +
                           (b"y" * 70 + b"\r\n") * 50)
    rcpts = ("alice@example.test", "carol@example.test", "bob@example.test")
    [results], _ = deliver(dc.tcp, envelope(path, rcpts))
    assert [r.reply.code for r in results] == [250, 552, 250], results
    assert results[1].reply.text.startswith("5.2.2 <carol@example.test> Quota exceeded")
    assert stored(dc, "carol", body) == []
    assert len(stored(dc, "alice", body)) == 1


def test_quota_tempfail_is_a_4xx() -> None:
    with dovecot.running("quota_full_tempfail = yes") as dc, \
            _tmpdir() as tmp_path:
        path, _ = body_file(tmp_path, b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 50)
        [results], _ = deliver(dc.tcp, envelope(path, ["carol@example.test", "dave@example.test"]))
        assert [r.reply.code for r in results] == [452, 250], results
        assert results[0].reply.kind == "deferred"


def test_dots_arrive_intact(dc: Dovecot, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex.encode()
    text = (b"Subject: " + marker + b"\r\n\r\n.\r\n..\r\n.hidden\r\n. \r\nend .\r\n" +
            b"\r\n".join(b"." * n for n in range(1, 50)) + b"\r\n.")  # no final CRLF
    path, _ = body_file(tmp_path, text)
    [results], _ = deliver(dc.tcp, envelope(path, ["dave@example.test"]), )
    assert [r.reply.code for r in results] == [250]
    [copy] = [m for m in dc.messages("dave") if marker in m]
    # Dovecot stores LF; the stream added the missing final CRLF.
    assert copy.replace(b"\n", b"\r\n").endswith(b"\r\n" + text + b"\r\n")


def test_connection_reused_for_the_next_message(dc: Dovecot, tmp_path: Path) -> None:
    p1, _b1 = body_file(tmp_path)
    p2, _b2 = body_file(tmp_path)
    p3, b3 = body_file(tmp_path)
    connects = dc.log.count("Info: Connect from")
    results, t = deliver(dc.tcp, envelope(p1, ["alice@example.test"]),
                         envelope(p2, ["nobody@example.test"]),  # no DATA, RSET next
                         envelope(p3, ["bob@example.test", "alice@example.test"]))
    assert [[r.reply.code for r in rs] for rs in results] == [[250], [550], [250, 250]]
    assert t.stats.connections == 1 and t.stats.messages == 2 and t.stats.reused == 1
    assert dc.log.count("Info: Connect from") == connects + 1, "Dovecot saw one connection"
    assert len(stored(dc, "alice", b3)) == 1 and len(stored(dc, "bob", b3)) == 1


def test_kept_connection_closed_by_the_server_is_not_a_delivery_failure(
        tmp_path: Path) -> None:
    """The server's end of a kept connection is gone (its lmtp process killed while idle, as
    an idle timeout or a restart would): the next message goes out on a new connection,
    with no 4xx; the RSET that checks a kept connection rides in the pipelined group."""
    p1, _ = body_file(tmp_path)
    p2, b2 = body_file(tmp_path)
    with dovecot.running() as dc:
        dc.expected_errors.append("killed with signal 9")

        async def main() -> tuple[list[RecipientResult], LmtpTransport]:
            t = LmtpTransport(dc.tcp)
            try:
                first = await t.deliver(envelope(p1, ["alice@example.test"]))
                assert [r.reply.code for r in first] == [250] and t.idle == 1
                for pid in dc.lmtp_children():
                    os.kill(pid, signal.SIGKILL)
                return list(await t.deliver(envelope(p2, ["bob@example.test"]))), t
            finally:
                await t.close()
        second, t = asyncio.run(main())
        assert [r.reply.code for r in second] == [250], second
        assert t.stats.connections == 2 and t.stats.messages == 2 and t.stats.reused == 0
        assert len(stored(dc, "bob", b2)) == 1


def test_idle_connection_closed_after_idle_timeout(dc: Dovecot, tmp_path: Path) -> None:
    p1, _ = body_file(tmp_path)

    async def main() -> None:
        t = LmtpTransport(dc.tcp, idle_timeout=0.2)
        try:
            await t.deliver(envelope(p1, ["alice@example.test"]))
            assert t.idle == 1
            for _ in range(500):  # the idle timer fires on the loop
                if t.idle == 0:
                    break
                await asyncio.sleep(0.01)
            assert t.idle == 0
        finally:
            await t.close()
    asyncio.run(main())


def test_at_most_n_connections(dc: Dovecot, tmp_path: Path) -> None:
    path, _ = body_file(tmp_path, b"Subject: x\r\n\r\n" + b"z" * 200_000 + b"\r\n")

    async def main() -> LmtpTransport:
        t = LmtpTransport(dc.tcp, max_connections=2)
        try:
            res = await asyncio.gather(*(t.deliver(envelope(path, ["dave@example.test"]))
                                         for _ in range(6)))
            assert all(r[0].reply.code == 250 for r in res), res
            return t
        finally:
            await t.close()
    t = asyncio.run(main())
    assert t.stats.connections <= 2 and t.stats.messages == 6


def test_server_stopped_every_recipient_4xx(tmp_path: Path) -> None:
    with dovecot.running() as dc:
        pass  # started and stopped: nothing listens, the socket file stays
    for spec, where in ((dc.tcp, f"127.0.0.1:{dc.port}"), (dc.unix, dc.socket_path)):
        path, _ = body_file(tmp_path)
        [results], _ = deliver(spec, envelope(path, ALL))
        assert [r.reply.code for r in results] == [451] * 3, results
        assert results[0].reply.text in (f"4.4.1 connect to {where}: Connection refused",
                                          f"4.4.1 connect to {where}: No such file or directory")
        assert all(r.reply.kind == "deferred" for r in results)


def test_garbage_and_421(tmp_path: Path) -> None:
    """A peer that is not an LMTP server: each kind of failure is a 4xx per recipient."""
    path, _ = body_file(tmp_path)

    heard: list[bytes] = []

    async def serve(script: list[bytes], timeouts: Timeouts | None = None,
                    eight_bit: bool = False) -> list[RecipientResult]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for out in script:
                if out:
                    w.write(out)
                    await w.drain()
                heard.append(await r.readline())
                if heard[-1] == b"":
                    break
            w.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t = LmtpTransport(f"lmtp:127.0.0.1:{port}", timeouts=timeouts)
        try:
            env = replace(envelope(path, ["a@x.test", "b@x.test"]), eight_bit=eight_bit)
            return list(await t.deliver(env))
        finally:
            await t.close()
            server.close()
            await server.wait_closed()

    got = asyncio.run(serve([b"HTTP/1.0 400 Bad\r\n"]))
    assert [r.reply.code for r in got] == [451, 451]
    assert "garbage reply" in got[0].reply.text, got
    got = asyncio.run(serve([b"421 4.3.2 shutting down\r\n"]))
    assert [str(r.reply) for r in got] == ["421 4.3.2 shutting down"] * 2
    got = asyncio.run(serve([b"220 x\r\n", b"250-x\r\n250 PIPELINING\r\n", b"",
                             b"250 ok\r\n250 ok\r\n421 4.4.2 bye\r\n"]))
    assert [r.reply.code for r in got] == [421, 421], got
    # a 421 to a pipelined MAIL, then the server hangs up: the 421 is the reason
    got = asyncio.run(serve([b"220 x\r\n", b"250-x\r\n250 PIPELINING\r\n",
                             b"421 4.3.2 going down\r\n"]))
    assert [str(r.reply) for r in got] == ["421 4.3.2 going down"] * 2, got
    got = asyncio.run(serve([b"220 x\r\n", b"250 x\r\n", b"250 ok\r\n", b"250 ok\r\n"]))
    assert [r.reply.code for r in got] == [451, 451]
    assert "lost connection" in got[0].reply.text
    # SIZE= and BODY=8BITMIME when offered (and, for BODY, when the message was received so)
    heard.clear()
    got = asyncio.run(serve([b"220 x\r\n", b"250-x\r\n250-SIZE\r\n250 8BITMIME\r\n",
                             b"250 ok\r\n"], eight_bit=True))
    assert heard[1] == f"MAIL FROM:<a@example.org> SIZE={path.stat().st_size} BODY=8BITMIME\r\n".encode()
    heard.clear()
    got = asyncio.run(serve([b"220 x\r\n", b"250-x\r\n250 8BITMIME\r\n", b"250 ok\r\n"]))
    assert heard[1] == b"MAIL FROM:<a@example.org>\r\n"
    # a server that stops answering: the command timeout, not a hang
    got = asyncio.run(serve([b"220 x\r\n", b"", b""], Timeouts(command=0.3)))
    assert [str(r.reply) for r in got] == [
        f"451 4.4.2 conversation with {got[0].relay}: timed out in reply to LHLO"] * 2, got


def test_server_dies_mid_data(tmp_path: Path) -> None:
    """Dovecot's lmtp process killed while a large message streams: 4xx, no exception."""
    big = tmp_path / "big.eml"
    with open(big, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        line = b"x" * 76 + b"\r\n"
        f.write(line * (64 * 1024 * 1024 // len(line)))
    with dovecot.running() as dc:
        dc.expected_errors.append("killed with signal 9")

        async def main() -> list[RecipientResult]:
            t = LmtpTransport(dc.tcp, timeouts=None)
            try:
                task = asyncio.create_task(t.deliver(envelope(big, ["alice@example.test",
                                                                    "bob@example.test"])))
                # DATA is under way once our read position in the body file passes 4 MiB
                while read_position(big) < 4 << 20:
                    assert not task.done(), task.result()
                    await asyncio.sleep(0.005)
                for pid in dc.lmtp_children():
                    os.kill(pid, signal.SIGKILL)
                return list(await task)
            finally:
                await t.close()
        results = asyncio.run(main())
    assert [r.reply.code for r in results] == [451, 451], results
    assert results[0].reply.text.startswith("4.4.2 conversation with lmtp.test"), results


def read_position(path: Path) -> int:
    """This process's file offset in `path` (/proc/self/fdinfo), -1 while it is not open."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    return int(f.readline().split()[1])
        except OSError:
            continue
    return -1


class _tmpdir:
    def __enter__(self) -> Path:
        import tempfile
        self.d = tempfile.mkdtemp()
        return Path(self.d)

    def __exit__(self, *exc: object) -> None:
        import shutil
        shutil.rmtree(self.d, ignore_errors=True)


@pytest.mark.parametrize(("spec", "parsed"), [
    ("maildir", TransportSpec("maildir")),
    ("lmtp:unix:/run/dovecot/lmtp", TransportSpec("lmtp", path="/run/dovecot/lmtp")),
    ("lmtp:127.0.0.1:24", TransportSpec("lmtp", host="127.0.0.1", port=24)),
    ("lmtp:mail.example.org:2424", TransportSpec("lmtp", host="mail.example.org", port=2424)),
    ("lmtp:[::1]:24", TransportSpec("lmtp", host="::1", port=24)),
    ("lmtp:localhost", TransportSpec("lmtp", host="localhost", port=24)),
])
def test_parse_transport(spec: str, parsed: TransportSpec) -> None:
    assert parse_transport(spec) == parsed
    assert str(parsed) == spec if spec != "lmtp:localhost" else "lmtp:localhost:24"


@pytest.mark.parametrize(("spec", "problem"), [
    ("smtp:host:25", "must be \"maildir\""),
    ("lmtp:unix:run/lmtp", "must be absolute"),
    ("lmtp:::1:24", "needs brackets"),
    ("lmtp:[::1", "expected \"lmtp:[IPV6]:PORT\""),
    ("lmtp:[host]:24", "not an IPv6 address"),
    ("lmtp:host:0", "port must be a number from 1 to 65535"),
    ("lmtp:host:x", "port must be a number"),
    ("lmtp::24", "is not a host name"),
    ("lmtp:bad_host:24", "is not a host name"),
])
def test_parse_transport_errors(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("(", r"\(")):
        parse_transport(spec)



RSS_CHILD = r"""
import asyncio, sys, time
from pathlib import Path
from elemta.delivery.base import Envelope
from elemta.delivery.lmtp import LmtpTransport

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

async def main(spec, small, big):
    t = LmtpTransport(spec)
    env = lambda p: Envelope(p.stem, "a@example.org", ("bob@example.test",), p, p.stat().st_size)
    # warm-up: imports, executor threads, the connection, the first buffers
    assert (await t.deliver(env(Path(small))))[0].reply.code == 250
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = status("VmRSS")
    start = time.monotonic()
    [r] = await t.deliver(env(Path(big)))
    took = time.monotonic() - start
    peak = status("VmHWM")
    await t.close()
    print(r.reply.code, base, peak, took)

asyncio.run(main(*sys.argv[1:]))
"""


def test_50_mib_message_costs_under_2_mib_rss(dc: Dovecot, tmp_path: Path) -> None:
    big = tmp_path / "big.eml"
    with open(big, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        line = b".x" + b"y" * 74 + b"\r\n"  # every line stuffed: the slow path
        f.write(line * (50 * 1024 * 1024 // len(line)))
    small, _ = body_file(tmp_path)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, dc.tcp, str(small), str(big)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    code, base, peak, took = out.split()
    grew = int(peak) - int(base)
    print(f"50 MiB via LMTP: RSS {int(base) / 2**20:.1f} MiB, peak +{grew / 2**10:.0f} KiB, "
          f"{float(took):.2f} s ({50 / float(took):.0f} MiB/s)")
    assert code == "250"
    assert grew < 2 * 2**20, f"peak RSS grew by {grew / 2**20:.1f} MiB"
    [copy] = [m for m in dc.messages("bob") if len(m) > 50_000_000]
    assert copy.count(b"\n.x") == 50 * 1024 * 1024 // len(line)


def test_bare_lf_cannot_truncate_or_desync(dc: Dovecot, tmp_path: Path) -> None:
    """Dovecot, like Postfix, ends a line at a bare LF: "\\n.\\n" in a body would end DATA
    early there and the rest would be read as commands. RFC 5321 2.3.8: a client sends line
    ends only as CRLF, so the stream turns a bare LF into CRLF (and stuffs the line after it)."""
    marker = uuid.uuid4().hex.encode()
    text = b"Subject: " + marker + b"\r\n\r\nx\n.\nafter\n.y\r\nlast\r\n"
    p1, _ = body_file(tmp_path, text)
    p2, b2 = body_file(tmp_path)
    results, t = deliver(dc.tcp, envelope(p1, ["dave@example.test"]),
                         envelope(p2, ["dave@example.test"]))
    assert [[r.reply.code for r in rs] for rs in results] == [[250], [250]], results
    [copy] = [m for m in dc.messages("dave") if marker in m]
    assert copy.endswith(b"\n\nx\n.\nafter\n.y\nlast\n"), copy
    assert len(stored(dc, "dave", b2)) == 1 and t.stats.connections == 1
