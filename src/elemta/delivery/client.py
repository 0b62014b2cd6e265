"""What the LMTP (RFC 2033) and SMTP (RFC 5321) clients share: reply parsing, one connection,
the greeting, one mail transaction, and a small connection pool that is the `Transport`.

One message per transaction: MAIL FROM (SIZE= and BODY=8BITMIME when the server offers them),
RCPT per recipient (pipelined when PIPELINING is offered), DATA, the body streamed from its file
(stream.py), then the replies after the dot: one per accepted recipient in RCPT order for LMTP,
one for the whole message for SMTP. A connection is kept for the next message (RSET first,
which also tells a connection the server has since closed from a live one) and closed after
`idle_timeout`.

Nothing the server or the network does raises out of `deliver`: a refused connection, a
timeout, a reset, a reply that does not parse or a 421 become a 4xx result for every recipient
whose outcome is still unknown, with the reason in the text, as Postfix logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from .base import Envelope, RecipientResult, Reply
from .stream import drain, send_body

REPLY_LINE_LIMIT = 2048  # RFC 5321 4.5.3.1.5 says 512; be lenient, but bounded
REPLY_LINES_LIMIT = 100
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)")


# -- timeouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds; Postfix's lmtp_*_timeout / smtp_*_timeout defaults except connect (Postfix's
    LMTP client: 0, none at all, which a stuck peer would turn into a stuck delivery slot)."""

    connect: float = 30.0  # TCP/unix connect plus the 220 greeting
    command: float = 300.0  # LHLO/EHLO, MAIL, RCPT, RSET replies
    data_init: float = 120.0  # the 354 after DATA
    data_xfer: float = 180.0  # each write of the body (a stalled peer, not a slow link)
    data_done: float = 600.0  # the replies after the final dot (the server delivers now)


# -- replies -------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The server said something that is not an SMTP reply, or closed the connection."""


@dataclass(frozen=True)
class ServerReply:
    code: int
    lines: tuple[str, ...]  # text of each line, without code and separator

    def reply(self) -> Reply:
        return Reply(self.code, self.lines[-1] if self.lines else "")


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """(code, is the last line, text) of one reply line without its line ending."""
    m = _REPLY_LINE.fullmatch(line)
    if m is None:
        raise ProtocolError(f"garbage reply {line[:80]!r}")
    text = m.group(3).decode("utf-8", "replace")
    if m.group(2) == b"" and text:
        raise ProtocolError(f"garbage reply {line[:80]!r}")
    return int(m.group(1)), m.group(2) != b"-", text


async def read_reply(reader: asyncio.StreamReader, timeout: float, what: str) -> ServerReply:
    """One (possibly multi-line, RFC 5321 4.2.1) reply. Raises ProtocolError, TimeoutError."""
    try:
        async with asyncio.timeout(timeout):
            return await _read_lines(reader, what)
    except TimeoutError:
        raise TimeoutError(f"timed out {what}") from None


async def _read_lines(reader: asyncio.StreamReader, what: str) -> ServerReply:
    lines: list[str] = []
    code = 0
    while True:
        try:
            raw = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(f"lost connection {what}") from exc
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError(f"reply line too long {what}") from exc
        this, last, text = parse_reply_line(raw.rstrip(b"\r\n"))
        if code and this != code:
            raise ProtocolError(f"reply codes {code} and {this} mixed in one reply {what}")
        code = this
        lines.append(text)
        if last:
            return ServerReply(code, tuple(lines))
        if len(lines) >= REPLY_LINES_LIMIT:
            raise ProtocolError(f"reply of more than {REPLY_LINES_LIMIT} lines {what}")


class Refused(Exception):
    """A reply that ends the transaction for every undecided recipient (421, a 4xx/5xx to MAIL)."""

    def __init__(self, reply: Reply, what: str) -> None:
        super().__init__(f"{reply} {what}")
        self.reply = reply


class Stale(Exception):
    """A kept connection that did not take RSET (closed while idle, 421, ...): nothing of the
    transaction reached the server, so it is tried again on a new connection."""


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's "Connect call failed (...)" says less
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    return str(exc) or type(exc).__name__


# -- one connection -------------------------------------------------------------------------


