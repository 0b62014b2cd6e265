"""A raw SMTP client for tests that must send what smtplib refuses to (bare LF, pipelining)."""

from __future__ import annotations

import re
import socket

_REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)\r\n")


class RawSMTP:
    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One complete (possibly multi-line) reply: (code, text of the last line)."""
        while True:
            m = None
            while True:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    break
                line, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
                m = _REPLY_LINE.fullmatch(line)
                if m is None:
                    raise AssertionError(f"malformed reply line {line!r}")
                if m.group(2) == b" ":
                    return int(m.group(1)), m.group(3).decode("ascii", "replace")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buf!r}")
            self.buf += chunk

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed_by_peer(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False
