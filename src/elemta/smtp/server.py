"""The SMTP session: admission at connect/MAIL/RCPT, streaming DATA, durable 250.

Each session is an asyncio.Protocol driven by its transport's callbacks (no task, no stream
reader per connection): command lines are parsed as they arrive (smtp/command.py words the
syntax errors), each command runs at once, and only a command that has to wait (a commit, a
recipient lookup, a TLS handshake) continues in a task. Replies carry enhanced status codes
once ESMTP is negotiated. DATA is streamed to the spool file in chunks, never held whole.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

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
from .command import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    REPLY_LINE_TOO_LONG,
    REPLY_NEED_MAIL,
    REPLY_NEED_RCPT,
    REPLY_NESTED_MAIL,
    REPLY_SEND_HELO,
    REPLY_STARTTLS_FIRST,
    REPLY_TOO_MANY_BOGUS,
    check_mail_params,
    help_reply,
    parse_mail_rcpt,
    split_line,
    syntax_error,
    too_long,
)
from .dataparse import LINE_LIMIT, DataDecoder, DataState, to_lf
from .loop import REPLY_TOO_MANY_HOPS, HopCounter
from .policy import REPLY_RELAY_DENIED, classify_recipient, recipient_reply
from .relay import relay_mailbox
from .replies import REPLY_LINE_TOO_LONG as REPLY_LINE_TOO_LONG_DATA
from .replies import (
    REPLY_SHUTDOWN,
    REPLY_STORAGE,
    REPLY_TIMEOUT,
    REPLY_TOO_BIG,
    REPLY_TOO_MANY_CONNECTIONS,
    REPLY_TOO_MANY_RCPTS,
    refusal_reply,
)

log = logging.getLogger("elemta.smtp")

# 64 KiB reads: 0.3-0.5 MiB RSS growth for a 100 MiB message (256 KiB: 1.3 MiB) for ~15% more
# CPU per MiB (bench figures in the issue 2 note).
CHUNK = 64 * 1024
# Input buffered while a command waits (or the client does not read its replies) before the
# session stops reading it: two command lines' worth, so pipelined commands wait in the kernel.
INPUT_LIMIT = 2 * LINE_LIMIT
# During DATA the timeout restarts only after this much progress, so a client dripping a
# byte every few seconds is still cut after data_timeout (a minimum data rate, as Postfix's
# smtpd_min_data_rate), while a slow but real link keeps its session.
DATA_PROGRESS = 64 * 1024

# RFC 3463 codes for replies worded without one.
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
    # Who may receive mail ([delivery] recipients, aliases); SIGHUP re-reads its maps.
    recipients: Recipients = field(init=False)
    # Set when a queued transport is configured: messages for it go to the queue.
    queue: QueueIntake | None = None
    # Free space of the mail filesystems, sampled off the loop ([delivery] queue_minfree).
    disk: DiskWatch | None = None
    # Sessions between their 354 and their final reply (what the governor reserves buffers for).
    in_data: int = 0

    def __post_init__(self) -> None:
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


@dataclass(slots=True)
class Envelope:
    """One transaction: what MAIL and RCPT gave, until the message is taken or RSET."""

    mail_from: str | None = None
    mail_options: list[str] = field(default_factory=list)
    rcpt_tos: list[str] = field(default_factory=list)
    mailboxes: list[Mailbox] = field(default_factory=list)
    mail_dsn: MailDsn = field(default_factory=MailDsn)  # RET, ENVID
    rcpt_dsn: dict[str, RcptDsn] = field(default_factory=dict)  # mailbox -> its RCPT's NOTIFY, ORCPT


@dataclass(slots=True)
class _Receiving:
    """A message between its 354 and its final reply."""

    spool: Spool
    decoder: DataDecoder
    lf: bool  # Maildir files store LF line ends; queue files keep CRLF
    hops: HopCounter = field(default_factory=HopCounter)
    progress: int = 0
    write_failed: OSError | None = None
    over_budget: Refusal | None = None


def _bad_helo(name: str | None) -> bool:
    """Control characters in a HELO name are never a hostname; refuse rather than record them."""
    return bool(name) and any(c < "!" or c == "\x7f" for c in name or "")


def _header_text(value: str) -> str:
    """Client-supplied text made safe for a header: printable ASCII, no line breaks."""
    if value.isascii() and value.isprintable():  # the usual case, checked at C speed
        return value[:200]
    return "".join(c if " " <= c <= "~" else "?" for c in value)[:200]


# What a command gives: its reply, None (it replied itself, or says nothing), or the coroutine
# that will give the reply once what it waits for is there.
Outcome = str | Coroutine[Any, Any, str | None] | None
Command = Callable[["ElemtaSMTP", str | None], Outcome]


class ElemtaSMTP(asyncio.Protocol):
    """One SMTP session, driven by the transport's callbacks.

    Input is split into lines as it arrives and each command runs at once; its replies are
    collected and written in one send when the input at hand is used up (pipelining costs one
    write per batch). A command that has to wait makes the session busy: input is buffered
    meanwhile (reading stops beyond INPUT_LIMIT) and taken up again once it has replied.
    """

    # No __dict__: an idle session is this object, its transport and its socket.
    __slots__ = ("_bogus", "_busy", "_closed", "_deadline", "_eof", "_input", "_out",
                 "_read_paused", "_receiving", "_skipping", "_task", "_timer", "_write_paused",
                 "ctx", "envelope", "extended_smtp", "host_name", "loop", "peer",
                 "tls_active", "transport")

    def __init__(self, ctx: SmtpContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.host_name: str | None = None  # from HELO/EHLO
        self.extended_smtp = False
        self.tls_active = False
        self.envelope = Envelope()
        self._receiving: _Receiving | None = None
        self._input = bytearray()
        self._skipping = False  # inside an over-long command line: dropped until its end
        self._out: list[str] = []
        self._busy = False  # a command is waiting for something; input waits for it
        self._write_paused = False
        self._read_paused = False  # by _pace_reading (start_tls pauses the raw transport itself)
        self._closed = False
        self._eof = False  # the client has finished sending (it may still read our replies)
        self._bogus = 0
        self._task: asyncio.Task[None] | None = None
        self._deadline = 0.0  # loop time when the current command or DATA timeout expires
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_data(self) -> bool:
        """Between its 354 and its final reply (draining lets such a session finish)."""
        return self._receiving is not None

    # -- per-session memory ledger --------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """In-memory bytes this session holds: unread input, partial line, unsent replies."""
        held = len(self._input)
        receiving = self._receiving
        if receiving is not None:
            held += receiving.decoder.held + receiving.spool.buffered
        transport = self.transport
        if transport is not None and not transport.is_closing():
            held += transport.get_write_buffer_size()
        return held

    # -- connection lifecycle --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        ctx = self.ctx
        ctx.accepted += 1
        ctx.sessions.add(self)
        ctx.sessions_changed()
        if hasattr(transport, "max_size"):
            # asyncio's socket transport receives up to 256 KiB at a time: under a flood every
            # session in DATA held ~0.5 MiB. Reading what DATA consumes at once halves that.
            setattr(transport, "max_size", CHUNK)  # noqa: B010 - not in the typed API
        refusal = self._connection_refusal()
        if refusal is not None:
            ctx.observer.connection(refusal.split(" ", 2)[1])
            self.shutdown_now(refusal)
            return
        ctx.observer.connection("accepted")
        self._reply(f"220 {ctx.store.hostname} ESMTP elemta")
        self._flush()
        self._reset_timeout()

    def _connection_refusal(self) -> str | None:
        if self.ctx.draining:
            return REPLY_SHUTDOWN
        if self.ctx.open_sessions() > self.ctx.config.server.max_connections:
            return REPLY_TOO_MANY_CONNECTIONS
        refusal = self.ctx.admission.connection(len(self.ctx.sessions))
        return None if refusal is None else refusal_reply(refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.ctx.sessions.discard(self)
        self.ctx.sessions_changed()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._input.clear()
        self._end_data()
        if self._task is not None:
            # The waiting command ends (a commit under way has no task: it runs on, _stored logs it).
            self._task.cancel()

    def eof_received(self) -> bool | None:
        # A client that half-closes after its last command still hears every reply it is
        # owed (the transport stays open for writing); the session closes once they are sent.
        self._eof = True
        self._process()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True  # a client that does not read its replies: stop reading it

    def resume_writing(self) -> None:
        self._write_paused = False
        self._process()

    def shutdown_now(self, reply: str = REPLY_SHUTDOWN) -> None:
        """Tell the client why we are going away and close (draining, timeouts); once."""
        if not self._closed:
            self._reply(reply)
            self._close_after_replies()

    # -- timeouts -------------------------------------------------------------------------
    def _reset_timeout(self, duration: float | None = None) -> None:
        # Moving a deadline is cheaper than a new loop timer per command; the armed timer
        # re-arms itself if it fires before the deadline.
        self._deadline = self.loop.time() + (duration or self.ctx.config.server.command_timeout)
        timer = self._timer
        if timer is None or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        if self._deadline - self.loop.time() > 0.001:  # the loop may run a timer a tick early
            self._timer = self.loop.call_at(self._deadline, self._deadline_reached)
            return
        self._timer = None
        log.info("%s: timeout, closing", self._peer_text())
        self.shutdown_now(REPLY_TIMEOUT)

    def _peer_text(self) -> str:
        return str(self.peer[0]) if isinstance(self.peer, tuple) else str(self.peer or "?")

    # -- input ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._receiving is not None and not (self._input or self._busy or self._write_paused):
            self._feed_data(data)  # message data, taken as it comes: no copy through _input
        else:
            self._input += data
        self._process()

    def _process(self) -> None:
        """Run what the buffered input asks for, as far as it goes without waiting."""
        while not (self._busy or self._closed or self._write_paused):
            if self._receiving is not None:
                if not self._input:
                    break
                chunk = bytes(self._input)
                self._input.clear()
                self._feed_data(chunk)
                continue
            end = self._input.find(b"\n")
            if end < 0:
                if len(self._input) >= LINE_LIMIT:  # no line ending within reach: drop it
                    self._skipping = True
                    self._input.clear()
                break
            raw = bytes(self._input[:end + 1])
            del self._input[:end + 1]
            if self._skipping:
                self._skipping = False
                self._reply(REPLY_LINE_TOO_LONG)
                continue
            self._command(raw)
        self._flush()
        if self._eof and not (self._busy or self._closed):
            self._close_after_replies()  # nothing more will come: an unfinished message is dropped
        else:
            self._pace_reading()

    def _pace_reading(self) -> None:
        """Stop reading while the input cannot be taken up (a command waits, the client does
        not read its replies) and more than a read's worth is buffered; go on when it can."""
        transport = self.transport
        if transport is None or self._closed:
            return
        stalled = self._busy or self._write_paused
        if not self._read_paused and stalled and len(self._input) >= INPUT_LIMIT:
            self._read_paused = True
            transport.pause_reading()
        elif self._read_paused and not (stalled and len(self._input) >= INPUT_LIMIT):
            self._read_paused = False
            transport.resume_reading()

    def _command(self, raw: bytes) -> None:
        line = split_line(raw)
        if isinstance(line, str):
            self._reply(line)
            return
        if too_long(line, self.extended_smtp):
            self._reply(REPLY_LINE_TOO_LONG)
            return
        verb = line.verb
        if (self.ctx.config.tls.required and not self.tls_active
                and verb not in ALLOWED_BEFORE_STARTTLS):
            self._reply(REPLY_STARTTLS_FIRST)  # RFC 3207 4
            return
        handler = _COMMANDS.get(verb)
        if handler is None:
            log.warning("%s: unrecognised: %s", self._peer_text(), verb[:40])
            self._bogus += 1
            if self._bogus >= BOGUS_LIMIT:
                self._reply(REPLY_TOO_MANY_BOGUS)
                self._close_after_replies()
                return
            self._reply(f'500 Error: command "{verb}" not recognized')
            return
        self._reset_timeout()
        try:
            outcome = handler(self, line.arg)
        except Exception:  # a bug: 451 and a traceback in the log, and the session lives on
            outcome = self._internal_error()
        if isinstance(outcome, str):
            self._reply(outcome)
        elif outcome is not None:
            self._run(outcome)

    def _run(self, coro: Coroutine[Any, Any, str | None]) -> None:
        """Run a command that has to wait in a task; the session is busy until it replies."""
        self._busy = True
        self._task = self.loop.create_task(self._wait_for(coro))

    async def _wait_for(self, coro: Coroutine[Any, Any, str | None]) -> None:
        try:
            reply = await coro
        except asyncio.CancelledError:  # the connection is gone, or the loop is shutting down
            self._task = None
            self._end_data()
            raise
        except Exception:
            reply = self._internal_error()
        self._task = None
        self._busy = False
        if reply:
            self._reply(reply)
        self._process()

    def _internal_error(self) -> str:
        log.exception("%s: session error", self._peer_text())
        return "451 4.3.0 Error: local problem, try again later"

    # -- replies ---------------------------------------------------------------------------
    def _reply(self, status: str) -> None:
        status = self._with_enhanced_code(status)
        self.ctx.observer.reply(status)
        self._out.append(status)

    def _flush(self) -> None:
        if not self._out:
            return
        lines, self._out = self._out, []
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write("".join(f"{line}\r\n" for line in lines).encode("ascii", "replace"))

    def _close_after_replies(self) -> None:
        """Send the replies collected so far and close; a message in DATA is dropped."""
        self._flush()
        self._closed = True
        self._end_data()
        if self.transport is not None:
            self.transport.close()

    def _with_enhanced_code(self, status: str) -> str:
        if not self.extended_smtp:
            return status
        code, sep, text = status[:3], status[3:4], status[4:]
        enhanced = _ENHANCED.get(code)
        if enhanced is None or sep not in (" ", "-") or _HAS_ENHANCED.match(text):
            return status
        return f"{code}{sep}{enhanced} {text}"

    # -- commands --------------------------------------------------------------------------
    def smtp_HELO(self, arg: str | None) -> str | None:
        if not arg or _bad_helo(arg):
            return "501 5.5.4 Syntax: HELO hostname"
        self.envelope = Envelope()
        self.extended_smtp = False
        self.host_name = arg
        return f"250 {self.ctx.store.hostname}"

    def smtp_EHLO(self, arg: str | None) -> str | None:
        if not arg or _bad_helo(arg):
            return "501 5.5.4 Syntax: EHLO hostname"
        self.envelope = Envelope()
        self.host_name = arg
        lines = [self.ctx.store.hostname]
        size = self.ctx.config.server.max_message_size
        if size:
            lines.append(f"SIZE {size}")
        lines.append("8BITMIME")
        if self.ctx.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        lines += ["PIPELINING", "ENHANCEDSTATUSCODES", "DSN", "HELP"]
        # The EHLO reply itself carries no enhanced codes (RFC 2034 3): set after it.
        self.extended_smtp = False
        for line in lines[:-1]:
            self._reply(f"250-{line}")
        self._reply(f"250 {lines[-1]}")
        self.extended_smtp = True
        return None

    def smtp_NOOP(self, arg: str | None) -> str | None:
        return "250 OK"

    def smtp_RSET(self, arg: str | None) -> str | None:
        if arg:
            return "501 Syntax: RSET"
        self.envelope = Envelope()
        return "250 OK"

    def smtp_QUIT(self, arg: str | None) -> str | None:
        if arg:
            return "501 Syntax: QUIT"
        self._reply("221 Bye")
        self._close_after_replies()
        return None

    def smtp_VRFY(self, arg: str | None) -> str | None:
        if not arg:
            return "501 Syntax: VRFY <address>"
        return "252 Cannot VRFY user, but will accept message and attempt delivery"

    def smtp_EXPN(self, arg: str | None) -> str | None:
        return "502 EXPN not implemented"

    def smtp_HELP(self, arg: str | None) -> str | None:
        return help_reply(arg, self.extended_smtp, self.ctx.tls is not None)

    def smtp_AUTH(self, arg: str | None) -> str | None:
        # EHLO offers no AUTH: elemta is an inbound MX.
        return "502 Command not implemented"

    def smtp_STARTTLS(self, arg: str | None) -> Outcome:
        if arg:
            return "501 Syntax: STARTTLS"
        if self.ctx.tls is None:
            return "454 TLS not available"
        if self.tls_active:
            return "503 Error: TLS already active"
        return self._starttls(self.ctx.tls)

    async def _starttls(self, context: ssl.SSLContext) -> str | None:
        self._reply("220 Ready to start TLS")
        self._flush()
        # RFC 3207 5: what the client pipelined after STARTTLS came in clear; it is dropped.
        self._input.clear()
        transport = self.transport
        assert transport is not None
        try:
            tls = await self.loop.start_tls(transport, self, context, server_side=True)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            # A client's failed handshake (a protocol or cipher we refuse, or garbage) is bad
            # input, not our fault: one line, and the connection is closed.
            log.info("%s: STARTTLS handshake failed: %s", self._peer_text(), exc)
            self._closed = True
            transport.close()
            return None
        if tls is None:
            return None
        self.transport = tls
        self.tls_active = True
        # RFC 3207 4.2: the client starts over (EHLO), nothing said before counts.
        self.host_name = None
        self.extended_smtp = False
        self.envelope = Envelope()
        return None

    def smtp_MAIL(self, arg: str | None) -> Outcome:
        if not self.host_name:
            return REPLY_SEND_HELO
        if self.envelope.mail_from:  # before the argument is even looked at, as Postfix
            return REPLY_NESTED_MAIL
        extended = self.extended_smtp
        mail_dsn = MailDsn()
        if arg and extended:
            split = split_mail(arg)
            if isinstance(split, str):
                return split
            arg, mail_dsn = split
        parsed = parse_mail_rcpt("FROM:", arg, extended)
        if isinstance(parsed, str):
            return parsed
        address, options, params = parsed
        refused = check_mail_params(params, self.ctx.config.server.max_message_size,
                                    syntax_error("MAIL", extended))
        if refused is not None:
            return refused
        refusal = self.ctx.admission.command("MAIL", self.held_bytes)
        if refusal is not None:
            return refusal_reply(refusal)
        if self.ctx.disk is not None:
            no_space = self.ctx.disk.refusal(self.ctx.config.delivery.queue_minfree,
                                             declared_size(options))
            if no_space is not None:
                return no_space
        if any(c < " " or c == "\x7f" for c in address):
            return "553 5.1.7 Bad sender address syntax"
        envelope = self.envelope
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.mail_dsn = mail_dsn
        return "250 2.1.0 Sender ok"

    def smtp_RCPT(self, arg: str | None) -> Outcome:
        if not self.host_name:
            return REPLY_SEND_HELO
        if not self.envelope.mail_from:
            return REPLY_NEED_MAIL
        extended = self.extended_smtp
        rcpt_dsn = RcptDsn()
        if arg and extended:
            split = split_rcpt(arg)
            if isinstance(split, str):
                return split
            arg, rcpt_dsn = split
        parsed = parse_mail_rcpt("TO:", arg, extended)
        if isinstance(parsed, str):
            return parsed
        address, _, params = parsed
        if params:
            return "555 RCPT TO parameters not recognized or not implemented"
        refusal = self.ctx.admission.command("RCPT", self.held_bytes)
        if refusal is not None:
            return refusal_reply(refusal)
        if len(self.envelope.rcpt_tos) >= self.ctx.config.server.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        recipients, delivery = self.ctx.recipients, self.ctx.config.delivery
        box = classify_recipient(address, delivery.domains)
        if box == REPLY_RELAY_DENIED and self.ctx.queue is not None:  # relayed via the queue
            relayed = relay_mailbox(address, delivery.relay_domains)
            if isinstance(relayed, str):
                return relayed
            if relayed is not None:
                taken = recipients.resolve_relay_now(relayed)
                if taken is None:  # the next hop is asked
                    return self._recipient(address, relayed, rcpt_dsn, recipients.resolve_relay)
                return self._add_recipient(address, relayed, taken, rcpt_dsn)
        if isinstance(box, str):
            return box
        targets = recipients.resolve_now(box)
        if targets is None:  # a lookup (the Maildir, an LMTP probe)
            return self._recipient(address, box, rcpt_dsn, recipients.resolve)
        return self._add_recipient(address, box, targets, rcpt_dsn)

    async def _recipient(
        self, address: str, box: Mailbox, rcpt_dsn: RcptDsn,
        lookup: Callable[[Mailbox], Awaitable[tuple[Mailbox, ...] | RecipientRefusal]],
    ) -> str:
        return self._add_recipient(address, box, await lookup(box), rcpt_dsn)

    def _add_recipient(self, address: str, box: Mailbox,
                       targets: tuple[Mailbox, ...] | RecipientRefusal, rcpt_dsn: RcptDsn) -> str:
        if isinstance(targets, RecipientRefusal):
            return recipient_reply(targets, box)
        envelope = self.envelope
        envelope.rcpt_tos.append(address)
        for target in targets:  # an alias and its target named both: one copy
            if target not in envelope.mailboxes:
                envelope.mailboxes.append(target)
            envelope.rcpt_dsn.setdefault(str(target), rcpt_dsn)
        return "250 2.1.5 Recipient ok"

    # -- DATA, streamed --------------------------------------------------------------------
    def smtp_DATA(self, arg: str | None) -> Outcome:
        if not self.host_name:
            return REPLY_SEND_HELO
        if arg:
            return "501 5.5.4 Syntax: DATA"
        if not self.envelope.rcpt_tos:
            return REPLY_NEED_RCPT
        refusal = self.ctx.admission.enter_data(self.ctx.sessions_in_data())
        if refusal is not None:
            return refusal_reply(refusal)
        envelope = self.envelope
        qid = new_queue_id()
        queue = self.ctx.queue
        routes = queue.routes(envelope.mailboxes, self.ctx.config.delivery) if queue else None
        if queue is not None and routes is not None:
            sender = envelope.mail_from if envelope.mail_from not in (None, "<>") else ""
            try:
                # SMTPUTF8 is not offered: the record's smtputf8 flag stays at its default.
                spool = queue.open(routes, sender, self._trace_headers(envelope, qid, True), qid,
                                   eight_bit="BODY=8BITMIME" in envelope.mail_options,
                                   mail_dsn=envelope.mail_dsn, rcpt_dsn=envelope.rcpt_dsn)
            except OSError as exc:
                return self._cannot_prepare(exc)
            return self._start_data(spool, lf=False)
        header = self._trace_headers(envelope, qid)
        ready = self.ctx.store.open_now(envelope.mailboxes, header, qid)
        if ready is None:  # a mailbox this process has not used yet: made on a commit thread
            return self._open_mailboxes(envelope, header, qid)
        return self._start_data(ready, lf=True)

    async def _open_mailboxes(self, envelope: Envelope, header: bytes, qid: str) -> str | None:
        try:
            spool = await self.ctx.store.open(envelope.mailboxes, header, qid)
        except OSError as exc:
            return self._cannot_prepare(exc)
        return self._start_data(spool, lf=True)

    @staticmethod
    def _cannot_prepare(exc: OSError) -> str:
        log.warning("cannot prepare the mailboxes: %s", exc.strerror or exc)
        return REPLY_STORAGE

    def _start_data(self, spool: Spool, lf: bool) -> str | None:
        if self._closed:  # the client left while the mailboxes were made
            spool.discard()
            return None
        self.ctx.data_changed(+1)
        self._receiving = _Receiving(spool, DataDecoder(self.ctx.config.server.max_message_size),
                                     lf=lf)
        self._reset_timeout(self.ctx.config.server.data_timeout)
        return "354 End data with <CR><LF>.<CR><LF>"

    def _feed_data(self, chunk: bytes) -> None:
        """Take `chunk` as message data (up to the final dot, if it is there)."""
        receiving = self._receiving
        assert receiving is not None
        receiving.progress += len(chunk)
        if receiving.progress >= DATA_PROGRESS:
            receiving.progress = 0
            self._reset_timeout(self.ctx.config.server.data_timeout)
        out, rest = receiving.decoder.feed(chunk)
        if not receiving.hops.done:
            receiving.hops.feed(out)
        full = False
        if out and receiving.write_failed is None and receiving.over_budget is None:
            # Maildir files use the local newline convention, as Postfix and Dovecot's LDA
            # write them; queued messages keep CRLF (the transports send them as they are).
            full = receiving.spool.buffer(to_lf(out) if receiving.lf else out)
        if receiving.over_budget is None:
            receiving.over_budget = self.ctx.admission.data(self.held_bytes)
        if rest is not None:
            # Pipelined commands after the final dot are the next commands.
            self._input[:0] = rest
            self._final_dot(receiving)
        elif full:
            # A full buffer is written out on a commit thread; the client is not read meanwhile.
            self._busy = True
            receiving.spool.flush_then(lambda error: self._written(receiving, error))

    def _written(self, receiving: _Receiving, error: OSError | None) -> None:
        if error is not None:
            receiving.write_failed = error
        if self._receiving is receiving:  # else the message is over (its client gone)
            self._busy = False
            self._process()

    def _final_dot(self, receiving: _Receiving) -> None:
        """The message is complete: refuse it, or commit it and reply once it is stored."""
        spool, envelope = receiving.spool, self.envelope
        self._reset_timeout()
        refused = self._refusal(receiving, envelope)
        if refused is not None:
            self._end_data()
            self._run(self._refused(spool, refused))
            return
        # No task: the commit's outcome calls back (a session that has gone by then still
        # gets its message logged, as stored without a 250 heard).
        self._busy = True
        spool.start_commit().add_done_callback(
            lambda stored: self._stored(spool, envelope, stored, queued=not receiving.lf))

    def _refusal(self, receiving: _Receiving, envelope: Envelope) -> str | None:
        """The reply refusing a complete message, or None to store it."""
        spool, decoder = receiving.spool, receiving.decoder
        if decoder.state is DataState.TOO_LONG:
            return REPLY_LINE_TOO_LONG_DATA
        if decoder.state is DataState.TOO_MUCH:
            return REPLY_TOO_BIG
        if receiving.over_budget is not None:
            return refusal_reply(receiving.over_budget, in_data=True)
        if receiving.hops.too_many:
            log.info("queue %s: refused, %d Received: headers (a mail loop?) from=<%s>",
                     spool.queue_id, receiving.hops.hops, envelope.mail_from)
            return REPLY_TOO_MANY_HOPS
        if receiving.write_failed is not None:
            log.warning("queue %s: write failed: %s", spool.queue_id,
                        receiving.write_failed.strerror)
            return REPLY_STORAGE
        return None

    async def _refused(self, spool: Spool, status: str) -> str | None:
        await spool.discarded()  # a refused message's file is gone before the reply says so
        return self._message_over(status, queued=False)

    def _stored(self, spool: Spool, envelope: Envelope, stored: asyncio.Future[None],
                queued: bool) -> None:
        error = None if stored.cancelled() else stored.exception()
        self._end_data()
        self._log_commit(spool, envelope, error, replied=not self._closed)
        if self._closed:
            return
        self._busy = False
        ok = error is None
        reply = self._message_over(
            f"250 2.0.0 Ok: queued as {spool.queue_id}" if ok else REPLY_STORAGE, ok and queued)
        if reply is not None:
            self._reply(reply)
        self._process()

    def _message_over(self, status: str, queued: bool) -> str | None:
        """The reply ending a message's transaction (None: sent already, going away)."""
        self.envelope = Envelope()
        if queued and self.ctx.queue is not None:
            self.ctx.queue.wake()
        if self.ctx.draining:
            self._reply(status)
            self.shutdown_now()
            return None
        return status

    def _end_data(self) -> None:
        """The message in DATA is over (stored, refused, or its client gone): once."""
        receiving, self._receiving = self._receiving, None
        if receiving is None:
            return
        receiving.spool.discard()  # nothing left to do once committed (or committing)
        self.ctx.data_changed(-1)

    def _log_commit(self, spool: Spool, envelope: Envelope, error: BaseException | None,
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

    def _trace_headers(self, envelope: Envelope, qid: str, queued: bool = False) -> bytes:
        ip = self._peer_text()
        proto = "ESMTP" if self.extended_smtp else "SMTP"
        if self.tls_active:
            proto += "S"
        sender = envelope.mail_from if envelope.mail_from not in (None, "<>") else ""
        for_clause = f"\n\tfor <{envelope.mailboxes[0]}>" if len(envelope.mailboxes) == 1 else ""
        received = (
            f"Received: from {_header_text(self.host_name or 'unknown')} ([{ip}])\n"
            f"\tby {_header_text(self.ctx.store.hostname)} (elemta {__version__}) with {proto}"
            f" id {qid}{for_clause};\n\t{_RECEIVED_DATE.text(time.time())}\n"
        )
        if queued:  # the final delivery adds Return-Path (RFC 5321 4.4), from the envelope
            return received.replace("\n", "\r\n").encode("ascii")
        return f"Return-Path: <{_header_text(sender)}>\n{received}".encode("ascii")


_COMMANDS: dict[str, Command] = {
    name[5:]: method for name, method in vars(ElemtaSMTP).items() if name.startswith("smtp_")
}


def session_factory(ctx: SmtpContext) -> Callable[[], Any]:
    return lambda: ElemtaSMTP(ctx)
