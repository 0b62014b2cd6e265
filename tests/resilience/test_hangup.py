"""Clients that hang up right after their final dot must not hurt anyone else.

A session's waiting command (its task) is cancelled when its connection goes away. If that
happens while the message is being committed on a commit thread, the session must neither close the spool's
descriptor nor remove its file under the commit: the descriptor number is reused at once by
another session's socket or spool file.
"""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from daemon import Daemon, running

HANGUP_CLIENTS, HANGUP_MESSAGES = 4, 150
NORMAL_CLIENTS, NORMAL_MESSAGES = 4, 60
RCPT = "user@example.test"


def body(tag: str, size: int) -> bytes:
    """A distinct message of about `size` bytes, identified by its Message-ID."""
    line = f"{tag} " + "x" * 60 + "\r\n"
    lines = line * max(1, size // len(line))
    return f"Message-ID: <{tag}@hangup.test>\r\nSubject: {tag}\r\n\r\n{lines}".encode()


def stored_form(msg: bytes) -> bytes:
    """What the Maildir file holds after elemta's trace headers: LF line ends, no dot stuffing."""
    return msg.replace(b"\r\n", b"\n")


def expect(sock: socket.socket, buf: bytearray, code: bytes) -> None:
    """Read one whole reply (multi-line included) and check its code."""
    while True:
        while b"\r\n" in buf:
            end = buf.index(b"\r\n") + 2
            line = bytes(buf[:end])
            del buf[:end]
            assert line[:3] == code, f"expected {code!r}, got {line!r}"
            if line[3:4] == b" ":
                return
        chunk = sock.recv(4096)
        assert chunk, "connection closed early"
        buf += chunk


def hang_up_after_dot(d: Daemon, msg: bytes) -> None:
    """One message whose client closes the socket as soon as the final dot is sent."""
    with socket.create_connection((d.host, d.port), timeout=30) as sock:
        buf = bytearray()
        expect(sock, buf, b"220")
        sock.sendall(b"EHLO hangup.test\r\n")
        expect(sock, buf, b"250")
        sock.sendall(f"MAIL FROM:<h@hangup.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
        for code in (b"250", b"250", b"354"):
            expect(sock, buf, code)
        sock.sendall(msg + b".\r\n")  # msg ends with CRLF
    # closed here: the 250 (or anything else) is never read


def trace_prefix(qid: str) -> re.Pattern[bytes]:
    return re.compile(
        rb"Return-Path: <[^>\n]*>\nReceived: from \S+ \(\[127\.0\.0\.1\]\)\n"
        rb"\tby mx\.test \(elemta [^)\n]+\) with ESMTP id " + qid.encode()
        + rb"\n\tfor <" + RCPT.encode() + rb">;\n\t[^\n]+\n"
    )


def stored(d: Daemon) -> dict[str, Path]:
    """Queue id -> its file in new/."""
    found = {}
    for path in d.delivered(RCPT):
        m = re.search(r"_([0-9A-F]{12})\.", path.name)
        assert m is not None, path.name
        found[m.group(1)] = path
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_hang_up_after_the_dot_leaves_other_sessions_intact(tmp_path: Path, workers: int) -> None:
    sent: dict[str, bytes] = {}  # tag -> message as sent
    acked: dict[str, str] = {}  # tag -> queue id of its 250
    failures: list[str] = []
    lock = threading.Lock()

    def normal(d: Daemon, c: int) -> None:
        for i in range(NORMAL_MESSAGES):
            tag = f"n{c}-{i}"
            msg = body(tag, 200 + 3_000 * (i % 7))
            with lock:
                sent[tag] = msg
            try:
                with smtplib.SMTP(d.host, d.port, timeout=30) as s:
                    s.ehlo("normal.test")
                    s.mail("n@normal.test")
                    s.rcpt(RCPT)
                    code, text = s.data(msg)
            except (OSError, smtplib.SMTPException) as exc:
                with lock:
                    failures.append(f"{tag}: {exc!r}")
                continue
            m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{12})", text)
            with lock:
                if code != 250 or m is None:
                    failures.append(f"{tag}: {code} {text!r}")
                else:
                    acked[tag] = m.group(1).decode()

    def hangup(d: Daemon, c: int) -> None:
        for i in range(HANGUP_MESSAGES):
            tag = f"h{c}-{i}"
            msg = body(tag, 200 + 1_000 * (i % 5))
            with lock:
                sent[tag] = msg
            try:
                hang_up_after_dot(d, msg)
            except (OSError, AssertionError) as exc:
                with lock:
                    failures.append(f"{tag} (hang-up client, before its dot): {exc!r}")

    with running(tmp_path, f"[server]\nworkers = {workers}") as d:
        threads = [threading.Thread(target=hangup, args=(d, c)) for c in range(HANGUP_CLIENTS)]
        threads += [threading.Thread(target=normal, args=(d, c)) for c in range(NORMAL_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, f"{len(failures)} failed, first: {failures[:5]}"
        assert len(acked) == NORMAL_CLIENTS * NORMAL_MESSAGES

        by_qid = stored(d)
        # Every 250 is stored, byte for byte, under its own queue id.
        for tag, qid in acked.items():
            assert qid in by_qid, f"{tag} acknowledged as {qid} but not stored"
            data = by_qid[qid].read_bytes()
            head = trace_prefix(qid).match(data)
            assert head is not None, f"{tag}: bad trace headers {data[:300]!r}"
            assert data[head.end():] == stored_form(sent[tag]), f"{tag}: content differs"
        # A message from a client that left after its dot may be stored (it never saw the 250):
        # if it is, it is whole and its own, and the log says it was queued; a commit still
        # running when the clients finished logs soon after. Nothing is logged as queued that
        # is not stored (the log line follows the file).
        for qid in by_qid:
            d.wait_for_log(f"queued {qid} ")
        logged = set(re.findall(r"queued ([0-9A-F]{12}) ", d.log))
        by_qid = stored(d)
        assert logged <= set(by_qid), f"logged, not stored: {sorted(logged - set(by_qid))[:5]}"
        for qid, path in by_qid.items():
            d.wait_for_log(f"queued {qid} ")
            data = path.read_bytes()
            head = trace_prefix(qid).match(data)
            assert head is not None, f"{path.name}: bad trace headers {data[:300]!r}"
            m = re.search(rb"\nMessage-ID: <([^@]+)@hangup\.test>\n", b"\n" + data[head.end():])
            assert m is not None, f"{path.name}: no Message-ID"
            assert data[head.end():] == stored_form(sent[m.group(1).decode()]), path.name
        log = d.log
        assert "Bad file descriptor" not in log and "EBADF" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        # Sessions cancelled by a hang-up remove their partial files, soon after.
        tmp = d.maildir / "example.test" / "user" / "tmp"
        deadline = time.monotonic() + 10
        while list(tmp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(tmp.iterdir())
