"""LMTP (RFC 2033) delivery: a streaming client, a small connection pool, transport specs.

One message per transaction: LHLO once per connection, MAIL FROM (SIZE= and BODY=8BITMIME
when the server offers them), RCPT per recipient (pipelined when PIPELINING is offered), DATA,
the body streamed from its file (stream.py), then one reply per accepted recipient, in RCPT
order. A connection is kept for the next message (RSET first, which also tells a connection
the server has since closed from a live one) and closed after `idle_timeout`.

Nothing the server or the network does raises out of `deliver`: a refused connection, a
timeout, a reset, a reply that does not parse or a 421 become a 4xx result for every recipient
whose outcome is still unknown, with the reason in the text, as Postfix logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from .base import Envelope, RecipientResult, Reply, Transport
from .stream import send_body

log = logging.getLogger("elemta.delivery.lmtp")

LMTP_PORT = 24
REPLY_LINE_LIMIT = 2048  # RFC 5321 4.5.3.1.5 says 512; be lenient, but bounded
REPLY_LINES_LIMIT = 100
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)")


# -- transport specs --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportSpec:
    kind: str  # "maildir" or "lmtp"
    host: str = ""  # lmtp over TCP: name or address (IPv6 without brackets)
    port: int = 0
    path: str = ""  # lmtp over a unix socket

    def __str__(self) -> str:
        if self.kind == "maildir":
            return "maildir"
        if self.path:
            return f"lmtp:unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"lmtp:{host}:{self.port}"

    @property
    def where(self) -> str:
        """How reasons name the destination: "/run/dovecot/lmtp", "127.0.0.1:24", "[::1]:24"."""
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{spec!r}: port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def parse_transport(spec: str) -> TransportSpec:
    """ "maildir", "lmtp:unix:/path", "lmtp:HOST:PORT", "lmtp:[IPV6]:PORT" (port default 24).

    Raises ValueError with a message that names the problem (config prefixes file and key).
    """
    if not isinstance(spec, str):
        raise ValueError(f"expected a string, got {type(spec).__name__} {spec!r}")
    if spec == "maildir":
        return TransportSpec("maildir")
    kind, colon, rest = spec.partition(":")
    if kind != "lmtp" or not colon:
        raise ValueError(f"must be \"maildir\", \"lmtp:unix:/path\", \"lmtp:HOST:PORT\" or "
                         f"\"lmtp:[IPV6]:PORT\", got {spec!r}")
    if rest.startswith("unix:"):
        path = rest[5:]
        if not path.startswith("/"):
            raise ValueError(f"{spec!r}: the unix socket path must be absolute")
        return TransportSpec("lmtp", path=path)
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{spec!r}: {host!r} in brackets is not an IPv6 address") from None
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"{spec!r}: expected \"lmtp:[IPV6]:PORT\"")
        return TransportSpec("lmtp", host=host, port=_port(tail[1:], spec) if tail else LMTP_PORT)
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port = rest, ""
    if ":" in host:
        raise ValueError(f"{spec!r}: an IPv6 address needs brackets: \"lmtp:[{host}]:{port}\"")
    if not host or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{spec!r}: {host!r} is not a host name or address")
    return TransportSpec("lmtp", host=host, port=_port(port, spec) if port else LMTP_PORT)


# -- timeouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds; Postfix's lmtp_*_timeout defaults except connect (Postfix: 0, none at all,
    which a stuck peer would turn into a stuck delivery slot)."""

    connect: float = 30.0  # TCP/unix connect plus the 220 greeting
    command: float = 300.0  # LHLO, MAIL, RCPT, RSET replies
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

    def close(self) -> None:
        """No wait for the QUIT reply: the server closes either way."""
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
            self.writer.close()

    async def command(self, line: str, timeout: float, what: str) -> ServerReply:
        self.writer.write(line.encode() + b"\r\n")
        await asyncio.wait_for(self.writer.drain(), timeout)
        return await read_reply(self.reader, timeout, what)


async def open_connection(spec: TransportSpec, timeouts: Timeouts) -> Connection:
    """Connected, not yet greeted. Raises OSError or TimeoutError."""
    async with asyncio.timeout(timeouts.connect):
        if spec.path:
            reader, writer = await asyncio.open_unix_connection(spec.path, limit=REPLY_LINE_LIMIT)
        else:
            reader, writer = await asyncio.open_connection(spec.host, spec.port,
                                                           limit=REPLY_LINE_LIMIT)
    peer = "" if spec.path else "[{}]:{}".format(*writer.get_extra_info("peername"))
    return Connection(reader, writer, spec.path or spec.host + peer)


def _soft(reply: Reply, what: str) -> Reply:
    """A refusal to talk at all says nothing about the recipients: retry (Postfix defers too)."""
    return reply if reply.code < 500 else Reply(451, f"4.3.0 refused to talk {what}: {reply}")


async def greet(conn: Connection, timeouts: Timeouts, lhlo_name: str) -> None:
    """The 220 greeting and LHLO. Raises OSError, TimeoutError, ProtocolError or Refused."""
    banner = await read_reply(conn.reader, timeouts.connect, "while receiving the initial greeting")
    if banner.code != 220:
        raise Refused(_soft(banner.reply(), "in the greeting"), "in the initial greeting")
    peer = conn.relay.find("[")
    if peer > 0 and banner.lines[0]:  # Postfix's relay= shows the name the server gives
        conn.relay = banner.lines[0].split()[0] + conn.relay[peer:]
    lhlo = await conn.command(f"LHLO {lhlo_name}", timeouts.command, "in reply to LHLO")
    if lhlo.code != 250:
        raise Refused(_soft(lhlo.reply(), "after LHLO"), "in reply to LHLO")
    for line in lhlo.lines[1:]:
        keyword, _, params = line.partition(" ")
        conn.extensions[keyword.upper()] = params


