"""A real elemta daemon in a subprocess on free loopback ports, for the observability tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> Response:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                            resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    smtp_port: int
    api_port: int
    root: Path
    stderr_path: Path

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def get(self, path: str, **kw: Any) -> Response:
        return http(self.api + path, **kw)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def write_config(root: Path, smtp_port: int, api_port: int, extra: str = "",
                 server: str = "") -> Path:
    cfg = root / "elemta.toml"
    cfg.write_text(
        "[server]\n"
        f'listen = ["127.0.0.1:{smtp_port}"]\n'
        'hostname = "mx.example.test"\n'
        "max_message_size = 4096\n"
        + server +
        "[delivery]\n"
        f'maildir_root = "{root / "mail"}"\n'
        'domains = ["example.test"]\n'
        "[api]\n"
        f'listen = "127.0.0.1:{api_port}"\n'
        + extra
    )
    return cfg


def start_daemon(root: Path, extra: str = "", env: dict[str, str] | None = None,
                 wait: bool = True, server: str = "", api_port: int | None = None) -> DaemonProc:
    """`extra`: TOML appended after [api] keys (more [api] keys, then other sections);
    `server`: more [server] keys."""
    smtp_port, api_port = free_port(), api_port or free_port()
    cfg = write_config(root, smtp_port, api_port, extra, server)
    stderr_path = root / "stderr.log"
    full_env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    full_env.update(env or {})
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "elemta.cli", "serve", "--config", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=full_env,
        )
    d = DaemonProc(proc, smtp_port, api_port, root, stderr_path)
    if wait:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode}: {d.stderr()}")
            try:
                if d.get("/health", timeout=2).status in (200, 503):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                d.stop()
                raise RuntimeError(f"daemon did not answer /health: {d.stderr()}")
            time.sleep(0.1)
    return d
