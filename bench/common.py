"""Benchmark plumbing: servers under test, Postfix's smtp-source as the client, RSS sampling.

Every figure is printed beside a baseline measured in the same run, in alternating rounds,
as medians, because this machine is shared and noisy.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

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
    """A server under test: the root of its process tree, and how to stop it.

    Figures (RSS, CPU) are summed over the whole tree, because Postfix is a dozen
    processes and elemta may fork workers.
    """

    name: str
    port: int
    pid: int
    stop_fn: Callable[[], None]
    # Called after each workload: returns once mail accepted so far is fully handled
    # (Postfix: its queue is empty), so CPU figures include the delivery work too.
    settle: Callable[[], None] = field(default=lambda: None)
    # Called before the idle-session figure: drops processes left idle by earlier workloads
    # (Postfix keeps an smtpd per recent session), which new sessions would otherwise reuse.
    shed_idle: Callable[[], None] = field(default=lambda: None)

    def stop(self) -> None:
        self.stop_fn()


def popen_server(name: str, port: int, proc: subprocess.Popen[bytes],
                 cleanup: Callable[[], None] = lambda: None) -> Server:
    def stop() -> None:
        # Children first known, then the root killed: workers must not outlive the bench.
        pids = tree_pids(proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        cleanup()

    return Server(name, port, proc.pid, stop)


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(3) == b"220":
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not answering")


_PLANS_SHOWN: set[str] = set()


def elemta(extra: str = "", name: str = "elemta") -> Server:
    """elemta on the built-in defaults plus `extra`: no [server] workers key unless `extra`
    names one, so the column without one runs what a package user gets ("auto")."""
    work = spool_dir()
    # Default logging (info: one line per message), as in production. The test harness sets
    # [delivery] recipients = "any": every recipient accepted, as Postfix's empty
    # local_recipient_maps in postfix.py, so both sides do the same work per RCPT.
    try:
        d = start_elemta(work, extra, builtin_workers=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if name not in _PLANS_SHOWN:  # what "auto" decided on this machine, once per column
        _PLANS_SHOWN.add(name)
        plan = next((ln for ln in d.log.splitlines() if '"workers: ' in ln or " workers: " in ln),
                    "")
        if plan:
            text = plan.split("workers: ", 1)[1]
            text = text[:text.find(")") + 1]  # "2 (2 usable CPUs; memory cap 17)"
            print(f"{name}: workers {text}", flush=True)
    server = popen_server(name, d.port, d.proc, lambda: shutil.rmtree(work, ignore_errors=True))
    server.settle = partial(_queue_settle, work / "var" / "queue")  # [delivery] queue_dir
    return server


def _queue_settle(queue: Path, timeout: float = 120) -> None:
    """With a queued transport: returns once elemta's queue holds nothing due."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (any((queue / "incoming").glob("*"))
                                           or any(queue.glob("deferred/*/*"))):
        time.sleep(0.02)


def aiosmtpd_sink() -> Server:
    """aiosmtpd's own server with its Sink handler: parses and discards, no disk."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c",
         "aiosmtpd.handlers.Sink", "--size", str(200 * MiB)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return popen_server("aiosmtpd-sink", port, proc)


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            out[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (from /proc: this kernel has no task/*/children)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _sum_over(pids: list[int], read: Callable[[int], int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += read(pid)
    return total


def tree_rss(root: int) -> int:
    """Sum of RSS over the process tree (shared pages counted once per process, like ps)."""
    return _sum_over(tree_pids(root), rss_of)


def pss_of(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_pss(root: int) -> int:
    """Sum of PSS over the tree: shared pages split between their users, so it adds up."""
    return _sum_over(tree_pids(root), pss_of)


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # utime stime cutime cstime: fields 14-17. cutime/cstime hold the children this process
    # has reaped (Postfix's master reaps its smtpd/cleanup processes), and live children
    # are not in them yet, so summing all four over the live tree counts everything once.
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15])


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by the tree, including reaped children."""
    return _sum_over(tree_pids(root), _cpu_ticks) / TICK


