"""aiosmtpd SMTP subclass: admission at connect/MAIL/RCPT, streaming DATA, durable 250.

What aiosmtpd does well (command parsing, line limits, RSET/NOOP/HELP, STARTTLS) is kept.
Overridden: DATA (aiosmtpd buffers the whole message; we stream it to the spool file in
chunks), the greeting (admission and the connection cap), and reply formatting (enhanced
status codes on every reply once ESMTP is negotiated).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, syntax

from .. import __version__, runtime
from ..config import Config
from ..delivery.dsnparams import MailDsn, RcptDsn, split_mail, split_rcpt
from ..events import emit
from ..memory.refusal import Refusal
from ..persecond import PerSecond
from ..queue import transports
from ..queue.disk import DiskWatch, declared_size
from ..queue.intake import QueueIntake
from ..recipients import RecipientRefusal, Recipients
from ..sessionboard import SessionBoard
from ..store.maildir import Mailbox, Maildir, Spool, new_queue_id
from .address import simple_path
from .dataparse import DataDecoder, DataState, to_lf
from .loop import REPLY_TOO_MANY_HOPS, HopCounter
from .policy import REPLY_RELAY_DENIED, classify_recipient, recipient_reply
from .relay import relay_mailbox
from .replies import (
    REPLY_LINE_TOO_LONG,
    REPLY_SHUTDOWN,
    REPLY_STORAGE,
    REPLY_TIMEOUT,
    REPLY_TOO_BIG,
    REPLY_TOO_MANY_CONNECTIONS,
    REPLY_TOO_MANY_RCPTS,
    refusal_reply,
)
from .template import SessionTemplate

log = logging.getLogger("elemta.smtp")

# 64 KiB reads: 0.3-0.5 MiB RSS growth for a 100 MiB message (256 KiB: 1.3 MiB) for ~15% more
# CPU per MiB (bench figures in the issue 2 note).
CHUNK = 64 * 1024
# During DATA the timeout restarts only after this much progress, so a client dripping a
# byte every few seconds is still cut after data_timeout (a minimum data rate, as Postfix's
# smtpd_min_data_rate), while a slow but real link keeps its session.
DATA_PROGRESS = 64 * 1024

# RFC 3463 codes for aiosmtpd's own replies, which carry none.
_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.3.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def _sanitized_log(func: Callable[..., None], msg: str, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, skipped when its logger would drop the line anyway.

    aiosmtpd passes every command line through it (sanitized, a repr of the bytes) for a
    debug message that is off unless [logging] level = "debug": 2% of the event loop's time at
    one message per connection (py-spy), for nothing."""
    logger = getattr(func, "__self__", None)
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(
            logging.DEBUG if func.__name__ == "debug" else logging.INFO):
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log
aiosmtpd.smtp.sanitized_log = _sanitized_log  # type: ignore[assignment]


# The Received: header's date.
_RECEIVED_DATE = PerSecond(lambda second: email.utils.formatdate(second, localtime=True))


class Admission(Protocol):
    """The questions the SMTP layer asks; the memory governor answers them.

    Each returns None to allow, or the reason it refuses; replies.refusal_reply words it.
    """

    def connection(self, sessions: int) -> Refusal | None: ...

    def command(self, verb: str, session_bytes: int) -> Refusal | None: ...

    def enter_data(self, in_data: int) -> Refusal | None: ...

    def data(self, session_bytes: int) -> Refusal | None: ...


class OpenAdmission:
    """Admits everything: used until a governor is attached."""

    def connection(self, sessions: int) -> Refusal | None:
        return None

    def command(self, verb: str, session_bytes: int) -> Refusal | None:
        return None

    def enter_data(self, in_data: int) -> Refusal | None:
        return None

    def data(self, session_bytes: int) -> Refusal | None:
        return None