@dataclass
class Stats:
    connections: int = 0  # opened
    reused: int = 0  # messages sent on a connection that had carried one before
    messages: int = 0  # transactions that reached the final dot


@dataclass(eq=False)
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    relay: str  # "lmtp.test[127.0.0.1]:24" or the socket path
    extensions: dict[str, str] = field(default_factory=dict)  # "SIZE" -> "", "PIPELINING" -> ""
    idle_since: float = 0.0
    transactions: int = 0
    tls: bool = False  # STARTTLS done

    def close(self) -> None:
        """No wait for the QUIT reply: the server closes either way."""
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
            self.writer.close()

    async def command(self, line: str, timeout: float, what: str) -> ServerReply:
        self.writer.write(line.encode() + b"\r\n")
        await drain(self.writer, timeout)
        return await read_reply(self.reader, timeout, what)


async def open_connection(host: str, port: int, path: str, timeout: float) -> Connection:
    """Connected (TCP to host:port, or the unix socket `path`), not yet greeted.
    Raises OSError or TimeoutError."""
    async with asyncio.timeout(timeout):
        if path:
            reader, writer = await asyncio.open_unix_connection(path, limit=REPLY_LINE_LIMIT)
        else:
            reader, writer = await asyncio.open_connection(host, port, limit=REPLY_LINE_LIMIT)
    peer = "" if path else "[{}]:{}".format(*writer.get_extra_info("peername"))
    return Connection(reader, writer, path or host + peer)


def _soft(reply: Reply, what: str) -> Reply:
    """A refusal to talk at all says nothing about the recipients: retry (Postfix defers too)."""
    return reply if reply.code < 500 else Reply(451, f"4.3.0 refused to talk {what}: {reply}")


async def greet(conn: Connection, timeouts: Timeouts, verb: str, name: str,
                fallback: str = "") -> None:
    """The 220 greeting and `verb` (LHLO or EHLO); when EHLO gets a 5xx, `fallback` (HELO)
    without extensions, as RFC 5321 4.1.4 allows. Raises OSError, TimeoutError, ProtocolError
    or Refused."""
    banner = await read_reply(conn.reader, timeouts.connect, "while receiving the initial greeting")
    if banner.code != 220:
        raise Refused(_soft(banner.reply(), "in the greeting"), "in the initial greeting")
    peer = conn.relay.find("[")
    if peer > 0 and banner.lines[0]:  # Postfix's relay= shows the name the server gives
        conn.relay = banner.lines[0].split()[0] + conn.relay[peer:]
    await hello(conn, timeouts, verb, name, fallback)


async def hello(conn: Connection, timeouts: Timeouts, verb: str, name: str,
                fallback: str = "") -> None:
    """LHLO/EHLO (again after STARTTLS: RFC 3207 4.2), recording the extensions offered."""
    conn.extensions.clear()
    reply = await conn.command(f"{verb} {name}", timeouts.command, f"in reply to {verb}")
    if reply.code >= 500 and fallback:
        verb = fallback
        reply = await conn.command(f"{verb} {name}", timeouts.command, f"in reply to {verb}")
        if reply.code == 250:
            return
    if reply.code != 250:
        raise Refused(_soft(reply.reply(), f"after {verb}"), f"in reply to {verb}")
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        conn.extensions[keyword.upper()] = params


async def _rset_reply(conn: Connection, timeouts: Timeouts) -> None:
    reply = await read_reply(conn.reader, min(timeouts.command, 20.0), "in reply to RSET")
    if reply.code != 250:
        raise Stale(f"RSET answered {reply.reply()}")


def size_refusal(extensions: dict[str, str], size: int) -> Reply | None:
    """RFC 1870: a message larger than the server's declared SIZE would be refused after its
    transfer; refuse it before (a permanent failure, as Postfix bounces it)."""
    declared = extensions.get("SIZE", "").strip()
    if "SIZE" not in extensions or not declared.isdigit() or int(declared) == 0:
        return None  # no limit announced ("SIZE" alone or "SIZE 0")
    if size <= int(declared):
        return None
    return Reply(552, f"5.3.4 message size {size} exceeds size limit {declared} of the server")


def _address(addr: str) -> str:
    return f"<{addr}>"


