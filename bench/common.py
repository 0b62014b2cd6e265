"""Benchmark plumbing: servers under test, Postfix's smtp-source as the client, RSS sampling.

Every figure is printed beside a baseline measured in the same run, in alternating rounds,
as medians, because this machine is shared and noisy.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from daemon import free_port, rss_of  # noqa: E402
from daemon import start as start_elemta  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
MiB = 1024 * 1024


def spool_dir() -> Path:
    """A directory on a real disk (fsync must cost what it costs in production)."""
    base = Path(os.environ.get("ELEMTA_BENCH_DIR", "/var/tmp"))
    return Path(tempfile.mkdtemp(prefix="elemta-bench-", dir=base))


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    cleanup: Callable[[], None] = field(default=lambda: None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.cleanup()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(3) == b"220":
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not answering")


def elemta(extra: str = "", name: str = "elemta") -> Server:
    work = spool_dir()
    # Default logging (info: one line per message), as in production.
    d = start_elemta(work, extra)
    return Server(name, d.port, d.proc, lambda: shutil.rmtree(work, ignore_errors=True))


def aiosmtpd_sink() -> Server:
    """aiosmtpd's own server with its Sink handler: parses and discards, no disk."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c",
         "aiosmtpd.handlers.Sink", "--size", str(200 * MiB)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return Server("aiosmtpd-sink", port, proc)


@contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Samples RSS every 5 ms while the block runs; yields [baseline, peak] after it."""
    samples = [rss_of(pid)]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                samples.append(rss_of(pid))
            except OSError:
                return
            time.sleep(0.005)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    result = [samples[0], 0]
    try:
        yield result
    finally:
        stop.set()
        t.join()
        result[1] = max(samples)


def smtp_source(port: int, messages: int, sessions: int, size: int, per_connection: bool,
                to: str = "bench@example.test", timeout: float = 600) -> float:
    """Runs smtp-source; returns elapsed seconds."""
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", "source@example.org", "-t", to, "-M", "bench.test"]
    if per_connection:
        cmd.insert(1, "-d")
    t0 = time.perf_counter()
    out = subprocess.run([*cmd, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0 or out.stderr.strip():
        raise RuntimeError(f"smtp-source failed ({out.returncode}): {out.stderr.strip()[:500]}")
    return elapsed


def send_one_big(port: int, size: int) -> float:
    """One message of `size` bytes over a raw socket (smtp-source holds big bodies in memory)."""
    line = b"x" * 78 + b"\r\n"
    block = line * (MiB // len(line))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
        f = s.makefile("rb")

        def expect(code: bytes) -> None:
            while True:
                reply = f.readline()
                if reply[3:4] != b"-":
                    break
            if not reply.startswith(code):
                raise RuntimeError(f"expected {code!r}, got {reply!r}")

        expect(b"220")
        for cmd, code in ((b"EHLO bench.test", b"250"), (b"MAIL FROM:<big@example.org>", b"250"),
                          (b"RCPT TO:<big@example.test>", b"250"), (b"DATA", b"354")):
            s.sendall(cmd + b"\r\n")
            expect(code)
        sent = 0
        while sent < size:
            s.sendall(block)
            sent += len(block)
        s.sendall(b".\r\n")
        expect(b"250")
        s.sendall(b"QUIT\r\n")
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
