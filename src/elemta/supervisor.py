"""[server] workers > 1: a supervisor and N forked worker processes sharing the SMTP sockets.

The supervisor binds (or inherits from systemd) the listening sockets, removes stale tmp/ files
once, serves the admin endpoint, talks to systemd and runs a Governor without admission (its
Snapshot feeds /metrics, /api/stats and STATUS=). Each worker is a Daemon (daemon.py) on the
inherited sockets with its share of max_connections and max_goroutines.

Workers report over a pipe every REPORT_EVERY seconds from their event loop (heartbeat, sessions,
tasks, session bytes, ready). The supervisor sends READY=1 once every worker is ready, pings the
watchdog only while every report is fresh, kills and replaces a worker whose reports stop, and
restarts (with back-off) a worker that dies. SMTP counters reach /metrics through
prometheus_client's multiprocess mode: `prepare_metrics_dir` must run before anything imports
prometheus_client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .cpus import worker_cpu
from .observe.heap import ASK, HeapProfiler, WorkerHeaps, answer_request
from .reload import Reloads
from .runtime import hostname
from .sessionboard import SessionBoard

if TYPE_CHECKING:
    from .daemon import Daemon
    from .queue.manager import Manager

log = logging.getLogger("elemta.supervisor")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WATCH_EVERY = 0.2  # seconds between reaping / stall checks
KILL_MARGIN = 2.0  # a stalled worker is reported (503, no watchdog) this long before it is killed
QUICK_DEATH = 10.0  # a worker dying sooner than this after its start backs off the restart
MAX_BACKOFF = 30.0
STOP_MARGIN = 5.0  # after drain_timeout, workers get this long before SIGKILL


def prepare_metrics_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """A fresh PROMETHEUS_MULTIPROC_DIR, set in os.environ; call before prometheus_client loads.

    prometheus_client picks its value class (in-process or mmap files) when it is imported,
    so importing it first would silently give every worker private counters.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the multiprocess directory "
                           "was set")
    path = runtime_dir("metrics-", environ)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def runtime_dir(prefix: str, environ: Mapping[str, str] = os.environ) -> Path:
    """A fresh private directory under systemd's RuntimeDirectory=, else under the temp dir."""
    base = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if base and os.path.isdir(base):
        return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    return Path(tempfile.mkdtemp(prefix="elemta-" + prefix))


def remove_metrics_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def share(cfg: Config, n: int) -> Config:
    """One worker's config: max_goroutines divided by n, rounded up (tasks and threads are per
    process). max_connections stays whole: the SessionBoard makes it a daemon-wide count,
    because a split cap refuses early when the kernel spreads connections unevenly."""
    memory = dataclasses.replace(cfg.memory, max_goroutines=math.ceil(cfg.memory.max_goroutines / n))
    return dataclasses.replace(cfg, memory=memory)


def backoff(failures: int) -> float:
    """Seconds before restarting a worker that died `failures` times in a row soon after start."""
    return 0.0 if failures <= 0 else min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1))


def tag_logs(index: int) -> None:
    """Prefix every log message of this (worker) process with "worker N: "."""
    factory = logging.getLogRecordFactory()
    prefix = f"worker {index}: "

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.msg = prefix + str(record.msg)
        return record

    logging.setLogRecordFactory(tagged)


@dataclass
class Slot:
    """One worker position; its process changes when it is replaced."""

    index: int
    pid: int = 0
    fd: int = -1  # read end of its report pipe
    buf: bytes = b""
    report: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # monotonic
    last_report: float = 0.0  # monotonic
    ready: bool = False
    failures: int = 0
    restart_at: float = 0.0
    replacing_stalled: bool = False