async def transact(conn: Connection, envelope: Envelope, timeouts: Timeouts,
                   executor: Executor | None, results: dict[int, RecipientResult],
                   lmtp: bool, rset: bool = False) -> None:
    """One message on `conn`; every decided recipient goes into `results` (index -> result)
    as soon as it is known, so a failure later still leaves the earlier decisions.

    `rset`: `conn` is a kept one; the transaction starts with RSET (in the pipelined group
    when the server pipelines: no round trip of its own), and if that RSET is not answered
    250 (or the connection turns out closed before its reply), Stale is raised."""
    too_big = size_refusal(conn.extensions, envelope.size)
    if too_big is not None:
        for i, r in enumerate(envelope.recipients):
            results[i] = RecipientResult(r, too_big, conn.relay)
        return
    mail = f"MAIL FROM:{_address(envelope.sender)}"
    if "SIZE" in conn.extensions:
        mail += f" SIZE={envelope.size}"
    if "8BITMIME" in conn.extensions and envelope.eight_bit:
        mail += " BODY=8BITMIME"
    if "SMTPUTF8" in conn.extensions and envelope.smtputf8:
        mail += " SMTPUTF8"
    rcpts = [f"RCPT TO:{_address(r)}" for r in envelope.recipients]
    if "DSN" in conn.extensions:  # RFC 3461: the next hop takes over the notifications
        mail += (f" RET={envelope.ret}" if envelope.ret else "") + \
            (f" ENVID={envelope.envid}" if envelope.envid else "")
        for i, _ in enumerate(rcpts):
            if i < len(envelope.notify) and envelope.notify[i]:
                rcpts[i] += f" NOTIFY={envelope.notify[i]}"
            if i < len(envelope.orcpt) and envelope.orcpt[i]:
                rcpts[i] += f" ORCPT={envelope.orcpt[i]}"
    w = conn.writer
    data: ServerReply | None = None
    if "PIPELINING" in conn.extensions:
        # RFC 2920: DATA may end the group; with no recipient accepted the server refuses it.
        # RSET may start it (RFC 2920 3.1).
        group = (["RSET"] if rset else []) + [mail, *rcpts, "DATA"]
        try:
            w.write("".join(c + "\r\n" for c in group).encode())
            await drain(w, timeouts.command)
            if rset:
                await _rset_reply(conn, timeouts)
        except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
            if rset:
                raise Stale(reason(exc)) from exc
            raise
        replies = [await read_reply(conn.reader, timeouts.command, "in reply to MAIL FROM")]
        if replies[0].code == 250:  # else the connection is closed unread: the RCPTs got 503s
            for r in envelope.recipients:
                replies.append(await read_reply(conn.reader, timeouts.command,
                                                f"in reply to RCPT TO:<{r}>"))
                if replies[-1].code == 421:  # the server is going away: nothing more comes
                    break
            else:
                data = await read_reply(conn.reader, timeouts.data_init, "in reply to DATA")
    else:
        if rset:
            try:
                w.write(b"RSET\r\n")
                await drain(w, timeouts.command)
                await _rset_reply(conn, timeouts)
            except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
                raise Stale(reason(exc)) from exc
        replies = [await conn.command(mail, timeouts.command, "in reply to MAIL FROM")]
        if replies[0].code == 250:
            for r, line in zip(envelope.recipients, rcpts, strict=True):
                replies.append(await conn.command(line, timeouts.command,
                                                  f"in reply to RCPT TO:<{r}>"))
    if replies[0].code != 250:
        raise Refused(replies[0].reply(), "in reply to MAIL FROM")
    accepted = []
    for i, rr in enumerate(replies[1:]):
        if rr.code == 421:
            raise Refused(rr.reply(), f"in reply to RCPT TO:<{envelope.recipients[i]}>")
        if rr.code in (250, 251):
            accepted.append(i)
        else:
            results[i] = RecipientResult(envelope.recipients[i], rr.reply(), conn.relay)
    if not accepted:
        # Nothing to send; the next message on this connection starts with RSET.
        if data is not None and data.code == 354:  # a server that took DATA anyway: end it
            w.write(b".\r\n")
            await read_reply(conn.reader, timeouts.data_done, "while sending end of data")
        return
    if data is None:
        data = await conn.command("DATA", timeouts.data_init, "in reply to DATA")
    if data.code != 354:
        raise Refused(data.reply(), "in reply to DATA")
    await send_body(w, envelope.body, executor, timeouts.data_xfer, crlf=envelope.crlf)
    conn.transactions += 1
    if not lmtp:
        # RFC 5321: one reply for the message, which is every accepted recipient's.
        rr = await read_reply(conn.reader, timeouts.data_done, "while sending end of data")
        if rr.code == 421:
            raise Refused(rr.reply(), "after end of data")
        for i in accepted:
            results[i] = RecipientResult(envelope.recipients[i], rr.reply(), conn.relay)
        return
    # RFC 2033 4.2: one reply per accepted recipient, in RCPT order.
    for i in accepted:
        rr = await read_reply(conn.reader, timeouts.data_done, "while sending end of data")
        results[i] = RecipientResult(envelope.recipients[i], rr.reply(), conn.relay)
        if rr.code == 421:
            raise Refused(rr.reply(), "after end of data")


