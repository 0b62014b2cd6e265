"""`elemta stats --watch` against a real daemon: frames in place on a terminal (a pty), one JSON
document per line through a pipe, and Ctrl-C (SIGINT) ends it with status 0, no traceback."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from daemon import Daemon

CLEAR = b"\x1b[H\x1b[J"


def _read_until(fd: int, done: object, timeout: float = 30) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while not done(buf):  # type: ignore[operator]
        left = deadline - time.monotonic()
        assert left > 0, f"not within {timeout}s: {buf[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_watch_on_a_terminal_refreshes_in_place_and_quits_on_ctrl_c(daemon: Daemon) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "elemta.cli", "stats", "--watch", "0.2",
                             "--api", f"http://127.0.0.1:{daemon.api_port}"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        first = _read_until(master, lambda b: b.count(CLEAR) >= 1 and b"event loop" in b)
        daemon.send("user@example.test")  # traffic between frames shows up in the next ones
        frames = _read_until(master, lambda b: re.search(rb"messages +1 accepted",
                                                         b.split(CLEAR)[-1]) is not None
                             and b.split(CLEAR)[-1].count(b"event loop") == 1)
        proc.send_signal(signal.SIGINT)
        tail = _read_until(master, lambda b: False, timeout=20)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    out = first + frames + tail
    assert out.count(CLEAR) >= 2
    last = out.split(CLEAR)[-1].decode()
    assert last.startswith("every 0.2s: http://127.0.0.1:") and "(Ctrl-C quits)" in last
    assert "rate " in last and "msg/s" in last
    assert b"Traceback" not in out and b"KeyboardInterrupt" not in out


def test_watch_json_through_a_pipe_is_one_document_per_line(daemon: Daemon) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "elemta.cli", "stats", "--watch", "0.1",
                             "--json", "--api", f"http://127.0.0.1:{daemon.api_port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        docs = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert all(d["version"] and "memory" in d for d in docs)
    assert b"Traceback" not in err
    for line in rest.splitlines():
        json.loads(line)