class SmtpObserver(Protocol):
    def reply(self, status: str) -> None: ...

    def message_accepted(self, size: int, recipients: int) -> None: ...

    def connection(self, outcome: str) -> None: ...


class NullObserver:
    def reply(self, status: str) -> None:
        pass

    def message_accepted(self, size: int, recipients: int) -> None:
        pass

    def connection(self, outcome: str) -> None:
        pass


@dataclass
class SmtpContext:
    """What every session of one daemon shares."""

    config: Config
    store: Maildir
    admission: Admission = field(default_factory=OpenAdmission)
    observer: SmtpObserver = field(default_factory=NullObserver)
    sessions: set[ElemtaSMTP] = field(default_factory=set)
    draining: bool = False
    accepted: int = 0  # connections this process accepted (logged at stop: balance of workers)
    tls: ssl.SSLContext | None = None
    # Workers: every worker's open sessions, so max_connections caps the whole daemon.
    board: SessionBoard | None = None
    board_slot: int = 0
    handler: Handler = field(init=False)
    # aiosmtpd's per-session constructor state, built by the first session of a configuration.
    template: SessionTemplate | None = field(default=None, init=False)
    # Who may receive mail ([delivery] recipients, aliases); SIGHUP re-reads its maps.
    recipients: Recipients = field(init=False)
    # Set when a queued transport is configured: messages for it go to the queue.
    queue: QueueIntake | None = None
    # Free space of the mail filesystems, sampled off the loop ([delivery] queue_minfree).
    disk: DiskWatch | None = None
    # Sessions between their 354 and their final reply (what the governor reserves buffers for).
    in_data: int = 0

    def __post_init__(self) -> None:
        self.handler = Handler(self)  # stateless: one for all sessions, not one each
        d = self.config.delivery
        auth = runtime.relay_auth(d.relay_auth_file)  # checked by runtime.problems before start
        self.recipients = Recipients.build(
            d, self.store.root, self.store.executor,
            lambda spec: transports.hop_probe(spec, self.config.delivery, self.store.hostname,
                                              auth))

    @property
    def session_bytes(self) -> int:
        return sum(s.held_bytes for s in self.sessions)

    def sessions_changed(self) -> None:
        if self.board is not None:
            self.board.set(self.board_slot, len(self.sessions))

    def data_changed(self, by: int) -> None:
        self.in_data += by
        if self.board is not None:
            self.board.set_in_data(self.board_slot, self.in_data)

    def sessions_in_data(self) -> int:
        """Sessions in DATA in the whole daemon (all workers)."""
        return self.board.in_data() if self.board is not None else self.in_data

    def open_sessions(self) -> int:
        """Sessions open in the whole daemon (all workers), this one included."""
        return self.board.total() if self.board is not None else len(self.sessions)


class ElemtaEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.mailboxes: list[Mailbox] = []
        self.mail_dsn = MailDsn()  # RET, ENVID
        self.rcpt_dsn: dict[str, RcptDsn] = {}  # mailbox -> NOTIFY, ORCPT of its RCPT