async def connect(spec: TransportSpec, timeouts: Timeouts, lhlo_name: str) -> Connection:
    """Connected, greeted and LHLO'd. Raises OSError, TimeoutError, ProtocolError or Refused."""
    conn = await open_connection(spec, timeouts)
    try:
        await greet(conn, timeouts, lhlo_name)
    except BaseException:
        conn.writer.close()
        raise
    return conn


def _address(addr: str) -> str:
    return f"<{addr}>"


async def transact(conn: Connection, envelope: Envelope, timeouts: Timeouts,
                   executor: Executor | None, results: dict[int, RecipientResult]) -> None:
    """One message on `conn`; every decided recipient goes into `results` (index -> result)
    as soon as it is known, so a failure later still leaves the earlier decisions."""
    mail = f"MAIL FROM:{_address(envelope.sender)}"
    if "SIZE" in conn.extensions:
        mail += f" SIZE={envelope.size}"
    if "8BITMIME" in conn.extensions and envelope.eight_bit:
        mail += " BODY=8BITMIME"
    if "SMTPUTF8" in conn.extensions and envelope.smtputf8:
        mail += " SMTPUTF8"
    rcpts = [f"RCPT TO:{_address(r)}" for r in envelope.recipients]
    w = conn.writer
    if "PIPELINING" in conn.extensions:
        w.write("".join(c + "\r\n" for c in [mail, *rcpts]).encode())
        await asyncio.wait_for(w.drain(), timeouts.command)
        replies = [await read_reply(conn.reader, timeouts.command, "in reply to MAIL FROM")]
        if replies[0].code == 250:  # else the connection is closed unread: the RCPTs got 503s
            for r in envelope.recipients:
                replies.append(await read_reply(conn.reader, timeouts.command,
                                                f"in reply to RCPT TO:<{r}>"))
    else:
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
        return
    data = await conn.command("DATA", timeouts.data_init, "in reply to DATA")
    if data.code != 354:
        raise Refused(data.reply(), "in reply to DATA")
    await send_body(w, envelope.body, executor, timeouts.data_xfer)
    conn.transactions += 1
    # RFC 2033 4.2: one reply per accepted recipient, in RCPT order.
    for i in accepted:
        rr = await read_reply(conn.reader, timeouts.data_done, "while sending end of data")
        results[i] = RecipientResult(envelope.recipients[i], rr.reply(), conn.relay)
        if rr.code == 421:
            raise Refused(rr.reply(), "after end of data")


# -- the transport ---------------------------------------------------------------------------


class LmtpTransport:
    """`Transport` for one LMTP destination: at most `max_connections` at once, idle ones kept
    for `idle_timeout` seconds."""

    name = "lmtp"

    def __init__(self, spec: TransportSpec | str, *, max_connections: int = 10,
                 idle_timeout: float = 30.0, timeouts: Timeouts | None = None,
                 executor: Executor | None = None, lhlo_name: str = "localhost") -> None:
        self.spec = parse_transport(spec) if isinstance(spec, str) else spec
        if self.spec.kind != "lmtp":
            raise ValueError(f"not an LMTP transport: {self.spec}")
        self.timeouts = timeouts or Timeouts()
        self.idle_timeout = idle_timeout
        self.executor = executor
        self.lhlo_name = lhlo_name
        self.stats = Stats()
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[Connection] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def deliver(self, envelope: Envelope) -> Sequence[RecipientResult]:
        results: dict[int, RecipientResult] = {}
        async with self._slots:
            conn: Connection | None = None
            try:
                conn = await self._take()
                if conn is None:
                    conn = await open_connection(self.spec, self.timeouts)
                    self.stats.connections += 1
                    await greet(conn, self.timeouts, self.lhlo_name)
                before = conn.transactions
                await transact(conn, envelope, self.timeouts, self.executor, results)
                if conn.transactions > before:
                    self.stats.messages += 1
                    self.stats.reused += before > 0
                self._give_back(conn)
                conn = None
            except Refused as exc:
                self._fill(envelope, results, exc.reply, conn)
            except (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError) as exc:
                what = (f"4.4.1 connect to {self.spec.where}" if conn is None
                        else f"4.4.2 conversation with {conn.relay}")
                self._fill(envelope, results, Reply(451, f"{what}: {reason(exc)}"), conn)
            finally:
                if conn is not None:
                    conn.close()
        return [results[i] for i in range(len(envelope.recipients))]

    def _fill(self, envelope: Envelope, results: dict[int, RecipientResult], reply: Reply,
              conn: Connection | None) -> None:
        relay = conn.relay if conn is not None else self.spec.where
        for i, r in enumerate(envelope.recipients):
            if i not in results:
                results[i] = RecipientResult(r, reply, relay)

    async def _take(self) -> Connection | None:
        """A kept connection that still answers RSET, or None: open a new one."""
        while self._idle:
            conn = self._idle.pop()
            try:
                rset = await conn.command("RSET", min(self.timeouts.command, 20.0),
                                          "in reply to RSET")
                if rset.code == 250:
                    return conn
            except (OSError, TimeoutError, ProtocolError):
                pass  # the server closed it while idle: not a delivery failure
            conn.close()
        return None

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


def _is_a_transport(t: LmtpTransport) -> Transport:
    return t  # mypy checks here that LmtpTransport keeps to the queue's Protocol
