"""What the daemon starts for observability: SMTP counters, loop heartbeat, admin HTTP server.

    obs = Observability(config)              # before sessions: ctx.observer = obs.smtp
    obs.start(snapshot_source, draining)     # on the event loop, after the SMTP sockets
    await obs.stop()                         # last, so /health answers while draining
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from .. import runtime
from ..config import Config
from ..memory.snapshot import Snapshot
from . import report
from .heap import HeapReport, SelfHeap
from .heartbeat import STALL_AFTER, Heartbeat, install_test_block
from .http import AdminApp, AdminServer
from .metrics import SamplesSource, SmtpStats, SnapshotSource, build_registry
from .queuemetrics import DeliveryStats, QueueCollector

log = logging.getLogger("elemta.observe")


class Observability:
    def __init__(self, config: Config, started: float | None = None, *,
                 smtp_source: SamplesSource | None = None,
                 stalled: Callable[[], tuple[str, ...]] = lambda: ()) -> None:
        """`smtp_source`: where SMTP counts are collected from (the supervisor passes a
        MultiProcessCollector); `stalled`: reasons why parts of the daemon (workers) are hung."""
        self.config = config
        self.started = time.time() if started is None else started
        self.smtp = SmtpStats(smtp_source)
        self._stalled = stalled
        self.heartbeat = Heartbeat()
        self.source: SnapshotSource | None = None
        self._draining: Callable[[], bool] = lambda: False
        self.registry = build_registry(self._snapshot, self.smtp, self.heartbeat.age, STALL_AFTER,
                                       lambda: str(report.health(self.inputs())[1]["status"]))
        # The queue manager, when a queued transport is configured, sets `queue` (its stats).
        self.queue: Callable[[], dict[str, Any]] | None = None
        self.delivery = DeliveryStats(self.registry)
        self.registry.register(QueueCollector(self._queue))
        # The supervisor replaces it with WorkerHeaps (its workers hold the sessions).
        self.profiler: HeapReport | None = SelfHeap() if config.api.enable_profiling else None
        self.server: AdminServer | None = None
        self._beat: asyncio.Task[None] | None = None

    def _snapshot(self) -> Snapshot | None:
        return self.source.snapshot if self.source is not None else None

    def _queue(self) -> dict[str, Any] | None:
        return self.queue() if self.queue is not None else None

    def inputs(self) -> report.Inputs:
        return report.Inputs(
            snapshot=self._snapshot(),
            smtp=self.smtp.counts(),
            heartbeat_age=self.heartbeat.age(),
            draining=self._draining(),
            started=self.started,
            profiling=self.profiler is not None,
            stalled=self._stalled(),
            queue=self._queue(),
        )

    def start(self, source: SnapshotSource | None, draining: Callable[[], bool],
              serve_http: bool = True, sock: socket.socket | None = None) -> None:
        """Bind the admin endpoint (OSError if it cannot) and start the heartbeat.

        `sock` is a listening socket systemd passed (FileDescriptorName=api): used instead of
        binding [api] listen. A worker process (serve_http=False) has no endpoint: its
        supervisor answers for it."""
        self.source = source
        self._draining = draining
        if self.profiler is not None:
            self.profiler.start()
            log.warning("heap profiling on: tracemalloc traces every allocation "
                        "([api] enable_profiling)")
        loop = asyncio.get_running_loop()
        self.heartbeat.beat()
        self._beat = loop.create_task(self.heartbeat.run(), name="elemta-heartbeat")
        install_test_block(loop)
        if not serve_http:
            return
        token = runtime.api_token(self.config.api.token_file)
        server = AdminServer(self.config.api.listen, AdminApp(self.inputs, self.registry,
                                                               self.profiler), sock)
        if token is None and not server.loopback:  # e.g. a socket systemd bound elsewhere
            server.stop()
            raise runtime.SetupError("api", "token_file", f"the admin socket {server.address} "
                                     "is not a loopback address: set [api] token_file")
        server.app.token = token
        self.server = server
        self.server.start()
        log.info("admin HTTP listening on %s (/metrics, /health, /api/stats%s)",
                 self.server.address, ", /debug/pprof/heap" if self.profiler else "")

    def reconfigure(self, config: Config) -> None:
        """After a reload: [api] token_file is read again (rotate a token with SIGHUP)."""
        self.config = config
        if self.server is None:
            return
        try:
            token = runtime.api_token(config.api.token_file)
            if token is None and not self.server.loopback:
                raise runtime.SetupError("api", "token_file", f"the admin socket "
                                         f"{self.server.address} is not a loopback address")
        except runtime.SetupError as exc:
            log.error("%s: %s; the admin endpoint keeps its previous token", exc, config.source)
            return
        self.server.app.token = token

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.server.stop)
            self.server = None
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
