"""Hostile clients: each gets a correct reply, memory stays bounded, nothing crashes or is lost."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from daemon import Daemon, rss_of, running, wait_until
from elemta.store.maildir import SPOOL_BUFFER
from smtpclient import RawSMTP

MiB = 1024 * 1024
MSG = b"Subject: ok\r\n\r\nfine\r\n"
# More than the spool's in-memory buffer: a partial message of this size is on disk in tmp/.
BIG_BODY = (b"y" * 70 + b"\r\n") * (2 * SPOOL_BUFFER // 72)


def _session(d: Daemon) -> RawSMTP:
    c = RawSMTP(d.host, d.port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO hostile.test")[0] == 250
    return c


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the supervisor and its workers when workers > 1)."""
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                out += _tree(int(child))
    return out


def _open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in _tree(pid))


def _tmp_files(d: Daemon) -> list[Path]:
    return list(d.maildir.glob("*/*/tmp/*"))


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
            s = RawSMTP(d.host, d.port)
            assert s.reply()[0] == 220  # greeted: the daemon counts this session
            s.send(b"EH")  # never finishes the line
            slow.append(s)
        # At the cap: a clean refusal, not a hang.
        with RawSMTP(d.host, d.port) as c:
            code, text = c.reply()
            assert (code, text.split()[0]) == (421, "4.7.0")
        # The timeout cuts every slow sender (a 421, then the close that frees its slot)...
        for s in slow:
            code, text = s.reply()
            assert (code, text.split()[0]) == (421, "4.4.2")
            assert s.closed_by_peer()
            s.close()
        # ...and a normal client is served again.
        assert d.send("served@example.test", MSG) == {}
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
    ("command", "reply"),
    [
        (b"EHLO \x00\x00", "501 5.5.4"),
        (b"MAIL FROM:<a\x00b@example.org>", "553 5.1.7"),
        (b"\x00\x00\x00", "500 5.5.2"),
        (b"MAIL FROM:<\xff\xfe@example.org>", "500 5.5.2"),  # 8-bit without SMTPUTF8
        (b"MAIL FROM:<x@example.org> SIZE=abc", "501 5.5.4"),
        (b"MAIL FROM:<x@example.org> SIZE=", "501 5.5.4"),
        (b"MAIL FROM:<x@example.org> BODY=9BIT", "501 5.5.4"),
        (b"MAIL FROM:<x@example.org> SMTPUTF8", "501 5.5.4"),  # not offered
        (b"MAIL FROM:x@example.org> =", "501 5.5.4"),
        (b"MAIL FROM:<<<>>>", "553 5.1.3"),
        (b"MAIL TO:<x@example.org>", "501 5.5.4"),
        (b"RCPT TO:<a@example.test>", "503 5.5.1"),  # no MAIL yet
        (b"EHLO", "501 5.5.4"),  # RFC 5321 4.1.4: a refused EHLO keeps the ESMTP session
        (b"HELO", "501 5.5.4"),
        (b"VRFY", "501 5.5.4"),
        (b"AUTH PLAIN AGFiYwBkZWY=", "502 5.5.1"),  # EHLO offers no AUTH
        (b"STARTTLS", "454 4.7.0"),  # no certificate configured
        (b"\r", "500 5.5.2"),
        (b" ", "500 5.5.2"),
        # In a transaction (after MAIL):
        (b"MAIL FROM:<x@example.org>\r\nRCPT TO:<\xc3\xa9l\xc3\xa8ve@example.test>", "500 5.5.2"),
        (b"MAIL FROM:<x@example.org>\r\nRCPT TO:<a@example.test> NOTIFY=BOGUS", "501 5.5.4"),  # DSN
        (b"MAIL FROM:<x@example.org>\r\nRCPT TO:<a@example.test> FOO=BAR", "555 5.5.4"),
    ],
)
def test_malformed_commands_get_a_reply_and_the_session_goes_on(
    daemon: Daemon, command: bytes, reply: str
) -> None:
    with _session(daemon) as c:
        *setup, last = command.split(b"\r\n")
        for line in setup:
            assert c.cmd(line)[0] == 250
        code, text = c.cmd(last)
        assert f"{code} {text.split(' ')[0]}" == reply, f"{code} {text}"
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


@pytest.mark.parametrize(
    ("ending", "stored"),
    [  # Only CRLF ends a line; a line's leading dot is removed (RFC 5321 4.5.2); CRLF -> LF.
        (b"\n.\r\n", b"text\n.\n"),
        (b"\r\n.\n", b"text\n\n"),
        (b"\r.\r\n", b"text\r.\n"),
        (b"\r\n.\r", b"text\n\r"),
        (b"\n.\n", b"text\n.\n"),
        (b"\r\n\r.\r\n", b"text\n\r.\n"),
    ],
)
def test_near_miss_end_markers_do_not_end_data(daemon: Daemon, ending: bytes, stored: bytes) -> None:
    with _session(daemon) as c:
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<near@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: near\r\n\r\ntext" + ending + b"RSET\r\nMAIL FROM:<evil@example.org>\r\n"
               b"\r\n.\r\nQUIT\r\n")
        # Had the near miss ended DATA, RSET and MAIL would have been answered as commands:
        # the replies are the 250 for the message and then QUIT's 221, nothing between.
        code, text = c.reply()
        assert (code, text.split()[:3]) == (250, ["2.0.0", "Ok:", "queued"])
        assert c.reply()[0] == 221
        assert c.closed_by_peer()
    (path,) = daemon.delivered("near@example.test")
    assert path.read_bytes().endswith(
        b"\nSubject: near\n\n" + stored + b"RSET\nMAIL FROM:<evil@example.org>\n\n")


