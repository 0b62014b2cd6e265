"""Ask the next hop at RCPT time whether an address exists: recipients = "lmtp" (the LMTP
server, LmtpProbe) and relay_recipients = "smtp" (a relay domain's SMTP hop, SmtpProbe).

One probe connection (LHLO once, then per question MAIL FROM:<>, RCPT TO:<address>, RSET,
pipelined when offered), answers cached like recipients.MailboxCache caches Maildir stats:
a found mailbox longer than a missing one, bounded in size. Questions are asked one at a time
on that connection; concurrent questions for the same address share one answer.

`exists` answers True, False or None ("could not ask": server down, timeout, a 4xx, or a 5xx
that is not about the address, such as a full mailbox with lmtp_rcpt_check_quota). None is
never cached: the SMTP layer answers it with a temporary refusal and the client retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from .base import Reply
from .client import Connection, ProtocolError, Refused, Timeouts, read_reply, reason
from .lmtp import TransportSpec, connect, parse_transport
from .smtp import SmtpTransport
from .stream import drain

log = logging.getLogger("elemta.delivery.probe")

FOUND_TTL = 60.0
MISSING_TTL = 10.0
DOWN_TTL = 2.0  # a server found unreachable is not asked again for this long
CACHE_LIMIT = 8192  # entries; a dictionary attack evicts the oldest, never grows it
PROBE_TIMEOUTS = Timeouts(connect=5.0, command=10.0)  # the SMTP client waits for our RCPT reply

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")


def verdict(reply: Reply) -> bool | None:
    """What a RCPT reply says about the address: exists, does not, or nothing certain.

    5.1.x (RFC 3463 "addressing status": bad mailbox, no such user, ...) or a 550 without an
    enhanced code is "no such user"; any other 5xx (quota, policy) is not a verdict on the
    address, so the message is taken and its delivery decides.
    """
    if 200 <= reply.code < 300:
        return True
    if reply.code >= 500:
        m = _ENHANCED.match(reply.text)
        if m is not None:
            return False if m.group(2) == "1" else None
        return False if reply.code == 550 else None
    return None


class RcptProbe:
    """The cache and the one connection; subclasses say how to open a greeted connection."""

    def __init__(self, where: str, *, timeouts: Timeouts = PROBE_TIMEOUTS,
                 found_ttl: float = FOUND_TTL, missing_ttl: float = MISSING_TTL,
                 cache_limit: int = CACHE_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.where = where  # how last_error names the server
        self.timeouts = timeouts
        self.found_ttl = found_ttl
        self.missing_ttl = missing_ttl
        self.cache_limit = cache_limit
        self.clock = clock
        self._seen: dict[str, tuple[bool, float]] = {}  # address -> (exists, valid until)
        self._asking: dict[str, asyncio.Future[bool | None]] = {}
        self._lock = asyncio.Lock()
        self._conn: Connection | None = None
        self.lookups = 0  # questions answered by the server (tests read it)
        self.connections = 0  # opened
        self.attempts = 0  # connects tried
        self._down_until = 0.0
        self._abandoned = False
        self.last_error = ""  # why the last question got no answer (logged, and for tests)

    async def _connect(self) -> Connection:
        """Connected and greeted, ready for MAIL. Raises OSError, TimeoutError, ProtocolError
        or Refused."""
        raise NotImplementedError

    def cached(self, address: str) -> bool | None:
        hit = self._seen.get(address.lower())
        if hit is None or hit[1] < self.clock():
            return None
        return hit[0]

    def forget(self) -> None:
        self._seen.clear()

    async def exists(self, address: str) -> bool | None:
        key = address.lower()
        known = self.cached(key)
        if known is not None:
            return known
        asking = self._asking.get(key)
        if asking is not None:
            return await asyncio.shield(asking)
        fut: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._asking[key] = fut
        try:
            answer = await self._ask(address)
        except BaseException:
            fut.set_result(None)
            raise
        finally:
            del self._asking[key]
        if not fut.done():
            fut.set_result(answer)
        if answer is not None:
            self._seen.pop(key, None)
            if len(self._seen) >= self.cache_limit:
                del self._seen[next(iter(self._seen))]
            self._seen[key] = (answer, self.clock() + (self.found_ttl if answer
                                                       else self.missing_ttl))
        return answer

    def abandon(self) -> None:
        """No longer used (a reload replaced it): close the connection now, or after the
        question in flight. Synchronous, for the reload path."""
        self._abandoned = True
        if not self._lock.locked():
            self._close()

    async def _ask(self, address: str) -> bool | None:
        async with self._lock:
            try:
                return await self._ask_locked(address)
            finally:
                if self._abandoned:
                    self._close()

    async def _ask_locked(self, address: str) -> bool | None:
        if self._conn is None and self.clock() < self._down_until:
            return None  # last_error still says why
        # A kept connection the server has since closed fails at once: ask again on a new one.
        for attempt in (1, 2):
            fresh = self._conn is None
            try:
                if self._conn is None:
                    self.attempts += 1
                    self._conn = await self._connect()
                    self.connections += 1
                reply = await self._question(self._conn, address)
            except (OSError, TimeoutError, ProtocolError, Refused) as exc:
                self._close()
                if fresh or attempt == 2:
                    self._down_until = self.clock() + DOWN_TTL
                    self.last_error = f"{self.where}: {reason(exc)}"
                    log.warning("recipient probe for <%s> failed: %s", address,
                                self.last_error)
                    return None
                continue
            self.lookups += 1
            answer = verdict(reply)
            if answer is None:
                self.last_error = f"{self.where}: RCPT TO:<{address}>: {reply}"
                log.warning("recipient probe: no verdict: %s", self.last_error)
            return answer
        return None  # not reached: the loop returns

    async def _question(self, conn: Connection, address: str) -> Reply:
        lines = ["MAIL FROM:<>", f"RCPT TO:<{address}>", "RSET"]
        t = self.timeouts.command
        if "PIPELINING" in conn.extensions:
            conn.writer.write("".join(c + "\r\n" for c in lines).encode())
            await drain(conn.writer, t)
            mail, rcpt, rset = [await read_reply(conn.reader, t, f"in reply to {c.split(':')[0]}")
                                for c in lines]
        else:
            mail = await conn.command(lines[0], t, "in reply to MAIL FROM")
            rcpt = await conn.command(lines[1], t, "in reply to RCPT TO")
            rset = await conn.command(lines[2], t, "in reply to RSET")
        for r in (mail, rcpt, rset):
            if r.code == 421:
                raise Refused(r.reply(), "")
        if mail.code != 250:
            raise Refused(mail.reply(), "in reply to MAIL FROM:<>")
        if rset.code != 250:
            raise Refused(rset.reply(), "in reply to RSET")
        return rcpt.reply()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(conn.writer.wait_closed(), 5)


class LmtpProbe(RcptProbe):
    """recipients = "lmtp": the LMTP server of [delivery] transport (LHLO once)."""

    def __init__(self, spec: TransportSpec | str, *, lhlo_name: str = "localhost",
                 **kw: Any) -> None:
        self.spec = parse_transport(spec) if isinstance(spec, str) else spec
        if self.spec.kind != "lmtp":
            raise ValueError(f"recipients = \"lmtp\" needs an LMTP transport, not {self.spec}")
        super().__init__(self.spec.where, **kw)
        self.lhlo_name = lhlo_name

    async def _connect(self) -> Connection:
        return await connect(self.spec, self.timeouts, self.lhlo_name)


class SmtpProbe(RcptProbe):
    """relay_recipients = "smtp": a relay domain's SMTP hop, greeted as its SmtpTransport
    greets it (EHLO, STARTTLS and AUTH as configured); the transport is used for nothing
    else, so it never holds a connection of its own."""

    def __init__(self, hop: SmtpTransport, **kw: Any) -> None:
        super().__init__(hop.where, timeouts=hop.timeouts, **kw)
        self.hop = hop

    async def _connect(self) -> Connection:
        conn = await self.hop._open()
        try:
            await self.hop._greet(conn)
        except BaseException:
            conn.close()
            raise
        return conn