# -- the transport ---------------------------------------------------------------------------


class PooledTransport:
    """A `Transport` for one destination: at most `max_connections` at once, idle ones kept
    for `idle_timeout` seconds. Subclasses say how to open and greet a connection."""

    name = ""
    lmtp = False  # the replies after the dot: one per recipient (LMTP) or one (SMTP)

    def __init__(self, where: str, *, max_connections: int = 10, idle_timeout: float = 30.0,
                 timeouts: Timeouts | None = None, executor: Executor | None = None) -> None:
        self.where = where  # how reasons name the destination: "127.0.0.1:24", "/run/lmtp"
        self.timeouts = timeouts or Timeouts()
        self.idle_timeout = idle_timeout
        self.executor = executor
        self.stats = Stats()
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[Connection] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def _open(self) -> Connection:
        """Connected, not yet greeted. Raises OSError or TimeoutError."""
        raise NotImplementedError

    async def _greet(self, conn: Connection) -> None:
        """Ready for MAIL. Raises OSError, TimeoutError, ProtocolError or Refused."""
        raise NotImplementedError

    async def deliver(self, envelope: Envelope) -> Sequence[RecipientResult]:
        results: dict[int, RecipientResult] = {}
        async with self._slots:
            conn: Connection | None = None
            try:
                kept = self._take()
                if kept is not None:
                    conn = kept
                    try:
                        await self._send(kept, envelope, results, rset=True)
                        conn = None
                        return [results[i] for i in range(len(envelope.recipients))]
                    except Stale:  # closed while idle, or going away: not a delivery failure
                        kept.close()
                        conn = None
                conn = await self._open()
                self.stats.connections += 1
                await self._greet(conn)
                await self._send(conn, envelope, results, rset=False)
                conn = None
            except Refused as exc:
                self._fill(envelope, results, exc.reply, conn)
            except (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError) as exc:
                what = (f"4.4.1 connect to {self.where}" if conn is None
                        else f"4.4.2 conversation with {conn.relay}")
                self._fill(envelope, results, Reply(451, f"{what}: {reason(exc)}"), conn)
            finally:
                if conn is not None:
                    conn.close()
        return [results[i] for i in range(len(envelope.recipients))]

    def _fill(self, envelope: Envelope, results: dict[int, RecipientResult], reply: Reply,
              conn: Connection | None) -> None:
        relay = conn.relay if conn is not None else self.where
        for i, r in enumerate(envelope.recipients):
            if i not in results:
                results[i] = RecipientResult(r, reply, relay)

    def _take(self) -> Connection | None:
        """A kept connection (checked by the RSET that starts its next transaction), or None."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    async def _send(self, conn: Connection, envelope: Envelope,
                    results: dict[int, RecipientResult], rset: bool) -> None:
        """One transaction on `conn`, then `conn` is kept for the next. Raises what transact does."""
        before = conn.transactions
        await transact(conn, envelope, self.timeouts, self.executor, results, self.lmtp, rset)
        if conn.transactions > before:
            self.stats.messages += 1
            self.stats.reused += before > 0
        self._give_back(conn)

    def _give_back(self, conn: Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since >= self.idle_timeout:
                conn.close()
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            wait = self.idle_timeout - (now - min(c.idle_since for c in keep))
            self._timer = asyncio.get_running_loop().call_later(max(wait, 0.01), self._expire)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer.wait_closed(), 5)
