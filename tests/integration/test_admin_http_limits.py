"""The admin endpoint under load and off loopback: bounded threads, 503 beyond its cap, SMTP
untouched; a bearer token for everything but /health when it listens beyond loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from daemon import Daemon, free_port, running
from elemta.observe.http import MAX_CONNECTIONS
from httpclient import get

IDLE = 200
TOKEN = "kQ3v-9fJm2xR7tLp0aZs4Wb8"


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def raw_request(port: int, path: str, headers: str = "") -> bytes:
    """One HTTP/1.1 request on a fresh connection; everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@contextlib.contextmanager
def idle_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=15))
        yield socks
    finally:
        for s in socks:
            s.close()


def test_idle_admin_connections_leave_smtp_admitted_and_threads_bounded(tmp_path: Path) -> None:
    # A task cap well below the idle connections: with one thread per admin connection counted
    # as SMTP tasks, SMTP would be refused 452 4.3.1 task-cap.
    extra = "[memory]\nmax_goroutines = 40\n[server]\nmax_connections = 20\n"
    with running(tmp_path, extra) as d:
        before = threads_of(d.proc.pid)
        with idle_connections(d.api_port, IDLE):
            # Accepted in order: once this one is answered, every idle one has been accepted.
            probe = raw_request(d.api_port, "/health")
            during = threads_of(d.proc.pid)
            print(f"threads before {before}, with {IDLE} idle admin connections {during}")
            with smtplib.SMTP(d.host, d.port, timeout=30) as c:
                refused = c.sendmail("s@client.test", ["alice@example.test"],
                                     "Subject: t\r\n\r\nhi\r\n")
            assert refused == {}
            assert "task-cap" not in d.log
            assert during - before <= MAX_CONNECTIONS + 4, (before, during)
            status, _, rest = probe.partition(b"\r\n")
            assert status == b"HTTP/1.1 503 Service Unavailable", probe
            body = rest.split(b"\r\n\r\n", 1)[1]
            assert body.count(b"\n") == 1 and body.startswith(b"admin endpoint busy"), body
        # The idle connections closed: the endpoint answers again.
        assert get(d, "/health").status == 200


def _token_file(tmp_path: Path, mode: int = 0o640, text: str = TOKEN + "\n") -> Path:
    path = tmp_path / "api.token"
    path.write_text(text)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def exposed(tmp_path: Path, token_file: Path) -> Iterator[Daemon]:
    """[api] listen on every address; traffic goes to 127.0.0.1 only."""
    port = free_port()
    extra = f'[api]\nlisten = "0.0.0.0:{port}"\ntoken_file = "{token_file}"\n'
    with running(tmp_path, extra) as d:
        d.api_port = port
        yield d


def test_off_loopback_every_path_but_health_needs_the_token(tmp_path: Path) -> None:
    with exposed(tmp_path, _token_file(tmp_path)) as d:
        assert get(d, "/health").status == 200
        for path in ("/metrics", "/api/stats", "/nowhere"):
            r = get(d, path)
            assert r.status == 401, (path, r)
            assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
            assert r.body.count(b"\n") == 1
            for wrong in ("Bearer nope", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
                assert get(d, path, headers={"Authorization": wrong}).status == 401, wrong
        ok = get(d, "/api/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200 and ok.json()["smtp"]["messages_accepted"] == 0
        assert get(d, "/metrics", headers={"Authorization": f"bearer  {TOKEN}"}).status == 200
        # `elemta stats` reads the config and sends the token.
        stats = subprocess.run([sys.executable, "-m", "elemta.cli", "stats", "--config",
                                str(d.config_path), "--json"], capture_output=True, text=True,
                               timeout=30)
        assert stats.returncode == 0, stats.stderr
        check = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config",
                                str(d.config_path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        warnings = [ln for ln in check.stderr.splitlines() if "[api] listen" in ln]
        assert len(warnings) == 1 and "not a loopback address" in warnings[0], check.stderr


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=30)


def test_off_loopback_without_token_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[api]\nlisten = "0.0.0.0:8080"\n')
    out = _check(path)
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert f"{path}:2: [api] listen" in line and "token_file" in line, line


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    token = _token_file(tmp_path, mode=0o644)
    path = tmp_path / "c.toml"
    path.write_text(f'[api]\nlisten = "0.0.0.0:8080"\ntoken_file = "{token}"\n')
    out = _check(path)
    assert out.returncode == 2
    (line,) = [ln for ln in out.stderr.splitlines() if "warning" not in ln]
    assert f"{path}:3: [api] token_file" in line and "readable by others" in line, line
    token.chmod(0o600)
    token.write_text("short\n")
    out = _check(path)
    assert out.returncode == 2 and "at least" in out.stderr, out.stderr


def test_reload_reads_the_token_again(tmp_path: Path) -> None:
    token_file = _token_file(tmp_path)
    with exposed(tmp_path, token_file) as d:
        new = "Z" * 8 + TOKEN
        token_file.write_text(new + "\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("configuration reloaded")
        assert get(d, "/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}).status == 401
        assert get(d, "/api/stats", headers={"Authorization": f"Bearer {new}"}).status == 200
        # A token file that became unsafe rejects the reload: the current token stays.
        token_file.chmod(0o644)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("reload rejected")
        assert "readable by others" in d.log
        assert get(d, "/api/stats", headers={"Authorization": f"Bearer {new}"}).status == 200
