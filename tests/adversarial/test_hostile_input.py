"""Hostile clients: each gets a correct reply, memory stays bounded, nothing crashes or is lost."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from daemon import Daemon, rss_of, running
from smtpclient import RawSMTP

MiB = 1024 * 1024
MSG = b"Subject: ok\r\n\r\nfine\r\n"


def _session(d: Daemon) -> RawSMTP:
    c = RawSMTP(d.host, d.port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO hostile.test")[0] == 250
    return c


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slow_command_sender_is_cut_by_the_timeout(tmp_path: Path) -> None:
    with running(tmp_path, '[server]\ncommand_timeout = "2s"') as d, RawSMTP(d.host, d.port) as c:
        c.reply()
        t0 = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):
            for byte in b"EHLO slow.example.org\r\n" * 10:
                c.send(bytes([byte]))
                time.sleep(0.5)
        code, text = c.reply()  # the 421 arrived before the close
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert time.monotonic() - t0 < 10


def test_slow_data_sender_is_cut_even_while_it_keeps_dripping(tmp_path: Path) -> None:
    with running(tmp_path, '[server]\ndata_timeout = "2s"') as d, _session(d) as c:
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<drip@example.test>")
        assert c.cmd("DATA")[0] == 354
        t0 = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(40):
                c.send(b"x")
                time.sleep(0.3)
        assert c.reply()[0] == 421
        assert time.monotonic() - t0 < 8
        assert d.delivered("drip@example.test") == []


def test_many_slow_senders_cannot_starve_others(tmp_path: Path) -> None:
    with running(tmp_path, '[server]\nmax_connections = 30\ncommand_timeout = "3s"') as d:
        slow = []
        for _ in range(30):
            s = socket.create_connection((d.host, d.port))
            s.sendall(b"EH")  # never finishes the line
            slow.append(s)
        time.sleep(0.3)
        # At the cap: a clean refusal, not a hang.
        with RawSMTP(d.host, d.port) as c:
            code, text = c.reply()
            assert (code, text.split()[0]) == (421, "4.7.0")
        # The timeout frees the slots and a normal client is served again.
        deadline = time.monotonic() + 15
        while True:
            try:
                assert d.send("served@example.test", MSG) == {}
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        for s in slow:
            s.close()
        assert len(d.delivered("served@example.test")) == 1


def test_megabyte_command_line(daemon: Daemon) -> None:
    before = rss_of(daemon.proc.pid)
    with _session(daemon) as c:
        code, text = c.cmd(b"MAIL FROM:<" + b"a" * (1024 * 1024) + b"@example.org>")
        assert (code, text.split()[0]) == (500, "5.5.2")
        assert c.cmd("NOOP")[0] == 250
    assert rss_of(daemon.proc.pid) - before < 8 * MiB


def test_ten_thousand_recipients(tmp_path: Path) -> None:
    with running(tmp_path, "[server]\nmax_recipients = 100") as d, _session(d) as c:
        c.cmd("MAIL FROM:<x@example.org>")
        c.send(b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(10_000)))
        codes = [c.reply() for _ in range(10_000)]
        assert [code for code, _ in codes[:100]] == [250] * 100
        assert {(code, text.split()[0]) for code, text in codes[100:]} == {(452, "4.5.3")}
        assert c.cmd("DATA")[0] == 354
        c.send(MSG)
        assert c.cmd(".")[0] == 250
        assert len(d.delivered("r99@example.test")) == 1


@pytest.mark.parametrize(
    "command",
    [
        b"EHLO \x00\x00",
        b"MAIL FROM:<a\x00b@example.org>",
        b"\x00\x00\x00",
        b"MAIL FROM:<\xff\xfe@example.org>",
        b"RCPT TO:<\xc3\xa9l\xc3\xa8ve@example.test>",
        b"MAIL FROM:<x@example.org> SIZE=abc",
        b"MAIL FROM:<x@example.org> SIZE=",
        b"MAIL FROM:<x@example.org> BODY=9BIT",
        b"MAIL FROM:<x@example.org> SMTPUTF8",
        b"MAIL FROM:x@example.org> =",
        b"MAIL FROM:<<<>>>",
        b"MAIL TO:<x@example.org>",
        b"RCPT TO:<a@example.test> NOTIFY=NEVER",
        b"RCPT TO:<@relay.example:a@example.test>",
        b"EHLO",
        b"HELO",
        b"VRFY",
        b"AUTH PLAIN AGFiYwBkZWY=",
        b"STARTTLS",
        b"\r",
        b" ",
    ],
)
def test_malformed_commands_get_a_reply_and_the_session_goes_on(daemon: Daemon, command: bytes) -> None:
    with _session(daemon) as c:
        code, _ = c.cmd(command)
        assert 400 <= code < 600 or code == 252, code
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<ok@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<ok@example.test>")[0] == 250


def test_invalid_utf8_in_headers_is_stored_verbatim(daemon: Daemon) -> None:
    with _session(daemon) as c:
        c.cmd("MAIL FROM:<x@example.org> BODY=8BITMIME")
        c.cmd("RCPT TO:<raw@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: \xff\xfe broken \xc3\r\nX-Null: a\x00b\r\n\r\nbody \xe9\r\n")
        assert c.cmd(".")[0] == 250
    (path,) = daemon.delivered("raw@example.test")
    assert path.read_bytes().endswith(b"Subject: \xff\xfe broken \xc3\nX-Null: a\x00b\n\nbody \xe9\n")


@pytest.mark.parametrize("ending", [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\n", b"\r\n\r.\r\n"])
def test_near_miss_end_markers_do_not_end_data(daemon: Daemon, ending: bytes) -> None:
    with _session(daemon) as c:
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<near@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: near\r\n\r\ntext" + ending + b"RSET\r\nMAIL FROM:<evil@example.org>\r\n")
        # Nothing may have ended DATA: no reply is pending yet.
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        c.sock.settimeout(30)
        assert c.cmd("\r\n.")[0] == 250
    (path,) = daemon.delivered("near@example.test")
    assert b"MAIL FROM:<evil@example.org>" in path.read_bytes()


def _recv_queue(local_port: int, remote_port: int) -> int:
    """Bytes the kernel holds for the socket (local_port <- remote_port) that its owner has not read."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return int(queues.split(":")[1], 16)
    raise AssertionError("socket not found in /proc/net/tcp")