class Handler:
    """aiosmtpd hooks for EHLO/MAIL/RCPT. Stateless: per-session state lives on the server."""

    def __init__(self, ctx: SmtpContext) -> None:
        self.ctx = ctx

    async def handle_EHLO(
        self, server: ElemtaSMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # No AUTH: elemta is an inbound MX; aiosmtpd's built-in mechanisms only ever fail.
        out = [r for r in responses if not r.startswith("250-AUTH") and r != "250 HELP"]
        out += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN", "250 HELP"]
        return out

    async def handle_MAIL(
        self, server: ElemtaSMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        refusal = self.ctx.admission.command("MAIL", server.held_bytes)
        if refusal is not None:
            return refusal_reply(refusal)
        if self.ctx.disk is not None:
            no_space = self.ctx.disk.refusal(self.ctx.config.delivery.queue_minfree,
                                             declared_size(options))
            if no_space is not None:
                return no_space
        if any(c < " " or c == "\x7f" for c in address):
            return "553 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        if isinstance(envelope, ElemtaEnvelope):
            envelope.mail_dsn = server.mail_dsn
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self, server: ElemtaSMTP, session: Session, envelope: ElemtaEnvelope, address: str,
        options: list[str],
    ) -> str:
        refusal = self.ctx.admission.command("RCPT", server.held_bytes)
        if refusal is not None:
            return refusal_reply(refusal)
        if len(envelope.rcpt_tos) >= self.ctx.config.server.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        box = classify_recipient(address, self.ctx.config.delivery.domains)
        if box == REPLY_RELAY_DENIED and self.ctx.queue is not None:  # relayed via the queue
            relayed = relay_mailbox(address, self.ctx.config.delivery.relay_domains)
            if isinstance(relayed, str):
                return relayed
            if relayed is not None:
                taken = await self.ctx.recipients.resolve_relay(relayed)
                if isinstance(taken, RecipientRefusal):
                    return recipient_reply(taken, relayed)
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(options)
                if relayed not in envelope.mailboxes:
                    envelope.mailboxes.append(relayed)
                envelope.rcpt_dsn.setdefault(str(relayed), server.rcpt_dsn)
                return "250 2.1.5 Recipient ok"
        if isinstance(box, str):
            return box
        targets = await self.ctx.recipients.resolve(box)
        if isinstance(targets, RecipientRefusal):
            return recipient_reply(targets, box)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        for target in targets:  # an alias and its target named both: one copy
            if target not in envelope.mailboxes:
                envelope.mailboxes.append(target)
            envelope.rcpt_dsn.setdefault(str(target), server.rcpt_dsn)
        return "250 2.1.5 Recipient ok"


def _bad_helo(name: str | None) -> bool:
    """Control characters in a HELO name are never a hostname; refuse rather than record them."""
    return bool(name) and any(c < "!" or c == "\x7f" for c in name or "")


def _header_text(value: str) -> str:
    """Client-supplied text made safe for a header: printable ASCII, no line breaks."""
    return "".join(c if " " <= c <= "~" else "?" for c in value)[:200]


class ElemtaSMTP(SMTP):
    def __init__(self, ctx: SmtpContext) -> None:
        self.ctx = ctx
        self.in_data = False
        self._decoder: DataDecoder | None = None
        self._spool: Spool | None = None
        self._in_helo = False
        self._batch: list[str] | None = None
        self._deadline = 0.0  # loop time when the current command or DATA timeout expires
        self.mail_dsn = MailDsn()  # the DSN parameters of the MAIL / RCPT being handled
        self.rcpt_dsn = RcptDsn()
        key = (ctx.config, ctx.tls, ctx.handler)
        template = ctx.template
        if template is not None and template.fits(key):
            template.stamp(self, self.line_length_limit)
            return
        own = frozenset(vars(self))
        cfg = ctx.config.server
        super().__init__(
            ctx.handler,
            data_size_limit=cfg.max_message_size,
            hostname=ctx.store.hostname,  # resolved once, at start (runtime.hostname)
            ident="ESMTP elemta",
            timeout=cfg.command_timeout,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            tls_context=ctx.tls,
            require_starttls=ctx.config.tls.required,
        )
        ctx.template = SessionTemplate(self, own, key)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        fast = simple_path(arg)
        if fast is None:
            return super()._getaddr(arg)
        address, rest = fast
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    # -- per-session memory ledger --------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """In-memory bytes this session holds: unread input, partial line, unsent replies."""
        held = 0
        reader = getattr(self, "_reader", None)
        if reader is not None:
            held += len(reader._buffer)
        if self._decoder is not None:
            held += self._decoder.held
        if self._spool is not None:
            held += self._spool.buffered
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            held += transport.get_write_buffer_size()
        return held

    def _create_envelope(self) -> ElemtaEnvelope:
        return ElemtaEnvelope()

    # -- connection lifecycle --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.ctx.accepted += 1
            self.ctx.sessions.add(self)
            self.ctx.sessions_changed()
            if hasattr(transport, "max_size"):
                # asyncio's socket transport receives up to 256 KiB at a time (a fresh bytes
                # object each, then copied into the StreamReader): under a flood every session
                # in DATA held ~0.5 MiB. Reading what DATA consumes at once halves that.
                setattr(transport, "max_size", CHUNK)  # noqa: B010 - not in the typed API
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.sessions.discard(self)
        self.ctx.sessions_changed()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        refusal = self._connection_refusal()
        if refusal is not None:
            self.ctx.observer.connection(refusal.split(" ", 2)[1])
            await self.push(refusal)
            self._writer.close()
            return
        self.ctx.observer.connection("accepted")
        await super()._handle_client()

    def _connection_refusal(self) -> str | None:
        if self.ctx.draining:
            return REPLY_SHUTDOWN
        if self.ctx.open_sessions() > self.ctx.config.server.max_connections:
            return REPLY_TOO_MANY_CONNECTIONS
        refusal = self.ctx.admission.connection(len(self.ctx.sessions))
        return None if refusal is None else refusal_reply(refusal)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client's failed handshake (a protocol or cipher we refuse, or garbage) is bad
            # input, not our fault: one line. aiosmtpd closes the connection and sends nothing.
            peer = self.session.peer if self.session else "?"
            log.info("%s: STARTTLS handshake failed: %s", peer, error.__cause__ or error)
            return "454 4.7.0 TLS handshake failed"
        return await super().handle_exception(error)

    def shutdown_now(self, reply: str = REPLY_SHUTDOWN) -> None:
        """Tell the client why we are going away and close (draining, timeouts)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            self.ctx.observer.reply(reply)
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    def _timeout_cb(self) -> None:
        log.info("%s: timeout, closing", self.session.peer if self.session else "?")
        self.shutdown_now(REPLY_TIMEOUT)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-arms a loop timer for every command; moving a deadline is
        # cheaper, and the armed timer re-arms itself if it fires before the deadline.
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        if self._deadline - self.loop.time() > 0.001:  # the loop may run a timer a tick early
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)
        else:
            self._timeout_cb()

    # -- replies ---------------------------------------------------------------------------
    async def push(self, status: str) -> None:  # type: ignore[override]
        status = self._with_enhanced_code(status)
        self.ctx.observer.reply(status)
        if self._batch is not None:
            self._batch.append(status)
            return
        await super().push(status)

    async def _push_batched(self, command: Callable[[], Awaitable[None]]) -> None:
        """Run `command`, sending all its reply lines in one write (one syscall, one segment)."""
        self._batch = []
        try:
            await command()
        finally:
            lines, self._batch = self._batch, None
        if lines:
            self._writer.write("".join(f"{line}\r\n" for line in lines).encode("ascii", "replace"))
            await self._writer.drain()

    def _with_enhanced_code(self, status: str) -> str:
        if status.startswith("502 5.5.1 Too many unrecognized commands"):
            # aiosmtpd closes the connection after this reply; RFC 5321 3.8 wants 421 then.
            return "421 4.7.0 Too many unrecognized commands, closing connection"
        session = self.session
        if self._in_helo or session is None or not session.extended_smtp:
            return status
        code, sep, text = status[:3], status[3:4], status[4:]
        enhanced = _ENHANCED.get(code)
        if enhanced is None or sep not in (" ", "-") or _HAS_ENHANCED.match(text):
            return status
        return f"{code}{sep}{enhanced} {text}"

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname or _bad_helo(hostname):
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._in_helo = True
        try:
            await self._push_batched(lambda: super(ElemtaSMTP, self).smtp_EHLO(hostname))
        finally:
            self._in_helo = False

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname or _bad_helo(hostname):
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self._in_helo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_helo = False

    # -- the DSN extension's parameters (RFC 3461), which aiosmtpd does not know --------------
    # aiosmtpd's HELP lists (and explains) only commands carrying its syntax decoration.
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self.mail_dsn = MailDsn()
        if arg and self.session is not None and self.session.extended_smtp:
            split = split_mail(arg)
            if isinstance(split, str):
                await self.push(split)
                return
            arg, self.mail_dsn = split
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self.rcpt_dsn = RcptDsn()
        if arg and self.session is not None and self.session.extended_smtp:
            split = split_rcpt(arg)
            if isinstance(split, str):
                await self.push(split)
                return
            arg, self.rcpt_dsn = split
        await super().smtp_RCPT(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        # EHLO offers no AUTH (an inbound MX); aiosmtpd's own AUTH would ask for TLS first
        # and then fail every mechanism.
        await self.push("502 Command not implemented")

    # -- DATA, streamed --------------------------------------------------------------------
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        envelope = self._envelope()
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        refusal = self.ctx.admission.enter_data(self.ctx.sessions_in_data())
        if refusal is not None:
            await self.push(refusal_reply(refusal))
            return
        qid = new_queue_id()
        queue = self.ctx.queue
        routes = queue.routes(envelope.mailboxes, self.ctx.config.delivery) if queue else None
        try:
            if queue is not None and routes is not None:
                sender = envelope.mail_from if envelope.mail_from not in (None, "<>") else ""
                spool = queue.open(routes, sender, self._trace_headers(envelope, qid, True), qid,
                                   "BODY=8BITMIME" in envelope.mail_options,
                                   envelope.smtp_utf8, envelope.mail_dsn, envelope.rcpt_dsn)
            else:
                spool = await self.ctx.store.open(
                    envelope.mailboxes, self._trace_headers(envelope, qid), qid)
        except OSError as exc:
            log.warning("cannot prepare the mailboxes: %s", exc.strerror or exc)
            await self.push(REPLY_STORAGE)
            return
        self.in_data = True
        self.ctx.data_changed(+1)
        self._spool = spool
        try:
            status = await self._receive(spool, envelope, lf=routes is None)
        finally:
            self.ctx.data_changed(-1)
            self.in_data = False
            self._decoder = None
            self._spool = None
        await spool.discarded()  # a refused message's file is gone before the reply says so
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if queue is not None and routes is not None and status.startswith("250"):
            queue.wake()
        await self.push(status)
        if self.ctx.draining:
            self.shutdown_now()

    async def _receive(self, spool: Spool, envelope: ElemtaEnvelope, lf: bool = True) -> str:
        decoder = self._decoder = DataDecoder(self.ctx.config.server.max_message_size)
        hops = HopCounter()
        timeout = self.ctx.config.server.data_timeout
        write_failed: OSError | None = None
        over_budget: Refusal | None = None
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._reset_timeout(timeout)
            progress = 0
            while True:
                chunk = await self._reader.read(CHUNK)
                if not chunk:
                    raise ConnectionResetError("connection closed during DATA")
                progress += len(chunk)
                if progress >= DATA_PROGRESS:
                    progress = 0
                    self._reset_timeout(timeout)
                out, rest = decoder.feed(chunk)
                if not hops.done:
                    hops.feed(out)
                if out and write_failed is None and over_budget is None:
                    try:
                        # Maildir files use the local newline convention, as Postfix and
                        # Dovecot's LDA write them. A full buffer is written out on a commit
                        # thread, and the client is not read meanwhile.
                        # Queued messages keep CRLF (the transports send them as they are).
                        await spool.write(to_lf(out) if lf else out)
                    except OSError as exc:
                        write_failed = exc
                if over_budget is None:
                    over_budget = self.ctx.admission.data(self.held_bytes)
                if rest is not None:
                    if rest:
                        # Pipelined commands after the final dot belong to the command loop.
                        # StreamReader has no unread(); its buffer is a bytearray (aiosmtpd
                        # itself clears it on STARTTLS).
                        self._reader._buffer[:0] = rest  # type: ignore[attr-defined]
                    break
            self._reset_timeout()
            if decoder.state is DataState.TOO_LONG:
                return REPLY_LINE_TOO_LONG
            if decoder.state is DataState.TOO_MUCH:
                return REPLY_TOO_BIG
            if over_budget is not None:
                return refusal_reply(over_budget, in_data=True)
            if hops.too_many:
                log.info("queue %s: refused, %d Received: headers (a mail loop?) from=<%s>",
                         spool.queue_id, hops.hops, envelope.mail_from)
                return REPLY_TOO_MANY_HOPS
            if write_failed is not None:
                log.warning("queue %s: write failed: %s", spool.queue_id, write_failed.strerror)
                return REPLY_STORAGE
            try:
                await spool.commit()
            except asyncio.CancelledError:
                # The connection closed after the dot (aiosmtpd cancels the session): the commit runs
                # on, and is logged when it ends, as if the 250 had been lost on the way.
                assert spool.stored is not None
                spool.stored.add_done_callback(lambda stored: self._log_commit(
                    spool, envelope, None if stored.cancelled() else stored.exception(),
                    replied=False))
                raise
            except OSError as exc:
                self._log_commit(spool, envelope, exc)
                return REPLY_STORAGE
        finally:
            spool.discard()  # nothing left to do once committed (or committing)
        self._log_commit(spool, envelope, None)
        return f"250 2.0.0 Ok: queued as {spool.queue_id}"

    # Methods, not properties: aiosmtpd's __init__ runs inspect.getmembers(self), which
    # evaluates every property before the session exists.
    def _envelope(self) -> ElemtaEnvelope:
        assert isinstance(self.envelope, ElemtaEnvelope)
        return self.envelope

    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    def _log_commit(self, spool: Spool, envelope: ElemtaEnvelope, error: BaseException | None,
                    replied: bool = True) -> None:
        """Log how a commit ended (`error` None: stored), whether or not the client heard."""
        gone = "" if replied else " (the connection closed before the reply)"
        if error is not None:
            reason = getattr(error, "strerror", None) or error
            log.warning("queue %s: cannot store: %s%s", spool.queue_id, reason, gone)
            return
        rcpts = len(envelope.mailboxes)
        self.ctx.observer.message_accepted(spool.size, rcpts)
        sender = envelope.mail_from if envelope.mail_from != "<>" else ""
        emit(log, "message_accepted",
             f"queued {spool.queue_id} from=<{sender}> rcpts={rcpts} size={spool.size}{gone}",
             queue_id=spool.queue_id, sender=sender, recipients=rcpts, size=spool.size)

    def _trace_headers(self, envelope: ElemtaEnvelope, qid: str, queued: bool = False) -> bytes:
        session = self._session()
        peer = session.peer
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            proto += "S"
        sender = envelope.mail_from if envelope.mail_from not in (None, "<>") else ""
        for_clause = f"\n\tfor <{envelope.mailboxes[0]}>" if len(envelope.mailboxes) == 1 else ""
        received = (
            f"Received: from {_header_text(session.host_name or 'unknown')} ([{ip}])\n"
            f"\tby {_header_text(self.hostname)} (elemta {__version__}) with {proto} id {qid}"
            f"{for_clause};\n\t{_RECEIVED_DATE.text(time.time())}\n"
        )
        if queued:  # the final delivery adds Return-Path (RFC 5321 4.4), from the envelope
            return received.replace("\n", "\r\n").encode("ascii")
        return f"Return-Path: <{_header_text(sender)}>\n{received}".encode("ascii")


def session_factory(ctx: SmtpContext) -> Callable[[], Any]:
    return lambda: ElemtaSMTP(ctx)
