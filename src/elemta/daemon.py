"""Daemon lifecycle: bind (or inherit) sockets, serve, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import runtime
from .config import Config, ListenAddress
from .events import emit
from .mailboxes import ensure_postmasters
from .memory.governor import Governor, count_tasks
from .memory.sampler import Sampler
from .observe.service import Observability
from .observe.systemd import SystemdNotifier
from .queue import routing
from .queue import transports as queue_transports
from .queue.admin import QueueAdmin
from .queue.disk import DiskWatch
from .queue.intake import QueueIntake
from .queue.manager import Manager
from .queue.store import QueueStore
from .reload import Reloads, log_rejected, read_recipients, reload_config, reload_recipients
from .sessionboard import SessionBoard
from .smtp.acceptor import Acceptor
from .smtp.server import SmtpContext, session_factory
from .store.maildir import Maildir

log = logging.getLogger("elemta.daemon")

BACKLOG = 1024


def bind(addr: ListenAddress) -> socket.socket:
    """A listening, non-blocking TCP socket for `addr` (IPv6 sockets are v6-only)."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def raise_fd_limit() -> None:
    """Every session costs a descriptor: take the hard limit, not the (often 1024) soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)


def clean_tmp(store: Maildir) -> None:
    removed = store.clean_tmp()
    if removed:
        log.warning("removed %d stale file(s) from tmp/ (left by an earlier elemta process, "
                    "or untouched for 36 hours)", removed)


def _describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


REPORT_EVERY = 0.5  # seconds between a worker's reports to its supervisor
# On stop, deliveries in flight get this long to end and be recorded (a cancelled one is
# delivered again after the restart).
QUEUE_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkerRole:
    """What makes a Daemon one worker of a supervisor (supervisor.py) instead of the daemon."""

    index: int
    supervisor_pid: int
    report_fd: int  # write end of the pipe the supervisor reads reports from
    shape: Callable[[Config], Config]  # the worker's share of the caps, also after a reload
    board: SessionBoard  # every worker's open sessions: max_connections is daemon-wide
    queue_fd: int = -1  # the supervisor's queue eventfd: a write wakes its delivery manager

    def wake_queue(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the counter is full: it is awake anyway
            os.eventfd_write(self.queue_fd, 1)


@dataclass
class Daemon:
    config: Config
    inherited_smtp: list[socket.socket] = field(default_factory=list)
    inherited_api: list[socket.socket] = field(default_factory=list)  # systemd FileDescriptorName=api
    worker: WorkerRole | None = None
    ctx: SmtpContext = field(init=False)
    governor: Governor = field(init=False)
    systemd: SystemdNotifier = field(init=False)
    servers: list[Acceptor] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    observe: Observability = field(init=False)
    queue: Manager | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        store = Maildir(Path(self.config.delivery.maildir_root),
                        runtime.hostname(self.config.server))
        self.observe = Observability(self.config, self.started)
        self.ctx = SmtpContext(self.config, store, tls=runtime.tls_context(self.config.tls),
                               observer=self.observe.smtp)
        ctx = self.ctx
        if self.worker is not None:
            ctx.board, ctx.board_slot = self.worker.board, self.worker.index
        # A worker weighs the memory of the whole process tree, as its siblings do.
        sampler = Sampler(tree_root=self.worker.supervisor_pid) if self.worker else None
        # An SMTP session counts as one task: it is the unit of concurrency max_goroutines
        # caps (a goroutine per connection in the original), though it holds an asyncio task
        # only while a command waits.
        self.governor = Governor(self.config, sampler, sessions=lambda: len(ctx.sessions),
                                 session_bytes=lambda: ctx.session_bytes,
                                 tasks=lambda: count_tasks() + len(ctx.sessions))
        self._ready = False
        self._report_task: asyncio.Task[None] | None = None
        ctx.admission = self.governor
        d = self.config.delivery
        mail_dirs = [Path(d.maildir_root)]
        if routing.any_queued(d.transport, d.all_routes()):
            mail_dirs.append(Path(d.queue_dir))
            if self.worker is None:
                self.queue = queue_transports.manager(self.config, store,
                                                      self.governor.delivery_concurrency,
                                                      self.observe.delivery)
                ctx.queue = QueueIntake(self.queue.store, store.executor, wake=self.queue.wake)
                self.observe.queue = self.queue.stats
            else:  # the supervisor delivers (supervisor.py): wake it
                ctx.queue = QueueIntake(QueueStore(Path(d.queue_dir)), store.executor,
                                        wake=self.worker.wake_queue)
        ctx.disk = DiskWatch(mail_dirs, store.executor)
        self.systemd = SystemdNotifier(lambda: len(self.ctx.sessions),
                                       self.config.memory.monitoring_interval)
        self.reloads = Reloads(self.systemd, self._apply_reload)

    async def start(self) -> None:
        raise_fd_limit()
        if self.worker is None:  # a worker must not remove its siblings' files in progress
            clean_tmp(self.ctx.store)
        ensure_postmasters(self.ctx.store.root, self.config.delivery.domains)  # before serving
        log.info("recipients: %s", self.ctx.recipients.map.description)
        self.governor.start()  # first sample (and its log line) before serving
        if self.queue is not None:
            await self.queue.start()
        assert self.ctx.disk is not None
        await self.ctx.disk.start()
        # Admin endpoint before SMTP: once "SMTP listening" is logged, /health answers too.
        self.observe.start(self.governor, lambda: self.ctx.draining,
                           serve_http=self.worker is None,
                           sock=self.inherited_api[0] if self.inherited_api else None)
        loop = asyncio.get_running_loop()
        if self.queue is not None and self.observe.server is not None:
            self.observe.server.app.queue = QueueAdmin(self.queue, loop)
        # Handlers before the first "SMTP listening" line: whoever saw it may signal us at once.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reloads.signalled)
        # A worker starts with SIGHUP blocked (supervisor._spawn): one that came meanwhile is
        # delivered now, to the handler, and the worker reloads.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        socks = self.inherited_smtp or [bind(a) for a in self.config.server.listen]
        factory = session_factory(self.ctx)
        board, slot = self.ctx.board, self.ctx.board_slot
        ahead = None if board is None else partial(board.ahead, slot)
        for sock in socks:
            # Bound and listening already (bind, or inherited from the supervisor or systemd).
            server = Acceptor(loop, sock, factory, ahead)
            server.start()
            self.servers.append(server)
            log.info("SMTP listening on %s", _describe(sock))
        await self.systemd.ready(self.governor)
        self._ready = True
        if self.worker is not None:
            self._report_task = loop.create_task(self._report(self.worker.report_fd),
                                                 name="elemta-report")

    async def _report(self, fd: int) -> None:
        """Tell the supervisor, from this loop, that it turns: heartbeat plus load figures."""
        os.set_blocking(fd, False)
        while True:
            line = json.dumps({"ready": self._ready and not self.ctx.draining,
                               "sessions": len(self.ctx.sessions),
                               "session_bytes": self.ctx.session_bytes,
                               "tasks": count_tasks()})
            try:
                os.write(fd, line.encode() + b"\n")
            except BlockingIOError:  # the supervisor is behind: it gets the next one
                pass
            except OSError:  # the supervisor is gone: nobody serves /health, stop
                log.error("supervisor gone (report pipe closed): stopping")
                self.request_stop()
                return
            await asyncio.sleep(REPORT_EVERY)

    async def _apply_reload(self) -> None:
        """Re-read the file (a broken one keeps the old config) and the recipient maps."""
        loop = asyncio.get_running_loop()
        shape = self.worker.shape if self.worker else lambda c: c
        outcome = await loop.run_in_executor(None, reload_config, self.config, shape)
        if outcome.config is None:
            log_rejected(log, outcome)
        else:
            new = outcome.config
            loaded = await loop.run_in_executor(None, read_recipients, new.delivery)
            self.config = self.ctx.config = new
            self.governor.reconfigure(new)
            if self.queue is not None:
                self.queue.config = new
            elif self.ctx.queue is None and routing.any_queued(new.delivery.transport,
                                                               new.delivery.all_routes()):
                log.warning("[delivery] now names a queued transport, but this daemon started "
                            "without a queue: restart it; until then mail goes to maildir_root")
            reload_recipients(self.ctx.recipients, new.delivery, loaded, self.ctx.store.root,
                              self.ctx.store.executor)
            self.observe.reconfigure(new)
            logging.getLogger("elemta").setLevel(outcome.config.logging.level.upper())
            changed = ", ".join(outcome.changed) or "nothing changed"
            emit(log, "config_reloaded", f"configuration reloaded from {outcome.path}: {changed}",
                 config_path=outcome.path, result="applied")
            if outcome.needs_restart:
                log.warning("changed keys that take effect only after a restart: %s",
                            ", ".join(outcome.needs_restart))

    def request_stop(self, sig: int | None = None) -> None:
        if not self._stop.is_set():
            name = signal.Signals(sig).name if sig else "request"
            log.info("%s received: stopping (drain up to %.0fs)", name,
                     self.config.server.drain_timeout)
            self._stop.set()
            self.systemd.stopping(self.config.server.drain_timeout)

    async def run(self) -> None:
        await self.start()
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Stop accepting; sessions in DATA may finish; everyone else gets 421 4.3.2."""
        self.ctx.draining = True
        for server in self.servers:
            server.close()
        for session in list(self.ctx.sessions):
            if not session.in_data:
                session.shutdown_now()
        deadline = time.monotonic() + self.config.server.drain_timeout
        while self.ctx.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for session in list(self.ctx.sessions):
                if not session.in_data:
                    session.shutdown_now()
        left = len(self.ctx.sessions)
        for session in list(self.ctx.sessions):
            session.shutdown_now()
        if left:
            log.warning("drain timeout: closed %d session(s) still in DATA (nothing was "
                        "acknowledged for them)", left)
        for server in self.servers:
            await server.wait_closed()
        if self._report_task is not None:
            self._report_task.cancel()
        if self.queue is not None:
            await self.queue.stop(QUEUE_STOP_TIMEOUT)
        if self.ctx.disk is not None:
            await self.ctx.disk.stop()
        await self.reloads.cancel()
        await self.governor.stop()
        await self.ctx.recipients.close()
        await self.systemd.close()
        await asyncio.sleep(0)
        await self.observe.stop()
        log.info("%d connections accepted since start", self.ctx.accepted)
        log.info("stopped")
