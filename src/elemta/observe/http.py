"""The admin HTTP endpoint on [api] listen: /metrics, /health, /api/stats, /debug/pprof/heap.

Served by the standard library's ThreadingHTTPServer in its own thread, not on the event
loop: a hung loop must still get an answer, and that answer is 503 (the heartbeat tells).
Handlers only read: the Snapshot is immutable, SMTP counters are copied under a lock.
Unknown paths get 404, other methods 405; a failing handler gets 500 with one line, never
a traceback.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .. import __version__
from ..config import ListenAddress
from . import report
from .heap import DEFAULT_TOP, HeapReport

log = logging.getLogger("elemta.http")

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request


class AdminApp:
    """Routes to bytes; knows nothing about sockets."""

    def __init__(
        self,
        inputs: Callable[[], report.Inputs],
        registry: CollectorRegistry,
        profiler: HeapReport | None,
    ) -> None:
        self.inputs = inputs
        self.registry = registry
        self.profiler = profiler
        self.routes: dict[str, Callable[[dict[str, list[str]], str], tuple[int, str, bytes]]] = {
            "/metrics": self._metrics,
            "/health": self._health,
            "/api/stats": self._stats,
        }
        if profiler is not None:
            self.routes["/debug/pprof/heap"] = self._heap

    def _metrics(self, query: dict[str, list[str]], accept: str) -> tuple[int, str, bytes]:
        encoder, content_type = choose_encoder(accept)
        return 200, content_type, encoder(self.registry)

    def _health(self, query: dict[str, list[str]], accept: str) -> tuple[int, str, bytes]:
        code, body = report.health(self.inputs())
        return code, JSON, _json(body)

    def _stats(self, query: dict[str, list[str]], accept: str) -> tuple[int, str, bytes]:
        return 200, JSON, _json(report.stats(self.inputs()))

    def _heap(self, query: dict[str, list[str]], accept: str) -> tuple[int, str, bytes]:
        assert self.profiler is not None
        try:
            top = int(query.get("top", [str(DEFAULT_TOP)])[0])
            worker = int(query["worker"][0]) if "worker" in query else None
        except ValueError:
            return 400, TEXT, b"top and worker must be integers\n"
        diff = query.get("diff", ["0"])[0] not in ("", "0", "false", "no")
        try:
            return 200, TEXT, self.profiler.report(top, diff, worker).encode()
        except ValueError as exc:  # no such worker
            return 400, TEXT, f"{exc}\n".encode()


def _json(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, indent=2, sort_keys=False) + "\n").encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return f"elemta/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, code: int, content_type: str, body: bytes, *, head: bool = False,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _get(self, head: bool) -> None:
        url = urlsplit(self.path)
        route = self.server.app.routes.get(url.path)
        if route is None:
            self._send(404, TEXT, f"not found: {url.path}\n".encode(), head=head)
            return
        try:
            code, content_type, body = route(parse_qs(url.query), self.headers.get("Accept", ""))
        except Exception as exc:  # one line for the client; the log gets the details
            log.error("GET %s failed: %s", url.path, exc, exc_info=True)
            self._send(500, TEXT, b"internal error\n", head=head)
            return
        self._send(code, content_type, body, head=head)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _not_allowed(self) -> None:
        path = urlsplit(self.path).path
        if path not in self.server.app.routes:
            self._send(404, TEXT, f"not found: {path}\n".encode())
            return
        self._send(405, TEXT, f"method {self.command} not allowed on {path}\n".encode(),
                   extra={"Allow": "GET, HEAD"})

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler looks up do_<METHOD>; every method but GET/HEAD is refused.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: ListenAddress, app: AdminApp, sock: socket.socket | None = None) -> None:
        self.address_family = sock.family if sock else socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        self.app = app
        super().__init__((addr.host, addr.port), _Handler, bind_and_activate=sock is None)
        if sock is not None:
            # systemd's listening socket (FileDescriptorName=api): already bound and listening.
            self.socket.close()
            sock.setblocking(True)
            self.socket = sock
            self.server_address = sock.getsockname()


class AdminServer:
    """Bind on construction (so a busy port fails start-up), serve in a thread."""

    def __init__(self, addr: ListenAddress, app: AdminApp, sock: socket.socket | None = None) -> None:
        self._server = _Server(addr, app, sock)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="elemta-admin-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def fileno(self) -> int:
        return self._server.socket.fileno()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
