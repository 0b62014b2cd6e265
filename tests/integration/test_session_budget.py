"""The per-session budget never bounces mail for buffers elemta itself sized (issue 11 item 8).

A session in DATA holds one socket read (asyncio reads up to 256 KiB at a time) and the spool's
64 KiB buffer by elemta's own choice; 552 5.3.4 must answer only what a client made it hold.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from daemon import running
from elemta import config

MiB = 1024 * 1024


def smallest_session_budget() -> int:
    spec = next(f for f in dataclasses.fields(config.MemoryConfig)
                if f.name == "per_connection_memory_limit")
    return int(spec.metadata["min"])


def reply(f: socket.SocketIO | object) -> bytes:
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if line[3:4] != b"-":
            return bytes(line)


def test_smallest_budget_takes_a_large_message_sent_in_big_segments(tmp_path: Path) -> None:
    budget = smallest_session_budget()
    body = b"".join(b"Line %07d of a large but legitimate message, no long lines.\r\n" % i
                    for i in range(130_000))  # ~8 MiB
    with running(tmp_path, f"[memory]\nper_connection_memory_limit = {budget}\n") as d:
        with socket.create_connection(("127.0.0.1", d.port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220")
            for cmd, code in ((b"EHLO client.test", b"250"), (b"MAIL FROM:<a@example.org>", b"250"),
                              (b"RCPT TO:<big@example.test>", b"250"), (b"DATA", b"354")):
                s.sendall(cmd + b"\r\n")
                assert reply(f).startswith(code), cmd
            for i in range(0, len(body), MiB):  # 1 MiB segments: the reads come full
                s.sendall(body[i:i + MiB])
            s.sendall(b".\r\n")
            final = reply(f)
        assert final.startswith(b"250 2.0.0"), (budget, final)
        [stored] = d.delivered("big@example.test")
        assert stored.read_bytes().endswith(body.replace(b"\r\n", b"\n"))
