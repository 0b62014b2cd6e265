"""The systemd protocol against a real daemon: a real NOTIFY_SOCKET datagram socket, real signals,
a really frozen event loop, and real socket activation through systemd-socket-activate."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from daemon import free_port, start, write_config


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET sees: one datagram per sd_notify() call.

    Read at once by a thread, as systemd does: a unix datagram socket queues only
    net.unix.max_dgram_qlen (10) messages, after which the daemon's sd_notify() blocks, and
    python-systemd holds the GIL while it does (the whole daemon stalled in a test that read
    nothing for 5 s of watchdog pings).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._received: queue.Queue[dict[str, str]] = queue.Queue()
        threading.Thread(target=self._drain, name="notify-socket", daemon=True).start()

    def _drain(self) -> None:
        while self.sock.fileno() >= 0:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:  # closed by the test
                return
            self._received.put(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))

    def _next(self, deadline: float) -> dict[str, str] | None:
        try:
            return self._received.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def wait_for(self, key: str, timeout: float = 20, value: str | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (msg := self._next(deadline)) is not None:
            self.messages.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return msg
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def count(self, key: str, seconds: float) -> int:
        """How many messages carrying `key` arrive within `seconds`."""
        n = 0
        deadline = time.monotonic() + seconds
        while (msg := self._next(deadline)) is not None:
            n += key in msg
        return n


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def test_ready_status_watchdog_reload_and_stop(tmp_path: Path, notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    d = start(tmp_path / "d", env=env)
    try:
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("accepting; ")
        assert ready["MAINPID"] == str(d.proc.pid)
        assert notify.count("WATCHDOG", 2.5) >= 2  # every 0.5 s while the loop turns

        # SIGHUP with a changed, valid file: RELOADING=1 then READY=1, same process.
        d.config_path.write_text(d.config_path.read_text().replace(
            'domains = ["example.test", "localhost"]', 'domains = ["example.test", "other.test"]'))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING")
        assert reloading["RELOADING"] == "1"
        # Type=notify-reload (systemd >= 253) matches RELOADING=1 to its SIGHUP by this stamp.
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        notify.wait_for("READY")
        d.wait_for_log("configuration reloaded")
        assert "delivery.domains" in d.log
        assert d.send("someone@other.test") == {}  # the new domain is live

        # A broken file: rejected with the reason, old config stays in force, still READY.
        good = d.config_path.read_text()
        d.config_path.write_text(good + '\n[memory]\nmax_memory_usage = "lots"\n')
        d.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING")
        notify.wait_for("READY")
        d.wait_for_log("reload rejected")
        assert "old configuration stays in force" in d.log
        assert d.send("someone@other.test") == {}
        assert d.proc.poll() is None

        # SIGTERM: STOPPING=1 with a timeout extension covering drain_timeout (30 s) + margin.
        d.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING")
        assert int(stopping["EXTEND_TIMEOUT_USEC"]) >= 30_000_000
        assert stopping["STATUS"].startswith("draining")
        assert d.proc.wait(30) == 0
    finally:
        d.stop(signal.SIGKILL)


def test_frozen_event_loop_stops_the_watchdog_pings(tmp_path: Path, notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000",
           "ELEMTA_TEST_BLOCK_LOOP_SECONDS": "3600"}
    d = start(tmp_path / "d", env=env)
    try:
        notify.wait_for("READY")
        assert notify.count("WATCHDOG", 2.0) >= 2
        d.proc.send_signal(signal.SIGUSR2)
        # Logged from the loop right before it blocks: no ping can be sent after it, and one
        # sent before is already queued on the datagram socket.
        d.wait_for_log("blocking the event loop")
        notify.count("WATCHDOG", 0.01)
        assert notify.count("WATCHDOG", 3.0) == 0  # six intervals without a ping: systemd would kill
        assert d.proc.poll() is None
    finally:
        d.stop(signal.SIGKILL)


def test_sigusr2_is_not_a_freeze_without_the_debug_variable(tmp_path: Path) -> None:
    d = start(tmp_path / "d")
    try:
        d.proc.send_signal(signal.SIGUSR2)  # default action: terminate
        assert d.proc.wait(15) == -signal.SIGUSR2
        assert "blocking the event loop" not in d.log
    finally:
        d.stop(signal.SIGKILL)


def test_outside_systemd_nothing_is_said_about_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    d = start(tmp_path / "d", env=env)
    try:
        assert d.send("postmaster@example.test") == {}
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("configuration reloaded")
        assert "watchdog" not in d.log
        assert "passed by systemd" not in d.log
    finally:
        assert d.stop() == 0


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (package systemd)")
def test_socket_activation_uses_the_passed_listener(tmp_path: Path) -> None:
    port, unused, api_port = free_port(), free_port(), free_port()
    workdir = tmp_path / "d"
    workdir.mkdir()
    config = write_config(workdir, unused, api_port)  # [server] listen must NOT be used
    log = workdir / "daemon.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=smtp",
             "-E", "PYTHONUNBUFFERED=1", "-E", f"PYTHONPATH={os.pathsep.join(sys.path)}",
             sys.executable, "-m", "elemta.cli", "serve", "--config", str(config)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=workdir,
        )
    try:
        # systemd-socket-activate listens at once and starts elemta on the first connection.
        deadline = time.monotonic() + 20
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    code, _ = s.ehlo()
                    assert code == 250
                    assert s.sendmail("a@example.org", ["postmaster@example.test"], b"x\r\n") == {}
                break
            except (ConnectionRefusedError, smtplib.SMTPServerDisconnected):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        text = log.read_text()
        assert "1 SMTP socket(s) passed by systemd" in text
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", unused), timeout=2).close()
        assert list((workdir / "mail/example.test/postmaster/new").iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (package systemd)")
@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation_passes_the_admin_socket_too(tmp_path: Path, workers: int) -> None:
    smtp_port, api_port, unused_smtp, unused_api = free_port(), free_port(), free_port(), free_port()
    workdir = tmp_path / "d"
    workdir.mkdir()
    config = write_config(workdir, unused_smtp, unused_api, f"[server]\nworkers = {workers}")
    log = workdir / "daemon.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{smtp_port}", "-l", f"127.0.0.1:{api_port}",
             "--fdname=smtp:api", "-E", "PYTHONUNBUFFERED=1", "-E", f"PYTHONPATH={os.pathsep.join(sys.path)}",
             sys.executable, "-m", "elemta.cli", "serve", "--config", str(config)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=workdir,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", api_port), timeout=20) as s:
                    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    reply = s.makefile("rb").read()
                if reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert b'"status": "ok"' in reply or b'"status":"ok"' in reply
        # The endpoint may answer before its start-up line is written.
        deadline = time.monotonic() + 10
        while f"admin HTTP listening on 127.0.0.1:{api_port}" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # The configured ports stay unbound by the daemon (asked of its own sockets: a connect
        # to a "free" port could reach some other process that took it meanwhile).
        listening: set[int] = set()
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):  # a worker replaced meanwhile
                listening |= {c.laddr.port for c in p.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN}
        assert {smtp_port, api_port} <= listening, listening
        assert not {unused_smtp, unused_api} & listening, listening
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _note_exit(state: Path, **env: str) -> None:
    """What the unit's ExecStopPost= runs, with the variables systemd gives it."""
    full = {**os.environ, "STATE_DIRECTORY": str(state), **env}
    out = subprocess.run([sys.executable, "-m", "elemta.cli", "note-exit"], env=full,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unclean_previous_run_is_logged_and_kept_in_status(
        tmp_path: Path, notify: NotifySocket, workers: int) -> None:
    # systemd's verdict on a watchdog kill (SIGABRT, core dumped), recorded by ExecStopPost=;
    # the next run says so in the journal and keeps it in STATUS= (systemctl status) while it
    # runs, and the note is used once: a clean stop in between leaves nothing to say.
    state = tmp_path / "state"
    state.mkdir()
    _note_exit(state, SERVICE_RESULT="watchdog", EXIT_CODE="dumped", EXIT_STATUS="ABRT")
    assert (state / "last-exit").read_text().startswith("result=watchdog code=dumped status=ABRT ")
    env = {"NOTIFY_SOCKET": str(notify.path), "STATE_DIRECTORY": str(state)}
    d = start(tmp_path / "d", f"[server]\nworkers = {workers}", env=env)
    try:
        ready = notify.wait_for("READY")
        assert "; restarted after watchdog timeout (the event loop stopped answering; killed by " \
               "SIGABRT) at 20" in ready["STATUS"], ready
        d.wait_for_log("previous run: watchdog timeout")
        assert not (state / "last-exit").exists()
    finally:
        d.stop()
    _note_exit(state, SERVICE_RESULT="success", EXIT_CODE="exited", EXIT_STATUS="0")
    d = start(tmp_path / "d2", f"[server]\nworkers = {workers}", env=env)
    try:
        ready = notify.wait_for("READY")
        assert "restarted" not in ready["STATUS"], ready
        assert "previous run" not in d.log
    finally:
        d.stop()


def test_note_exit_outside_systemd_does_nothing(tmp_path: Path) -> None:
    # Without either of systemd's variables (a hand run; a unit without StateDirectory=; a
    # state directory but no $SERVICE_RESULT) nothing is written anywhere and it exits 0.
    state = tmp_path / "state"
    state.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("SERVICE_RESULT", "STATE_DIRECTORY")}
    for extra in ({}, {"SERVICE_RESULT": "watchdog"}, {"STATE_DIRECTORY": str(state)}):
        out = subprocess.run([sys.executable, "-m", "elemta.cli", "note-exit"],
                             env={**base, **extra}, capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), extra
        assert [p.name for p in tmp_path.iterdir()] == ["state"], extra
        assert list(state.iterdir()) == [], extra