def _tcp_row(local_port: int, remote_port: int) -> list[str]:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return fields
    raise AssertionError("socket not found in /proc/net/tcp")


def _recv_queue(local_port: int, remote_port: int) -> int:
    """Bytes the kernel holds for the socket (local_port <- remote_port) that its owner has not read."""
    return int(_tcp_row(local_port, remote_port)[4].split(":")[1], 16)


def _polls_for_input(pid: int, local_port: int, remote_port: int) -> bool | None:
    """Whether the daemon's process holding the socket (local_port <- remote_port) waits for
    input on it: its event loop's epoll set holds the socket with EPOLLIN (an event loop that
    stops reading a connection takes EPOLLIN away). None when the socket is not found."""
    target = f"socket:[{_tcp_row(local_port, remote_port)[9]}]"
    for p in _tree(pid):
        fds = {}
        for fd in os.listdir(f"/proc/{p}/fd"):
            with contextlib.suppress(FileNotFoundError):
                fds[fd] = os.readlink(f"/proc/{p}/fd/{fd}")
        mine = [fd for fd, link in fds.items() if link == target]
        if not mine:
            continue
        for epoll in (fd for fd, link in fds.items() if link == "anon_inode:[eventpoll]"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{p}/fdinfo/{epoll}").read_text().splitlines():
                    m = re.match(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)", line)
                    if m and m.group(1) in mine and int(m.group(2), 16) & select.EPOLLIN:
                        return True
        return False
    return None


def _owner(pid: int, local_port: int, remote_port: int) -> int | None:
    """The daemon process holding the socket; None while it is not accepted yet."""
    target = f"socket:[{_tcp_row(local_port, remote_port)[9]}]"
    for p in _tree(pid):
        for fd in os.listdir(f"/proc/{p}/fd"):
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(f"/proc/{p}/fd/{fd}") == target:
                    return p
    return None


def _stopped_reading(pid: int, local_port: int, remote_port: int) -> bool:
    """The daemon has stopped reading this connection for good, not for a moment: input waits
    in the kernel, the event loop no longer polls the socket for input, and the loop itself
    is idle in epoll_wait (a reader paused only until its task consumes the buffer leaves
    that task runnable, so the loop would not be idle)."""
    owner = _owner(pid, local_port, remote_port)
    return (owner is not None and _recv_queue(local_port, remote_port) > 0
            and _polls_for_input(pid, local_port, remote_port) is False
            and Path(f"/proc/{owner}/task/{owner}/wchan").read_text() == "do_epoll_wait")


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
    client_port = s.getsockname()[1]
    wait_until(lambda: all(_stopped_reading(daemon.proc.pid, daemon.port, client_port) for _ in range(3)),
               "the daemon stops reading a client that reads none of its replies")
    # Unread input waits in the daemon's kernel receive queue, not in its memory.
    assert _recv_queue(daemon.port, client_port) > 0
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
            c = RawSMTP(d.host, d.port, timeout=10)
            code, text = c.reply()
            if code == 421:
                assert text.split()[0] == "4.7.0"
                assert c.closed_by_peer()  # the daemon has closed its end: its fd is gone
                refused += 1
                c.close()
            else:
                assert code == 220, text
                held.append(c)
        assert len(held) == 50 and refused == 150
        assert _open_fds(d.proc.pid) <= fds_before + 50 + 5
        for c in held:
            c.close()
        # The daemon notices the 50 hang-ups and frees their slots (and fds).
        wait_until(lambda: _open_fds(d.proc.pid) <= fds_before + 5, "fds released after the hang-ups")
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
        # Past the spool's buffer, so the partial message is on disk before the client goes.
        c.send(b"Subject: cut\r\n\r\n" + BIG_BODY + (b"half" if state == "data-body" else b""))
        wait_until(lambda: _tmp_files(daemon), "the partial message in tmp/")
        if state != "data-body":
            c.send(b".\r\n")
            if state == "after-250":
                code, text = c.reply()
                assert (code, text.split()[:3]) == (250, ["2.0.0", "Ok:", "queued"])
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()
    # The daemon is done with the message once tmp/ is empty: stored (renamed) or removed.
    wait_until(lambda: not _tmp_files(daemon), "tmp/ empty after the client left")
    delivered = daemon.delivered("cut@example.test")
    # Acknowledged (after-250): it must be there, whatever the client did next. Complete but
    # unacknowledged (dot-sent): stored once or not at all. Otherwise: nothing.
    if state == "after-250" or (state == "dot-sent" and delivered):
        (path,) = delivered
    else:
        assert delivered == []
    if delivered:  # and never partial
        head, _, body = path.read_bytes().partition(b"\n\n")
        assert head.startswith(b"Return-Path: <x@example.org>\n") and head.endswith(b"\nSubject: cut")
        assert body == BIG_BODY.replace(b"\r\n", b"\n")
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
