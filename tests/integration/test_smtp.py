"""SMTP behaviour of a real daemon process, spoken to with smtplib, swaks and raw sockets."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from daemon import Daemon, rss_of, running, wait_until
from elemta.store.maildir import SPOOL_BUFFER
from smtpclient import RawSMTP

MSG = b"Subject: hello\r\nMessage-ID: <m1@example.org>\r\n\r\nline one\r\n.leading dot\r\nlast\r\n"
# Bodies larger than the spool's in-memory buffer: they reach tmp/ before the final dot, so a
# check that tmp/ is clean afterwards sees whether the partial file was removed.
BIG_BODY = b"z" * 70 + b"\r\n"
BIG_LINES = 2 * SPOOL_BUFFER // len(BIG_BODY)


def _mail_files(root: Path, sub: str) -> list[Path]:
    return [p for p in root.glob(f"*/*/{sub}/*") if p.is_file()] if root.is_dir() else []


def _wait_for_partial_file(d: Daemon) -> None:
    wait_until(lambda: _mail_files(d.maildir, "tmp"), "the partial message in tmp/")


def test_single_recipient_is_stored_with_trace_headers(daemon: Daemon) -> None:
    assert daemon.send("alice@example.test", MSG) == {}
    (path,) = daemon.delivered("alice@example.test")
    data = path.read_bytes()
    head, _, body = data.partition(b"\n\n")
    assert head.startswith(b"Return-Path: <sender@example.org>\nReceived: from ")
    assert b"by mx.test (elemta" in head and b"for <alice@example.test>" in head
    assert b"Message-ID: <m1@example.org>" in head
    # smtplib dot-stuffs ".leading" on the wire; we unstuff it and store LF line ends
    assert body == b"line one\n.leading dot\nlast\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert "queued " in daemon.log and "rcpts=1" in daemon.log


def test_several_recipients_get_one_linked_copy_each(daemon: Daemon) -> None:
    rcpts = ["a@example.test", "B@Example.Test", "c@localhost"]
    assert daemon.send(rcpts, b"Subject: big\r\n\r\n" + BIG_BODY * BIG_LINES) == {}
    paths = [daemon.delivered(r) for r in rcpts]
    assert all(len(p) == 1 for p in paths)
    assert paths[0][0].read_bytes().endswith(b"\nSubject: big\n\n" + (b"z" * 70 + b"\n") * BIG_LINES)
    inodes = {p[0].stat().st_ino for p in paths}
    assert len(inodes) == 1 and paths[0][0].stat().st_nlink == 3
    assert _mail_files(daemon.maildir, "tmp") == []


def test_postmaster_without_domain_is_accepted(daemon: Daemon) -> None:
    with daemon.smtp() as s:
        s.ehlo("client.test")
        s.mail("x@example.org")
        code, _ = s.rcpt("<Postmaster>")
        assert code == 250


def test_relay_is_refused(daemon: Daemon) -> None:
    with daemon.smtp() as s:
        s.ehlo("client.test")
        s.mail("x@example.org")
        code, text = s.rcpt("victim@elsewhere.example")
        assert (code, text[:5]) == (550, b"5.7.1")
        code, _ = s.rcpt("ok@example.test")
        assert code == 250


@pytest.mark.parametrize(
    ("command", "code", "enhanced"),
    [
        ("FOO bar", 500, "5.5.2"),
        ("MAIL FROM:<>", 503, "5.5.1"),  # nested MAIL after the first
        ("RCPT TO:<../../etc/passwd@example.test>", 553, "5.1.3"),
        ("RCPT TO:<\"two words\"@example.test>", 553, "5.1.3"),
        ("RCPT TO:", 501, "5.5.4"),
        ("DATA extra", 501, "5.5.4"),
    ],
)
def test_bad_commands_get_the_right_5xx(daemon: Daemon, command: str, code: int, enhanced: str) -> None:
    with RawSMTP(daemon.host, daemon.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<x@example.org>")[0] == 250
        got, text = c.cmd(command)
        assert (got, text.split(" ")[0]) == (code, enhanced)
        assert c.cmd("NOOP")[0] == 250  # the session keeps working


@pytest.mark.parametrize("params", ["FOO=BAR", "SIZE=100 FOO=BAR", "FOO"])
def test_unknown_mail_parameter_is_refused(daemon: Daemon, params: str) -> None:
    with RawSMTP(daemon.host, daemon.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        got, text = c.cmd(f"MAIL FROM:<x@example.org> {params}")
        assert (got, text.split(" ")[0]) == (555, "5.5.4")
        # Refused, so no transaction began: the next MAIL is a first one (250), not a second (503).
        assert c.cmd("MAIL FROM:<x@example.org>")[0] == 250


def test_ehlo_advertises_extensions(daemon: Daemon) -> None:
    with daemon.smtp() as s:
        code, _text = s.ehlo("client.test")
        assert code == 250
        for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes"):
            assert s.has_extn(ext), ext
        assert s.esmtp_features["size"] == "52428800"
        assert not s.has_extn("auth")


def test_size_over_limit_at_mail(daemon: Daemon) -> None:
    with daemon.smtp() as s:
        s.ehlo("client.test")
        code, text = s.mail("x@example.org", ["SIZE=52428801"])
        assert (code, text[:5]) == (552, b"5.3.4")


def test_body_over_limit_during_data_is_drained_and_dropped(tmp_path: Path) -> None:
    limit = 2 * SPOOL_BUFFER  # past the buffer: the partial message is on disk when refused
    with running(tmp_path, f"[server]\nmax_message_size = {limit}") as d, RawSMTP(d.host, d.port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<big@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + BIG_BODY * (2 * BIG_LINES))
        _wait_for_partial_file(d)
        code, text = c.cmd(".")
        assert (code, text.split()[0]) == (552, "5.3.4")
        assert c.cmd("RSET")[0] == 250  # the session goes on after the drain
        assert d.delivered("big@example.test") == []
        assert _mail_files(d.maildir, "tmp") == []


def test_overlong_line_gets_500(daemon: Daemon) -> None:
    with RawSMTP(daemon.host, daemon.port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<long@example.test>")
        c.cmd("DATA")
        c.send(b"a" * 5000 + b"\r\n")
        code, text = c.cmd(".")
        assert (code, text.split()[0]) == (500, "5.5.2")
    assert daemon.delivered("long@example.test") == []


def test_bare_lf_and_cr_do_not_end_data(daemon: Daemon) -> None:
    """SMTP smuggling: only CRLF.CRLF ends DATA; the smuggled MAIL stays message text."""
    smuggle = (b"Subject: s\r\n\r\nbefore\n.\nMAIL FROM:<evil@example.org>\r\n"
               b"also\r.\rRCPT TO:<victim@example.test>\r\n"
               b"and\r\n.\nDATA\r\n")
    with RawSMTP(daemon.host, daemon.port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<smug@example.test>")
        c.cmd("DATA")
        c.send(smuggle)
        code, _ = c.cmd(".")
        assert code == 250
        assert c.cmd("QUIT")[0] == 221
    (path,) = daemon.delivered("smug@example.test")
    body = path.read_bytes().partition(b"\n\n")[2]
    # ".\nDATA" is a line starting with a dot: unstuffed like any other, never an end
    assert body == (b"before\n.\nMAIL FROM:<evil@example.org>\n"
                    b"also\r.\rRCPT TO:<victim@example.test>\nand\n\nDATA\n")
    assert daemon.delivered("victim@example.test") == []


def test_pipelined_commands_after_the_final_dot(daemon: Daemon) -> None:
    with RawSMTP(daemon.host, daemon.port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.send(b"MAIL FROM:<x@example.org>\r\nRCPT TO:<p@example.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        c.send(b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<y@example.org>\r\n"
               b"RCPT TO:<p@example.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(b".\r\nQUIT\r\n")
        assert [c.reply()[0] for _ in range(2)] == [250, 221]
    assert len(daemon.delivered("p@example.test")) == 2


def test_client_that_half_closes_still_hears_every_reply(daemon: Daemon) -> None:
    """A client that sends its whole transaction and shuts its sending side down at once
    (scripts do: `printf ... | nc`) is owed every reply, the 250 after the commit included."""
    with RawSMTP(daemon.host, daemon.port) as c:
        c.send(b"EHLO client.test\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<hc@example.test>\r\n"
               b"DATA\r\nSubject: half\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        codes = [c.reply()[0] for _ in range(6)]
        assert codes == [220, 250, 250, 250, 354, 250] and c.reply()[0] == 221
        assert c.closed_by_peer()
    assert len(daemon.delivered("hc@example.test")) == 1


def test_half_close_in_the_middle_of_data_stores_nothing(daemon: Daemon) -> None:
    with RawSMTP(daemon.host, daemon.port) as c:
        c.send(b"HELO client.test\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<hc2@example.test>\r\n"
               b"DATA\r\nSubject: cut\r\n\r\nno final dot\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        assert [c.reply()[0] for _ in range(5)] == [220, 250, 250, 250, 354]
        assert c.closed_by_peer()
    assert daemon.delivered("hc2@example.test") == []
    wait_until(lambda: not _mail_files(daemon.maildir, "tmp"), "tmp/ emptied")


def test_too_many_recipients(tmp_path: Path) -> None:
    with running(tmp_path, "[server]\nmax_recipients = 3") as d, d.smtp() as s:
        s.ehlo("client.test")
        s.mail("x@example.org")
        assert [s.rcpt(f"r{i}@example.test")[0] for i in range(3)] == [250] * 3
        code, text = s.rcpt("r4@example.test")
        assert (code, text[:5]) == (452, b"4.5.3")


def test_swaks_delivers(daemon: Daemon) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks not installed (make test installs it)")
    out = subprocess.run(
        [swaks, "--server", f"{daemon.host}:{daemon.port}", "--to", "s1@example.test,s2@localhost",
         "--from", "swaks@example.org", "--helo", "swaks.test", "--body", "via swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    for rcpt in ("s1@example.test", "s2@localhost"):
        (path,) = daemon.delivered(rcpt)
        assert b"via swaks" in path.read_bytes()


def test_ipv6_listener(tmp_path: Path) -> None:
    try:
        import socket

        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with running(tmp_path, host="::1") as d, RawSMTP("::1", d.port) as c:
        assert c.reply()[0] == 220


def _send_big(d: Daemon, size: int, peak: list[int]) -> tuple[int, str]:
    """Stream `size` bytes of DATA while a thread samples the daemon's RSS."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_of(d.proc.pid))
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    line = b"x" * 78 + b"\r\n"
    block = line * (1024 * 1024 // len(line))
    with RawSMTP(d.host, d.port, timeout=120) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<big@example.test>")
        assert c.cmd("DATA")[0] == 354
        t.start()
        try:
            sent = 0
            while sent < size:
                c.send(block)
                sent += len(block)
            result = c.cmd(".")
        finally:
            stop.set()
            t.join()
    return result


@pytest.mark.slow
def test_100_mib_message_is_streamed_not_buffered(tmp_path: Path) -> None:
    with running(tmp_path, "[server]\nmax_message_size = \"200MiB\"") as d:
        d.send("warm@example.test", MSG)  # first message: imports, mailbox creation
        baseline = rss_of(d.proc.pid)
        peak: list[int] = []
        code, _ = _send_big(d, 100 * 1024 * 1024, peak)
        assert code == 250
        growth = max(peak) - baseline
        (path,) = d.delivered("big@example.test")
        assert path.stat().st_size > 100 * 1024 * 1024 * 79 // 80 - 1
    assert growth < 2 * 1024 * 1024, f"RSS grew {growth / 1048576:.2f} MiB for a 100 MiB message"


def test_sigterm_drains_sessions_in_data(tmp_path: Path) -> None:
    with running(tmp_path, "[server]\ndrain_timeout = \"20s\"") as d:
        idle = RawSMTP(d.host, d.port)
        idle.reply()
        idle.cmd("EHLO idle.test")
        busy = RawSMTP(d.host, d.port)
        busy.reply()
        busy.cmd("EHLO busy.test")
        busy.cmd("MAIL FROM:<x@example.org>")
        busy.cmd("RCPT TO:<drain@example.test>")
        assert busy.cmd("DATA")[0] == 354
        busy.send(b"Subject: drain\r\n\r\nfirst half\r\n")
        d.proc.send_signal(15)
        code, text = idle.reply()  # the daemon is draining now
        assert (code, text.split()[0]) == (421, "4.3.2")
        # and still waits for the session in DATA: the rest of its message gets a 250.
        busy.send(b"second half\r\n.\r\n")
        assert busy.reply()[0] == 250
        assert busy.reply()[0] == 421
        assert d.proc.wait(20) == 0
        idle.close()
        busy.close()
        (path,) = d.delivered("drain@example.test")
        assert path.read_bytes().endswith(b"first half\nsecond half\n")


def test_sigterm_drain_timeout_discards_unfinished_message(tmp_path: Path) -> None:
    with running(tmp_path, "[server]\ndrain_timeout = \"1s\"") as d, RawSMTP(d.host, d.port) as c:
        c.reply()
        c.cmd("EHLO slow.test")
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<slow@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: slow\r\n\r\nnever finished\r\n" + BIG_BODY * BIG_LINES)
        _wait_for_partial_file(d)
        d.proc.send_signal(15)
        code, _ = c.reply()
        assert code == 421
        assert d.proc.wait(20) == 0
        assert d.delivered("slow@example.test") == []
        assert _mail_files(d.maildir, "tmp") == []


def test_kill_during_data_leaves_nothing_and_restart_cleans_tmp(tmp_path: Path) -> None:
    with running(tmp_path) as d, RawSMTP(d.host, d.port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<crash@example.test>")
        c.cmd("DATA")
        # More than the spool's in-memory buffer, so a partial file is on disk at the kill.
        c.send(b"Subject: crash\r\n\r\n" + BIG_BODY * BIG_LINES)
        _wait_for_partial_file(d)
        d.proc.kill()
        d.proc.wait()
        assert d.delivered("crash@example.test") == []
        assert len(_mail_files(d.maildir, "tmp")) == 1
    with running(tmp_path) as d2:
        assert "removed 1 stale file(s) from tmp/" in d2.log
        assert _mail_files(d2.maildir, "tmp") == []
        assert d2.send("crash@example.test", MSG) == {}


def test_client_disconnect_mid_data_leaves_nothing(daemon: Daemon) -> None:
    with RawSMTP(daemon.host, daemon.port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<x@example.org>")
        c.cmd("RCPT TO:<gone@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: gone\r\n\r\nhalf a message\r\n" + BIG_BODY * BIG_LINES)
        _wait_for_partial_file(daemon)
    wait_until(lambda: not _mail_files(daemon.maildir, "tmp"), "the partial message removed from tmp/")
    assert daemon.delivered("gone@example.test") == []
    assert daemon.send("after@example.test", MSG) == {}


@pytest.mark.root
def test_full_disk_gives_452_and_recovers(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as maildir_root")
    mnt = tmp_path / "mail"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        # queue_minfree off: this is the store's own failure path on a 1 MiB filesystem
        # (test_queue_disk.py has the 452 at MAIL that queue_minfree gives first).
        with running(tmp_path, "[delivery]\nqueue_minfree = 0\n") as d:
            assert d.send("first@example.test", MSG) == {}
            filler = mnt / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:  # take all the space
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
            with d.smtp() as s:  # no room at all: 452 (at DATA, or after the dot when the
                s.ehlo("client.test")  # mailbox directories could still be created)
                s.mail("x@example.org")
                s.rcpt("full@example.test")
                try:
                    code, text = s.data(b"Subject: full\r\n\r\nbody\r\n")
                except smtplib.SMTPDataError as err:
                    code, text = err.smtp_code, err.smtp_error
                assert (code, text[:5]) == (452, b"4.3.1")
                assert s.noop()[0] == 250  # still serving
            os.truncate(filler, filler.stat().st_size - 64 * 1024)
            with d.smtp() as s:  # room for the start only: the write fails mid-DATA
                s.ehlo("client.test")
                s.mail("x@example.org")
                s.rcpt("full@example.test")
                code, text = s.data(b"Subject: full\r\n\r\n" + (b"z" * 70 + b"\r\n") * 4000)
                assert (code, text[:5]) == (452, b"4.3.1")
                assert s.noop()[0] == 250
            assert d.delivered("full@example.test") == []
            assert _mail_files(d.maildir, "tmp") == []
            filler.unlink()
            assert d.send("full@example.test", MSG) == {}
            assert len(d.delivered("full@example.test")) == 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_smtplib_rejects_relay_with_exception(daemon: Daemon) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        daemon.send("x@nowhere.example", MSG)