@contextmanager
def peak_rss(root: int) -> Iterator[list[int]]:
    """Samples the tree's summed RSS every 5 ms while the block runs; yields [baseline, peak].

    Membership of the tree is refreshed every 50 ms (Postfix forks smtpd and cleanup on demand).
    """
    pids = tree_pids(root)
    samples = [_sum_over(pids, rss_of)]
    stop = threading.Event()

    def run() -> None:
        nonlocal pids
        n = 0
        while not stop.is_set():
            n += 1
            if n % 10 == 0:
                pids = tree_pids(root)
            samples.append(_sum_over(pids, rss_of))
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


def _read_reply(s: socket.socket, buf: bytearray) -> bytes:
    """Reads one complete (possibly multi-line) reply; returns its last line."""
    while True:
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed by server")
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\r\n")
        buf[:] = rest
        if line[3:4] != b"-":
            return line


def send_messages(port: int, data: bytes, count: int) -> float:
    """`count` messages over one connection, each DATA being `data` (already dot-stuffed,
    ending with the CRLF "." CRLF marker); returns elapsed seconds."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
        buf = bytearray()

        def expect(code: bytes) -> None:
            reply = _read_reply(s, buf)
            if not reply.startswith(code):
                raise RuntimeError(f"expected {code!r}, got {reply[:200]!r}")

        expect(b"220")
        s.sendall(b"EHLO bench.test\r\n")
        expect(b"250")
        for _ in range(count):
            for cmd, code in ((b"MAIL FROM:<bench@example.org>", b"250"),
                              (b"RCPT TO:<bench@example.test>", b"250"), (b"DATA", b"354")):
                s.sendall(cmd + b"\r\n")
                expect(code)
            s.sendall(data)
            expect(b"250")
        s.sendall(b"QUIT\r\n")
    return time.perf_counter() - t0


def _idle_session(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        buf = bytearray()
        for send, code in ((b"", b"220"), (b"EHLO idle.bench.test\r\n", b"250")):
            if send:
                s.sendall(send)
            reply = _read_reply(s, buf)
            if not reply.startswith(code):
                raise RuntimeError(f"idle session: expected {code!r}, got {reply[:80]!r}")
    except BaseException:
        s.close()
        raise
    return s


@contextmanager
def idle_sessions(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` sessions that got their EHLO answered and then say nothing, held open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
    socks: list[socket.socket] = []
    try:
        # A few at a time: Postfix forks one smtpd per session, and that is slow serially.
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(_idle_session, port) for _ in range(count)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        socks.extend(f.result() for f in futures if f.exception() is None)
        if errors:
            raise RuntimeError(f"{len(errors)} of {count} idle sessions failed: {errors[0]}")
        yield socks
    finally:
        for s in socks:
            s.close()


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


class Stoppable(Protocol):
    def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


def alternating_rounds(rounds: int, factories: Mapping[str, Callable[[], S]],
                       measure: Callable[[S], dict[str, float]],
                       describe: Callable[[dict[str, float]], str], label: str = "round",
                       fresh_fs: bool = True) -> dict[tuple[str, str], list[float]]:
    """Every round starts each server (on a fresh file system unless `fresh_fs` is False),
    measures it and stops it, in alternating order, so a trend in the shared machine's load
    weighs on every server alike; figures[(server, key)] lists one value per round. A server
    that fails loses that round's figures, never the others'."""
    from freshfs import spool_on_fresh_fs

    figures: dict[tuple[str, str], list[float]] = {}
    for rnd in range(rounds):
        order = list(factories) if rnd % 2 == 0 else list(reversed(list(factories)))
        for name in order:
            t0 = time.monotonic()
            try:
                with spool_on_fresh_fs() if fresh_fs else contextlib.nullcontext():
                    server = factories[name]()
                    try:
                        got = measure(server)
                    finally:
                        server.stop()
            except Exception as exc:  # one broken server must not cost the others' figures
                print(f"{label} {rnd + 1}/{rounds} {name}: failed: {exc}"[:600], flush=True)
                continue
            for key, value in got.items():
                figures.setdefault((name, key), []).append(value)
            # Every round's own figures too, so the spread behind each median is visible.
            print(f"{label} {rnd + 1}/{rounds} {name} ({time.monotonic() - t0:.0f} s): "
                  f"{describe(got)}", flush=True)
    return figures