class Supervisor:
    def __init__(self, config: Config, smtp: list[socket.socket],
                 api: socket.socket | None = None, *, workers: int) -> None:
        # Imported here: prometheus_client must load after prepare_metrics_dir().
        from prometheus_client.multiprocess import MultiProcessCollector

        from .memory.governor import Governor, count_tasks
        from .observe.service import Observability
        from .observe.systemd import SystemdNotifier

        self.config = config
        self.n = workers  # runtime.worker_plan, decided once at start
        self.socks = smtp
        self.api_sock = api
        self.slots = [Slot(i) for i in range(1, self.n + 1)]
        self.board = SessionBoard(self.n + 1)  # before any fork: the mapping is inherited
        self.started = time.time()
        self.stopping = False
        self.replacements = 0  # workers started again after one died or stalled
        self._stop = asyncio.Event()
        collector = MultiProcessCollector(None)  # type: ignore[no-untyped-call]
        self.observe = Observability(config, self.started, smtp_source=collector,
                                     stalled=self.stalled)
        self.governor = Governor(config, sessions=self.board.total,
                                 session_bytes=lambda: self._sum("session_bytes"),
                                 tasks=lambda: self._sum("tasks") + count_tasks())
        self.systemd = SystemdNotifier(self.board.total,
                                       config.memory.monitoring_interval,
                                       healthy=lambda: not self.stalled())
        self.reloads = Reloads(self.systemd, self._apply_reload)
        self.queue, self.queue_fd = self._queue_manager(config)
        # /debug/pprof/heap: the workers profile themselves and answer through this directory.
        self.heap_dir: Path | None = None
        if self.observe.profiler is not None:
            self.heap_dir = runtime_dir("heap-")
            self.observe.profiler = WorkerHeaps(self.heap_dir, lambda: [
                (s.index, s.pid) for s in list(self.slots) if s.pid and s.ready])

    def _queue_manager(self, config: Config) -> tuple[Manager | None, int]:
        """With a queued transport the supervisor runs the one delivery manager: workers put
        mail into incoming/ and wake it through an eventfd every worker inherits. One process
        schedules, so no record is delivered by two at once (a worker that froze, was killed and
        replaced never held any), and delivery runs beside the workers' SMTP loops, not in them."""
        from .queue import routing
        from .queue import transports as queue_transports
        from .store.maildir import Maildir

        d = config.delivery
        if not routing.any_queued(d.transport, d.all_routes()):
            return None, -1
        maildir = Maildir(Path(d.maildir_root), hostname(config.server))
        manager = queue_transports.manager(config, maildir, self.governor.delivery_concurrency,
                                           self.observe.delivery)
        self.observe.queue = manager.stats
        return manager, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def _queue_woken(self) -> None:
        assert self.queue is not None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.queue_fd)
        self.queue.wake()

    # -- what the reporting surfaces read (also from the HTTP thread) -----------------------
    def _sum(self, key: str) -> int:
        return sum(int(s.report.get(key, 0)) for s in self.slots if s.pid)

    def stalled(self) -> tuple[str, ...]:
        now = time.monotonic()
        out = []
        for s in list(self.slots):
            age = now - s.last_report
            if s.pid and s.ready and age > _stall_after():
                out.append(f"worker {s.index} (pid {s.pid}) stalled: no report for {age:.1f}s")
            elif s.replacing_stalled:
                out.append(f"worker {s.index} being replaced after a stall")
        return tuple(out)

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        from .daemon import clean_tmp
        from .store.maildir import Maildir

        loop = asyncio.get_running_loop()
        clean_tmp(Maildir(Path(self.config.delivery.maildir_root), hostname(self.config.server)))
        self.governor.start()
        self.observe.start(self.governor, lambda: self.stopping, sock=self.api_sock)
        if self.queue is not None:  # before the workers: its directories exist when they write
            from .queue.admin import QueueAdmin

            await self.queue.start()
            loop.add_reader(self.queue_fd, self._queue_woken)
            if self.observe.server is not None:
                self.observe.server.app.queue = QueueAdmin(self.queue, loop)
        log.info("supervisor (pid %d) starting %d workers", os.getpid(), self.n)
        for slot in self.slots:
            self._spawn(slot)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reloads.signalled)
        watch = loop.create_task(self._watch(), name="elemta-supervisor-watch")
        while not self.stopping and not all(s.ready for s in self.slots):
            await asyncio.sleep(0.05)
        if not self.stopping:
            log.info("all %d workers ready", self.n)
            await self.systemd.ready(self.governor)
        await self._stop.wait()
        await self._drain()
        await self.reloads.cancel()
        if self.queue is not None:  # after the workers: it delivers what they took in last
            from .daemon import QUEUE_STOP_TIMEOUT

            await self.queue.stop(QUEUE_STOP_TIMEOUT)
            loop.remove_reader(self.queue_fd)
            os.close(self.queue_fd)
        watch.cancel()
        await self.governor.stop()
        await self.systemd.close()
        await self.observe.stop()
        if self.heap_dir is not None:
            shutil.rmtree(self.heap_dir, ignore_errors=True)
        log.info("stopped")
        return 0

    def _spawn(self, slot: Slot) -> None:
        from .daemon import Daemon, WorkerRole

        loop = asyncio.get_running_loop()
        self._close_reader(slot)
        r, w = os.pipe()
        # SIGHUP is blocked in the child from the fork until its Daemon has a handler (Daemon.start
        # unblocks it): a reload forwarded to a worker still starting then waits, pending, and is
        # applied once it can be, instead of killing the worker (SIG_DFL). The worker re-reads the
        # file itself, so a config the supervisor validated after this fork reaches it too.
        # The heap profile request (ASK) waits the same way, until _serve_worker.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, ASK})
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:  # the worker: never returns into the supervisor's loop
            code = 1
            try:
                os.close(r)
                self._become_worker(slot.index)
                n = self.n
                role = WorkerRole(slot.index, os.getppid(), w, lambda c: share(c, n),
                                  self.board, self.queue_fd)
                daemon = Daemon(share(self.config, n), inherited_smtp=self.socks, worker=role)
                asyncio.run(self._serve_worker(daemon, slot.index))
                code = 0
            except BaseException:
                log.exception("worker failed")
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(w)
        os.set_blocking(r, False)
        now = time.monotonic()
        slot.pid, slot.fd, slot.buf, slot.report = pid, r, b"", {}
        slot.started = slot.last_report = now
        slot.ready = False
        loop.add_reader(r, self._on_report, slot)
        log.info("worker %d started (pid %d)", slot.index, pid)

    async def _serve_worker(self, daemon: Daemon, index: int) -> None:
        """In the forked child: answer heap profile requests (see heap.WorkerHeaps), serve."""
        profiler = daemon.observe.profiler
        if self.heap_dir is not None and isinstance(profiler, HeapProfiler):
            loop = asyncio.get_running_loop()
            heap_dir = self.heap_dir
            loop.add_signal_handler(ASK, lambda: loop.run_in_executor(
                None, answer_request, profiler, heap_dir, index))
        else:
            signal.signal(ASK, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {ASK})
        await daemon.run()

    def _become_worker(self, index: int) -> None:
        """In the forked child: drop what belongs to the supervisor."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)  # SIGHUP stays blocked: see _spawn
        signal.set_wakeup_fd(-1)
        for s in self.slots:
            if s.fd >= 0:
                os.close(s.fd)
                s.fd = -1
        if self.observe.server is not None:
            os.close(self.observe.server.fileno())
        if self.queue is not None:
            self.queue.forget_lock()
        _die_with_parent()
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(var, None)  # only the supervisor talks to systemd
        tag_logs(index)
        # What the worker inherited from the supervisor stays out of its collections: the
        # collector writing to those objects' headers would copy every shared page.
        gc.freeze()
        if self.config.server.pin_workers:
            # The event loop and its commit threads on one CPU: their hand-offs then need no
            # cross-CPU wake-ups (make bench, 2-CPU VM: +26% msg/s at one message per connection).
            cpu = worker_cpu(index, os.sched_getaffinity(0))
            try:
                os.sched_setaffinity(0, {cpu})  # threads started later inherit it
                log.info("bound to CPU %d", cpu)
            except OSError as exc:
                log.warning("cannot bind to CPU %d: %s", cpu, exc.strerror)

    def _close_reader(self, slot: Slot) -> None:
        if slot.fd >= 0:
            asyncio.get_running_loop().remove_reader(slot.fd)
            os.close(slot.fd)
            slot.fd = -1

    def _on_report(self, slot: Slot) -> None:
        try:
            data = os.read(slot.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone; the reaper decides what next
            self._close_reader(slot)
            return
        *lines, slot.buf = (slot.buf + data).split(b"\n")
        if not lines:
            return
        try:
            report = json.loads(lines[-1])
        except ValueError:
            return
        slot.report = report
        slot.last_report = time.monotonic()
        if report.get("ready") and not slot.ready:
            slot.ready = True
            slot.replacing_stalled = False
            log.info("worker %d (pid %d) ready", slot.index, slot.pid)

    async def _watch(self) -> None:
        while True:
            try:
                self._reap()
                self._check()
            except Exception:  # the supervisor must outlive any one bad round
                log.exception("supervisor check failed")
            await asyncio.sleep(WATCH_EVERY)

    def _reap(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            mark_process_dead(pid)  # type: ignore[no-untyped-call]
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            how = _describe_status(status)
            slot.pid, slot.ready, slot.report = 0, False, {}
            self.board.set(slot.index, 0)  # its sessions died with it
            self.board.set_in_data(slot.index, 0)
            if self.stopping:
                log.info("worker %d (pid %d) %s", slot.index, pid, how)
                continue
            now = time.monotonic()
            if slot.replacing_stalled:
                delay = 0.0
            else:
                slot.failures = slot.failures + 1 if now - slot.started < QUICK_DEATH else 0
                delay = backoff(slot.failures)
            slot.restart_at = now + delay
            log.error("worker %d (pid %d) %s; starting a replacement%s", slot.index, pid, how,
                      f" in {delay:.1f}s" if delay else "")
            self.replacements += 1
            why = "stalled, killed" if slot.replacing_stalled else how
            self.systemd.note("workers", f"{self.replacements} worker replacement"
                              f"{'' if self.replacements == 1 else 's'}, last: worker "
                              f"{slot.index} {why} at "
                              f"{time.strftime('%H:%M:%S UTC', time.gmtime())}")

    def _check(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid == 0:
                if not self.stopping and now >= slot.restart_at:
                    self._spawn(slot)
                continue
            age = now - slot.last_report
            if slot.ready and age > _stall_after() + KILL_MARGIN and not slot.replacing_stalled:
                log.error("worker %d (pid %d) stalled: no report for %.1fs (bound %.0fs); "
                          "killing it (SIGKILL) and starting a replacement",
                          slot.index, slot.pid, age, _stall_after())
                slot.replacing_stalled = True
                _kill(slot.pid, signal.SIGKILL)

    # -- signals --------------------------------------------------------------------------------
    def request_stop(self, sig: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("%s received: stopping %d workers (drain up to %.0fs)",
                 signal.Signals(sig).name, self.n, self.config.server.drain_timeout)
        self.systemd.stopping(self.config.server.drain_timeout)
        for slot in self.slots:
            if slot.pid:
                _kill(slot.pid, sig)
        self._stop.set()

    async def _apply_reload(self) -> None:
        """Validate the file off the loop (it may name a large recipient map); when it is good,
        apply what the supervisor runs and forward SIGHUP to the workers, which reload too."""
        from .reload import log_rejected, reload_config

        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(None, reload_config, self.config)
        if outcome.config is None:
            log_rejected(log, outcome)
        else:
            self.config = outcome.config
            self.governor.reconfigure(outcome.config)
            self.observe.reconfigure(outcome.config)
            if self.queue is not None:
                self.queue.config = outcome.config
            logging.getLogger("elemta").setLevel(outcome.config.logging.level.upper())
            log.info("configuration valid: forwarding SIGHUP to %d workers", self.n)
            for slot in self.slots:
                if slot.pid:
                    _kill(slot.pid, signal.SIGHUP)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.server.drain_timeout + STOP_MARGIN
        while any(s.pid for s in self.slots) and time.monotonic() < deadline:
            self._reap()
            await asyncio.sleep(0.05)
        for slot in self.slots:
            if slot.pid:
                log.warning("worker %d (pid %d) still running after the drain: SIGKILL",
                            slot.index, slot.pid)
                _kill(slot.pid, signal.SIGKILL)
        while any(s.pid for s in self.slots):
            self._reap()
            await asyncio.sleep(0.05)
        for slot in self.slots:
            self._close_reader(slot)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a worker gets SIGTERM (and drains) if the supervisor is killed."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


def _stall_after() -> float:
    from .observe.heartbeat import STALL_AFTER

    return STALL_AFTER


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
