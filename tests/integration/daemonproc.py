"""A real `elemta serve` subprocess for integration tests and benchmarks.

Listens on 127.0.0.1 port 0 (the kernel picks a free port; the daemon logs which), collects its
log lines in a thread, and stops it with SIGTERM (SIGKILL if it does not stop).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")


class DaemonProcess:
    def __init__(self, workdir: Path, memory: Mapping[str, Any] | None = None,
                 server: Mapping[str, Any] | None = None,
                 preexec_fn: Callable[[], None] | None = None):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "elemta.toml"
        write_config(self.config_path, {
            "server": {"listen": "127.0.0.1:0", "hostname": "mx.test", **(server or {})},
            "delivery": {"maildir_root": str(workdir / "mail"), "domains": ["example.test"]},
            "memory": dict(memory or {}),
        })
        self.preexec_fn = preexec_fn
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elemta.cli", "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env, preexec_fn=self.preexec_fn,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        m = self.wait_for(r"SMTP listening on 127\.0\.0\.1:(\d+)", timeout)
        self.port = int(m.group(1))
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """The first log line from index `start` on matching `pattern` (waits for it)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                assert self.proc is not None
                if left <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    raise AssertionError(f"no log line matching {pattern!r} within {timeout}s; "
                                         "log:\n" + "\n".join(self.lines[-40:]))
                self._cond.wait(min(left, 0.2))

    def matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [line for line in self.lines if rx.search(line)]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def greeting(self, timeout: float = 10.0) -> bytes:
        """Connect and read the first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
