"""Start a real elemta daemon subprocess on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY_LINE = "SMTP listening on"
WORKERS_READY_LINE = "workers ready"  # the supervisor's line once every worker serves
# The daemons these helpers start run [server] workers = 1 unless the test's own config names
# workers (the built-in default "auto" would fork a supervisor and a worker per CPU for every
# test, and the suite would take longer for no more coverage). ELEMTA_TEST_WORKERS=N (or auto)
# runs them with workers = N instead: `make test` runs some suites that way.
WORKERS_ENV = "ELEMTA_TEST_WORKERS"
# Logged by `elemta serve` before it serves, in both modes: how many workers it decided on.
PLAN_LINE = re.compile(r"workers: (\d+) \(")


def ready_line(config_text: str, log: str = "") -> str | None:
    """The line that says the daemon serves; None while that cannot be known yet (workers =
    "auto", or no workers key: the count is in the daemon's own plan line, not yet logged)."""
    m = re.search(r"^workers\s*=\s*(\S+)", config_text, re.M)
    if m is not None and m.group(1).isdigit():
        return READY_LINE if m.group(1) == "1" else WORKERS_READY_LINE
    plan = PLAN_LINE.search(log)
    if plan is None:
        return None
    return READY_LINE if plan.group(1) == "1" else WORKERS_READY_LINE


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    api_port: int
    workdir: Path
    config_path: Path
    log_path: Path
    maildir: Path
    host: str = "127.0.0.1"
    _log_fh: Any = field(default=None, repr=False)

    def is_ready(self, since: int = 0) -> bool:
        log = self.log[since:]
        line = ready_line(self.config_path.read_text(), log)
        return line is not None and line in log

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def smtp(self, timeout: float = 30) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, timeout=timeout)

    def send(self, to: list[str] | str, body: bytes | str = b"Subject: t\r\n\r\nhello\r\n",
             sender: str = "sender@example.org") -> dict[str, tuple[int, bytes]]:
        with self.smtp() as s:
            return s.sendmail(sender, to, body)

    def delivered(self, address: str) -> list[Path]:
        local, _, domain = address.rpartition("@")
        new = self.maildir / domain.lower() / local.lower() / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_for_log(self, text: str, timeout: float = 15) -> None:
        self._wait(lambda: text in self.log, repr(text), timeout)

    def wait_ready(self, timeout: float = 15) -> None:
        self._wait(self.is_ready, "the ready line", timeout)

    def _wait(self, seen: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if seen():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log}")
            time.sleep(0.02)
        raise AssertionError(f"{what} not logged within {timeout}s:\n{self.log}")

    def restart(self, env: dict[str, str] | None = None) -> None:
        """Start the daemon again on the same config, ports and maildir (after a crash)."""
        assert self.proc.poll() is not None, "still running"
        if self._log_fh is None:
            self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        mark = len(self.log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elemta.cli", "serve", "--config", str(self.config_path)],
            stdout=self._log_fh, stderr=subprocess.STDOUT, cwd=self.workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + 15
        while not self.is_ready(mark):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"restart failed:\n{self.log[mark:]}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return self.proc.returncode


def write_config(workdir: Path, port: int, api_port: int, extra: str = "",
                 host: str = "127.0.0.1", any_recipient: bool = True,
                 builtin_workers: bool = False) -> Path:
    """A config with the daemon's ports and maildir; `extra` may add keys to any section.

    [server] workers is 1 (see WORKERS_ENV) unless `extra` or ELEMTA_TEST_WORKERS says
    otherwise; `builtin_workers`: no workers key at all, the built-in default applies.

    Sections named in `extra` are merged: a line "[server]" in extra continues that section.
    Most tests mail arbitrary users (user1@example.test, ...), so the harness accepts any
    recipient unless `any_recipient` is False (the real default: existing mailboxes only).
    """
    sections: dict[str, list[str]] = {
        "server": [f'listen = ["{host}:{port}"]' if ":" not in host else f'listen = ["[{host}]:{port}"]',
                   'hostname = "mx.test"'],
        "delivery": [f'maildir_root = "{workdir / "mail"}"', 'domains = ["example.test", "localhost"]',
                     *(['recipients = "any"'] if any_recipient else [])],
        "api": [f'listen = "127.0.0.1:{api_port}"'],
    }
    workers = os.environ.get(WORKERS_ENV) or ("" if builtin_workers else "1")
    if workers:
        sections["server"].append('workers = "auto"' if workers == "auto"
                                  else f"workers = {int(workers)}")
    current = None
    for line in extra.strip().splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            current = s[1:-1].strip()
            sections.setdefault(current, [])
        elif s and current is not None:
            key = s.split("=", 1)[0].strip()
            sections[current] = [ln for ln in sections[current]
                                 if ln.split("=", 1)[0].strip() != key] + [s]
    text = "".join(f"[{name}]\n" + "\n".join(lines) + "\n\n" for name, lines in sections.items())
    path = workdir / "elemta.toml"
    path.write_text(text)
    return path


def start(workdir: Path, extra: str = "", env: dict[str, str] | None = None,
          preexec_fn: Callable[[], None] | None = None, host: str = "127.0.0.1",
          args: tuple[str, ...] = (), wait: bool = True, any_recipient: bool = True,
          builtin_workers: bool = False) -> Daemon:
    workdir.mkdir(parents=True, exist_ok=True)
    port, api_port = free_port(host), free_port()
    config_path = write_config(workdir, port, api_port, extra, host, any_recipient,
                               builtin_workers)
    log_path = workdir / "daemon.log"
    fh = open(log_path, "wb")  # noqa: SIM115 - closed by Daemon.stop
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("JOURNAL_STREAM", None)
    full_env.setdefault("RUNTIME_DIRECTORY", str(workdir))  # workers' metrics dir: cleaned with it
    proc = subprocess.Popen(
        [sys.executable, "-m", "elemta.cli", "serve", "--config", str(config_path), *args],
        stdout=fh, stderr=subprocess.STDOUT, cwd=workdir, env=full_env,
        preexec_fn=preexec_fn,
    )
    d = Daemon(proc, port, api_port, workdir, config_path, log_path, workdir / "mail", host, fh)
    if wait:
        try:
            d.wait_ready()
        except BaseException:
            d.stop(signal.SIGKILL)
            raise
    return d


@contextlib.contextmanager
def running(workdir: Path, extra: str = "", **kw: Any) -> Iterator[Daemon]:
    d = start(workdir, extra, **kw)
    try:
        yield d
    finally:
        d.stop(signal.SIGKILL)
    # Reached only when the test body passed: whatever it did, nothing may crash loudly.
    assert "Traceback" not in d.log, d.log


def rss_of(pid: int) -> int:
    """Resident set size in bytes from /proc (no psutil needed in the test process)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 15) -> None:
    """Waits for an event (a file appears, a state is reached) instead of sleeping a guessed
    time; fails naming `what` if it does not happen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.01)
