"""Accepting SMTP connections one at a time, so workers sharing a listening socket share them.

asyncio's own server accepts every connection waiting on the socket each time it is readable
(up to its backlog): with workers on one shared socket, whichever wakes first takes a whole
burst, and a client opening 20 sessions at once found all 20 in one worker and the other idle
(seen 20/0 and 17/3 in bench runs of workload b). Taking one connection per readiness lets
every worker woken by the same connections race for each of them; the one busy with other
sessions comes back later and so takes fewer. That alone still left 17/3 splits (the worker
that had just accepted is often the one running when the next connection comes), so a worker
that is ahead of the least busy one (`ahead`, from the workers' session board) first gives the
others a head start of HEAD_START before taking a connection itself: a head start, never a
refusal, so a frozen or dying worker delays its peers' accepts by that much and no more.
Each connection becomes a transport as asyncio's server makes one, but at once: the selector
loop's transport factory is called in the readiness callback, without the task, future and
getpeername of loop.connect_accepted_socket (which remains the way for other loops). That was
0.30 against 0.34 ms of event-loop CPU per message at workload a (4 alternating pairs).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("elemta.smtp")

# Out of descriptors or memory: accepting stops this long (as asyncio's server does), so the
# loop does not spin on a socket that stays readable.
PAUSE_AFTER_RESOURCE_ERROR = 1.0
HEAD_START = 0.0005
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """Serves one listening socket with `factory`'s protocol (asyncio.AbstractServer's close
    and wait_closed, which is what the daemon uses of a server)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol],
                 ahead: Callable[[int], bool] | None = None) -> None:
        """`ahead(pending)`: is this process ahead of the others in sessions, counting the
        `pending` connections it has accepted that have no session yet (None: alone)."""
        self._loop = loop
        self._sock = sock
        self._factory = factory
        self._ahead = ahead
        self._head_start_given = False
        self._serving = False
        self._connecting: set[asyncio.Task[None]] = set()
        self._pending = 0  # transports made whose session has not started yet
        # The selector loop's own transport factory (private, in every CPython since 3.4);
        # another loop (uvloop) goes through connect_accepted_socket and a task.
        self._make_transport: Callable[..., asyncio.Transport] | None = getattr(
            loop, "_make_socket_transport", None)

    def start(self) -> None:
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._readable)
        self._serving = True

    def _readable(self) -> None:
        if self._ahead is not None:
            if not self._head_start_given and self._ahead(len(self._connecting) + self._pending):
                self._pause(HEAD_START, head_start=True)
                return
            self._head_start_given = False
        try:
            conn, addr = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up meanwhile
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            log.error("cannot accept on %s: %s; not accepting for %.0f s",
                      self._sock.getsockname(), exc.strerror, PAUSE_AFTER_RESOURCE_ERROR)
            self._pause(PAUSE_AFTER_RESOURCE_ERROR)
            return
        conn.setblocking(False)
        if self._make_transport is not None:
            self._transport_now(conn, addr)
            return
        task = self._loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _transport_now(self, conn: socket.socket, addr: object) -> None:
        """The transport at once, as connect_accepted_socket makes it but without its task,
        its future and the peer's address asked of the kernel again: the session's
        connection_made runs at the loop's next turn, and `_made` right after it."""
        assert self._make_transport is not None
        try:
            self._make_transport(conn, self._factory(), extra={"peername": addr})
        except OSError as exc:  # the client reset the connection before it was set up
            log.debug("connection lost while being set up: %s", exc)
            conn.close()
            return
        except Exception:  # a bug in setting up a session: said, and this connection closed
            log.exception("cannot set up a session")
            conn.close()
            return
        self._pending += 1
        self._loop.call_soon(self._made)

    def _made(self) -> None:
        self._pending -= 1

    def _pause(self, seconds: float, head_start: bool = False) -> None:
        """Stop watching the socket for `seconds` (it stays readable: watching it would spin)."""
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_later(seconds, self._resume, head_start)

    def _resume(self, head_start: bool) -> None:
        if self._serving:
            self._head_start_given = head_start
            self._loop.add_reader(self._sock.fileno(), self._readable)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:  # the client reset the connection before it was set up
            log.debug("connection lost while being set up: %s", exc)
            conn.close()

    def close(self) -> None:
        """Stop accepting and close the listening socket (this process's descriptor of it)."""
        if not self._serving:
            return
        self._serving = False
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        """Return once the connections being set up have their sessions (or have failed)."""
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
        while self._pending:
            await asyncio.sleep(0)
