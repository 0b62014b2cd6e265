"""smtp/acceptor.py on a real listening socket and event loop: one connection per readiness,
and a worker that is ahead gives the others a head start, never a refusal."""

from __future__ import annotations

import asyncio
import socket

import pytest

from elemta.sessionboard import SessionBoard
from elemta.smtp import acceptor
from elemta.smtp.acceptor import Acceptor


class Greeter(asyncio.Protocol):
    made: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Greeter.made.append(asyncio.get_running_loop().time())
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"220 hi\r\n")


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def _connect_and_time(ahead: bool | None) -> tuple[float, list[int]]:
    """Seconds from a client's connect to its greeting; how often `ahead` was asked."""
    loop = asyncio.get_running_loop()
    asked: list[int] = []

    def is_ahead(pending: int) -> bool:
        asked.append(pending)
        return bool(ahead)

    sock = _listener()
    server = Acceptor(loop, sock, Greeter, None if ahead is None else is_ahead)
    server.start()
    try:
        start = loop.time()
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        assert await asyncio.wait_for(reader.readline(), 5) == b"220 hi\r\n"
        took = loop.time() - start
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return took, asked


def test_a_worker_alone_or_not_ahead_accepts_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(acceptor, "HEAD_START", 0.3)
    took, asked = asyncio.run(_connect_and_time(None))
    assert took < 0.25 and asked == []
    took, asked = asyncio.run(_connect_and_time(False))
    assert took < 0.25 and asked == [0]


def test_a_worker_ahead_waits_the_head_start_then_accepts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(acceptor, "HEAD_START", 0.3)
    took, asked = asyncio.run(_connect_and_time(True))
    # Asked once, waited the head start, then took the connection although still "ahead":
    # nobody else took it, and a head start is not a refusal.
    assert took >= 0.3 and asked == [0]


@pytest.mark.parametrize("own_transport", [True, False], ids=["transport-now", "task"])
def test_a_burst_is_taken_one_connection_per_readiness(own_transport: bool) -> None:
    """Ten waiting connections: the acceptor takes one per readiness callback, so another
    process woken by the same socket gets its turn between them. Each becomes a session,
    whether the loop's transport is made at once or (another loop) by a task."""
    greeted: list[Greeter] = []

    class Counted(Greeter):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            greeted.append(self)
            super().connection_made(transport)

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        sock = _listener()
        clients = []
        for _ in range(10):  # all queued on the socket before the acceptor starts
            c = socket.create_connection(sock.getsockname())
            clients.append(c)
        taken: list[int] = []
        server = Acceptor(loop, sock, Counted)
        if not own_transport:
            server._make_transport = None
        original = server._readable

        def setting_up() -> int:  # accepted connections whose session has not started yet
            return server._pending + len(server._connecting)

        def counting() -> None:
            before = setting_up()
            original()
            taken.append(setting_up() - before)

        server._readable = counting  # type: ignore[method-assign]
        server.start()
        try:
            while sum(taken) < 10:
                await asyncio.sleep(0.01)
        finally:
            server.close()
            await server.wait_closed()
            for c in clients:
                c.close()
        return taken

    taken = asyncio.run(run())
    assert sum(taken) == 10 and max(taken) == 1
    assert len(greeted) == 10


@pytest.mark.parametrize("own_transport", [True, False], ids=["transport-now", "task"])
def test_wait_closed_returns_once_accepted_connections_have_sessions(own_transport: bool) -> None:
    """What the daemon relies on when it stops: a connection accepted just before close is a
    session (which the drain then tells to go away) by the time wait_closed returns."""
    greeted: list[int] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        sock = _listener()
        client = socket.create_connection(sock.getsockname())
        server = Acceptor(loop, sock, Greeter)
        if not own_transport:
            server._make_transport = None
        before = len(Greeter.made)
        server._readable()  # the connection is accepted; its session starts at a later turn
        server.close()
        await server.wait_closed()
        greeted.append(len(Greeter.made) - before)
        client.close()

    asyncio.run(run())
    assert greeted == [1]


def test_session_board_ahead() -> None:
    board = SessionBoard(3)  # the supervisor's slot 0 and workers 1, 2
    board.set(1, 5)
    board.set(2, 3)
    assert not board.ahead(1)  # 5 against 3: within two
    assert board.ahead(1, pending=1)  # 6 against 3
    assert not board.ahead(2, pending=4)
    board.set(2, 0)  # a worker that died (its sessions are gone): the other is ahead
    assert board.ahead(1) and not board.ahead(2)
    assert not SessionBoard(2).ahead(1, pending=100)  # one worker: nobody to be ahead of


def test_a_session_that_cannot_be_set_up_closes_its_connection_only() -> None:
    """A bug in making a session (the factory raising) closes that connection, is logged, and
    the acceptor goes on serving the next one."""
    calls: list[int] = []

    def factory() -> asyncio.Protocol:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("broken session")
        return Greeter()

    async def run() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        sock = _listener()
        server = Acceptor(loop, sock, factory)
        server.start()
        try:
            replies = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection(*sock.getsockname())
                replies.append(await asyncio.wait_for(reader.read(100), 5))
                writer.close()
            return replies[0], replies[1]
        finally:
            server.close()
            await server.wait_closed()

    first, second = asyncio.run(run())
    assert (first, second) == (b"", b"220 hi\r\n")