def test_pipelining_client_that_never_reads_is_throttled(daemon: Daemon) -> None:
    """100,000 commands and no reading: the daemon stops reading instead of buffering replies.

    HELP, not NOOP: its ~80-byte reply makes 8 MB of replies, more than the kernel's send buffer
    can ever hold (tcp_wmem max 4 MiB), so the daemon must stop reading however fast it is."""
    before = rss_of(daemon.proc.pid)
    s = socket.create_connection((daemon.host, daemon.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(3)
    blob = b"HELP\r\n" * 100_000
    sent = 0
    try:
        while sent < len(blob):
            sent += s.send(blob[sent : sent + 65536])
    except TimeoutError:
        pass  # the daemon stopped reading and the kernel buffers are full
    time.sleep(0.5)
    # Unread input waits in the daemon's kernel receive queue, not in its memory.
    assert _recv_queue(daemon.port, s.getsockname()[1]) > 0
    # Measured: ~4 MiB after 100k commands, allocator high-water rather than held data
    # (the session itself holds < 70 KiB: a 2 KiB read buffer and a 64 KiB write buffer).
    assert rss_of(daemon.proc.pid) - before < 16 * MiB
    # Everyone else is still served meanwhile.
    assert daemon.send("other@example.test", MSG) == {}
    # And the slow reader loses nothing: every command it managed to send is answered.
    s.settimeout(30)
    s.sendall(blob[sent:])
    got = b""
    while got.count(b"\r\n") < 100_001:
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed early"
        got += chunk
    lines = got.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    assert lines[1].startswith(b"250 Supported commands:")  # no EHLO, so no enhanced codes
    assert lines[1:100_001] == [lines[1]] * 100_000
    s.close()


def test_connection_flood_past_max_connections(tmp_path: Path) -> None:
    with running(tmp_path, "[server]\nmax_connections = 50") as d:
        fds_before = _open_fds(d.proc.pid)
        held, refused = [], 0
        for _ in range(200):
            s = socket.create_connection((d.host, d.port))
            s.settimeout(10)
            line = s.recv(100)
            if line.startswith(b"421 4.7.0"):
                refused += 1
                s.close()
            else:
                assert line.startswith(b"220"), line
                held.append(s)
        assert len(held) == 50 and refused == 150
        time.sleep(0.3)
        assert _open_fds(d.proc.pid) <= fds_before + 50 + 5
        for s in held:
            s.close()
        time.sleep(0.3)
        assert d.send("after@example.test", MSG) == {}


@pytest.mark.parametrize("state", ["greeting", "ehlo", "mail", "rcpt", "data", "data-body", "dot-sent", "after-250"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_abrupt_disconnect_in_every_state(daemon: Daemon, state: str, how: str) -> None:
    c = RawSMTP(daemon.host, daemon.port)
    script = [("greeting", None), ("ehlo", "EHLO x.test"), ("mail", "MAIL FROM:<x@example.org>"),
              ("rcpt", "RCPT TO:<cut@example.test>"), ("data", "DATA")]
    for step, line in script:
        if line is None:
            c.reply()
        else:
            c.cmd(line)
        if step == state:
            break
    else:
        c.send(b"Subject: cut\r\n\r\nhalf")
        if state != "data-body":
            c.send(b"\r\n.\r\n")
            if state == "after-250":
                assert c.reply()[0] == 250
        time.sleep(0.05)
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()
    time.sleep(0.3)
    assert not list(daemon.maildir.glob("*/*/tmp/*"))
    delivered = daemon.delivered("cut@example.test")
    if state == "after-250":
        assert len(delivered) == 1  # acknowledged: must be there, whatever the client did next
    elif state == "dot-sent":
        assert len(delivered) <= 1  # complete: stored or not, never partial
    else:
        assert delivered == []
    assert daemon.send("next@example.test", MSG) == {}


def test_concurrent_mixed_hostility_keeps_serving(daemon: Daemon) -> None:
    stop = threading.Event()

    def garbage() -> None:
        while not stop.is_set():
            with socket.create_connection((daemon.host, daemon.port)) as s:
                s.sendall(os.urandom(4096) + b"\r\n")
                time.sleep(0.01)

    threads = [threading.Thread(target=garbage) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            assert daemon.send(f"mixed{i}@example.test", MSG) == {}
    finally:
        stop.set()
        for t in threads:
            t.join()
