"""The admin HTTP endpoint on [api] listen: /metrics, /health, /api/stats, /debug/pprof/heap.

Served by the standard library's ThreadingHTTPServer in its own thread, not on the event
loop: a hung loop must still get an answer, and that answer is 503 (the heartbeat tells).
Handlers only read: the Snapshot is immutable, SMTP counters are copied under a lock.
Unknown paths get 404, other methods 405; a failing handler gets 500 with one line, never
a traceback.

At most MAX_CONNECTIONS connections are served at once, one thread each; the accept thread
answers any further one with a one-line 503 and closes it, so idle clients cannot multiply
threads. Every thread here is named elemta-admin*: governor.count_tasks leaves them out of
the SMTP task budget (max_goroutines). With a token ([api] token_file), every path but
/health requires `Authorization: Bearer <token>`, else 401.
"""

from __future__ import annotations

import contextlib
import hmac
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
from ..config import ListenAddress, is_loopback
from . import pprof, report
from .heap import DEFAULT_TOP, PPROF_TOP, HeapReport

log = logging.getLogger("elemta.http")

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
PPROF = "application/octet-stream"  # a gzipped profile.proto Profile (go tool pprof)
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request
# Connections served at once (a scraper, `elemta stats`, a health check or two, with room).
MAX_CONNECTIONS = 16
THREAD_PREFIX = "elemta-admin"  # governor.count_tasks knows this prefix
OPEN_PATHS = frozenset({"/health"})  # answered without the token: load balancers, systemd
BUSY = b"admin endpoint busy: too many connections, try again\n"
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
           % (len(BUSY), BUSY))


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
        # Required from every client on every path but OPEN_PATHS; replaced on reload.
        self.token: bytes | None = None
        self.routes: dict[str, Callable[[dict[str, list[str]], str], tuple[int, str, bytes]]] = {
            "/metrics": self._metrics,
            "/health": self._health,
            "/api/stats": self._stats,
        }
        if profiler is not None:
            self.routes["/debug/pprof/heap"] = self._heap
        # The queue's admin requests (queue.admin.QueueAdmin), when a queue is configured:
        # (method, path below /api/queue) -> (status, JSON body).
        self.queue: Callable[[str, str], tuple[int, dict[str, Any]]] | None = None

    def queue_route(self, method: str, path: str) -> tuple[int, str, bytes] | None:
        """/api/queue[/...]: the answer, or None for any other path."""
        if path != "/api/queue" and not path.startswith("/api/queue/"):
            return None
        if self.queue is None:
            return 404, TEXT, b"no queue: [delivery] transport and routes are all maildir\n"
        code, body = self.queue(method, path[len("/api/queue"):])
        return code, JSON, _json(body)

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
        fmt = query.get("format", ["text"])[0]
        try:
            top = int(query.get("top", [str(PPROF_TOP if fmt == "pprof" else DEFAULT_TOP)])[0])
            worker = int(query["worker"][0]) if "worker" in query else None
        except ValueError:
            return 400, TEXT, b"top and worker must be integers\n"
        diff = query.get("diff", ["0"])[0] not in ("", "0", "false", "no")
        if fmt not in ("text", "pprof"):
            return 400, TEXT, b"format must be text or pprof\n"
        try:
            if fmt == "pprof":
                return 200, PPROF, pprof.encode(self.profiler.profile(worker, top))
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

    def _authorized(self, path: str, head: bool = False) -> bool:
        """True when the request may go on; else a 401 has been sent."""
        token = self.server.app.token
        if token is None or path in OPEN_PATHS:
            return True
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # compare_digest: the time taken tells nothing about how much of a guess was right.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
            return True
        self._send(401, TEXT, b"unauthorized: send Authorization: Bearer <token of [api] "
                   b"token_file>\n", head=head,
                   extra={"WWW-Authenticate": 'Bearer realm="elemta"'})
        return False

    def _get(self, head: bool) -> None:
        url = urlsplit(self.path)
        if not self._authorized(url.path, head):
            return
        route = self.server.app.routes.get(url.path)
        try:
            queued = self.server.app.queue_route("GET", url.path)
            if queued is not None:
                code, content_type, body = queued
            elif route is None:
                self._send(404, TEXT, f"not found: {url.path}\n".encode(), head=head)
                return
            else:
                code, content_type, body = route(parse_qs(url.query),
                                                 self.headers.get("Accept", ""))
        except Exception as exc:  # one line for the client; the log gets the details
            log.error("GET %s failed: %s", url.path, exc, exc_info=True)
            self._send(500, TEXT, b"internal error\n", head=head)
            return
        self._send(code, content_type, body, head=head)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_POST(self) -> None:
        """The queue's mutating verbs; every other path refuses POST as before."""
        path = urlsplit(self.path).path
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and 0 < int(length) <= 4096:
            self.rfile.read(int(length))  # no body is used; read it so the reply is not reset
        elif length != "0":
            self.close_connection = True  # an unread body must not be taken for a request
        if not self._authorized(path):
            return
        try:
            queued = self.server.app.queue_route("POST", path)
        except Exception as exc:
            log.error("POST %s failed: %s", path, exc, exc_info=True)
            self._send(500, TEXT, b"internal error\n")
            return
        if queued is None:
            self._not_allowed()
            return
        self._send(*queued)

    def _not_allowed(self) -> None:
        path = urlsplit(self.path).path
        if not self._authorized(path):
            return
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
    request_queue_size = 64  # listen backlog: connections wait there, not in threads

    def __init__(self, addr: ListenAddress, app: AdminApp, sock: socket.socket | None = None) -> None:
        self.address_family = sock.family if sock else socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        self.app = app
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((addr.host, addr.port), _Handler, bind_and_activate=sock is None)
        if sock is not None:
            # systemd's listening socket (FileDescriptorName=api): already bound and listening.
            self.socket.close()
            sock.setblocking(True)
            self.socket = sock
            self.server_address = sock.getsockname()

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection while a slot is free; beyond that, 503 from here."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        thread = threading.Thread(target=self._serve, args=(request, client_address),
                                  name=f"{THREAD_PREFIX}-conn", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)  # closes the request
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        # On the accept thread: nothing may block. Whatever the client already sent is read
        # first, so closing does not turn into a reset that could discard the 503.
        try:
            request.setblocking(False)
            with contextlib.suppress(OSError):
                request.recv(65536)
            request.send(REFUSED)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            request.close()


class AdminServer:
    """Bind on construction (so a busy port fails start-up), serve in a thread."""

    def __init__(self, addr: ListenAddress, app: AdminApp, sock: socket.socket | None = None) -> None:
        self._server = _Server(addr, app, sock)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"{THREAD_PREFIX}-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def loopback(self) -> bool:
        """Only this host can reach the socket (its real address: systemd may have bound it)."""
        host, port = self._server.socket.getsockname()[:2]
        return is_loopback(ListenAddress(host, port))

    @property
    def app(self) -> AdminApp:
        return self._server.app

    def fileno(self) -> int:
        return self._server.socket.fileno()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
