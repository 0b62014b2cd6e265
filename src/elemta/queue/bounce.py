"""Bounces: when a queued message ends with failed recipients, its sender gets one DSN (dsn.py)
listing them, queued like any other message with the null sender <>. Blocking: `Bouncer` is
called on the queue's executor thread, before the message's record moves to failed/; its
`warn` likewise, before the record of a message whose delay notice is due (delay_warning_time)
is written back to deferred/. [delivery] notify_postmaster sends postmaster@ the first of
[delivery] domains a copy of each bounce ("bounce") or delay notice ("delay"), headers only.

Where the DSN goes is decided by the same routing as incoming mail: a sender of one of our
domains gets it through that domain's transport (the Maildir, or LMTP), a sender of a relay
domain through the relay; any other sender has no route here (elemta does no MX lookup), so
the DSN waits in hold/ where `elemta queue` shows it. A message from <> is never bounced
(RFC 5321 6.1: no bounce of a bounce), only logged; it stays in failed/.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..delivery.dsnparams import wants_delay_notice, wants_failure_notice
from ..recipients import POSTMASTER
from ..store.maildir import fsync_dir, new_queue_id
from . import dsn, policy, routing
from .store import Meta, QueueStore, Recipient, place_body

log = logging.getLogger("elemta.queue")

HEADER_LIMIT = 256 * 1024  # of the original header section returned (RFC 3462 allows cutting)
NO_ROUTE = ("451 4.3.0 no route for a bounce to this domain (neither in [delivery] domains "
            "nor relay_domains): held")


def read_headers(path: os.PathLike[str] | str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of a queued body file (CRLF lines up to the empty line), at most
    `limit` bytes (cut at a line end); read in 64 KiB pieces, never the whole body."""
    out = bytearray()
    with open(path, "rb") as f:
        while len(out) < limit + 2:
            chunk = f.read(64 * 1024)
            if not chunk:
                break
            out += chunk
            end = out.find(b"\r\n\r\n")
            if end >= 0 or out.startswith(b"\r\n"):
                return bytes(out[:end + 2]) if end >= 0 else b""
    cut = out.rfind(b"\r\n", 0, limit)
    return bytes(out[:cut + 2]) if cut >= 0 else b""


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def route_of(address: str, config: Config) -> str | None:
    """The transport spec of a bounce to `address`, None when none takes it."""
    d = config.delivery
    domain = address.rpartition("@")[2].lower().rstrip(".")
    if domain in d.domains or domain in d.relay_domains:
        return routing.transport_for(domain, d.transport, d.all_routes())
    return None


@dataclass
class Bouncer:
    store: QueueStore
    config: Callable[[], Config]  # the current one (a reload changes routing)
    hostname: str  # Reporting-MTA, the DSN's From: domain
    clock: Callable[[], float] = time.time

    def __call__(self, meta: Meta) -> str | None:
        """Queue the DSN for `meta`'s failed recipients; its queue id, or None when none is
        sent (null sender, nothing failed). Raises OSError (the caller retries)."""
        failed = [r for r in meta.recipients if r.state == policy.FAILED]
        if not failed:
            return None
        failed = [r for r in failed if wants_failure_notice(r.notify)]
        if not failed:
            log.info("%s: failed recipients asked for no failure notice (NOTIFY): not bounced",
                     meta.id)
            return None
        if not meta.sender:
            log.info("%s: from=<>, %d recipient(s) failed: not bounced (a bounce is never "
                     "bounced); kept in failed/", meta.id, len(failed))
            return None
        # A failed recipient whose last reply is not a 5xx was failed by maximal_queue_lifetime.
        return self._notify(meta, "bounce", [
            dsn.Failure(r.address, r.reply, r.relay, expired=not r.reply.startswith("5"),
                        orcpt=r.orcpt) for r in failed])

    def warn(self, meta: Meta) -> str | None:
        """Queue the delay notice for `meta`'s pending recipients (policy.delay_warning_due
        said it is due); its queue id, or None when none is sent (null sender, no pending
        recipient wants one). Raises OSError."""
        pending = meta.pending()
        if not pending:
            return None
        if not meta.sender:
            log.info("%s: from=<>: no delay notification (a bounce is never bounced)", meta.id)
            return None
        wanted = [r for r in pending if wants_delay_notice(r.notify)]
        if not wanted:
            log.info("%s: pending recipients asked for no delay notice (NOTIFY): not warned",
                     meta.id)
            return None
        return self._notify(meta, "delay", [
            dsn.Failure(r.address, r.reply, r.relay, orcpt=r.orcpt, delayed=True)
            for r in wanted])

    def _notify(self, meta: Meta, kind: str, entries: list[dsn.Failure]) -> str:
        """Queue the sender's notice (and first the postmaster's copy, when notify_postmaster
        names `kind`: "bounce" or "delay"); the sender's notice's queue id."""
        now = self.clock()
        d = self.config().delivery
        until = meta.created + d.maximal_queue_lifetime if kind == "delay" else None
        what = "non-delivery" if kind == "bounce" else "delay"
        if kind in d.notify_postmaster:
            # Only the report and the original's headers: the body is the sender's business.
            qid, held = self._queue(meta, entries, now, until, full=False,
                                    copy_to=f"{POSTMASTER}@{d.domains[0]}")
            log.info("%s: postmaster %s notification: %s%s", meta.id, what, qid,
                     " (held: no route)" if held else "")
        # RET is about failure notices (RFC 3461 4.3): a delay notice returns the headers.
        qid, held = self._queue(meta, entries, now, until, full=meta.ret == "FULL" and
                                until is None)
        log.info("%s: sender %s notification: %s%s", meta.id, what, qid,
                 f" (held: no route to <{meta.sender}>)" if held else "")
        return qid

    def _queue(self, meta: Meta, entries: list[dsn.Failure], now: float,
               until: float | None, full: bool, copy_to: str = "") -> tuple[str, bool]:
        """Queue one notice about `meta` from <> to its sender (or `copy_to`): (its queue id,
        whether it waits in hold/ for want of a route)."""
        qid = new_queue_id()
        head, tail = dsn.build(queue_id=meta.id, sender=meta.sender,
                               reporting_mta=self.hostname, arrival=meta.created, now=now,
                               failures=entries, message_id=f"{qid}.{int(now)}@{self.hostname}",
                               full=full, envid=meta.envid, retry_until=until,
                               copy_to=copy_to)
        to = copy_to or meta.sender
        config = self.config()
        spec = route_of(to, config)
        local, _, domain = to.rpartition("@")
        if domain.lower().rstrip(".") in config.delivery.domains:
            to = f"{local.lower()}@{domain.lower().rstrip('.')}"  # our mailboxes are lower case
        rcpt = Recipient(to, spec or "")
        state = "incoming"
        if spec is None:
            rcpt.reply, state = NO_ROUTE, "hold"
        notice = Meta(qid, "", now, 0, [rcpt])
        original = self.store.body(meta.id)
        self._enqueue(notice, head, b"" if full else read_headers(original),
                      original if full else None, tail, state)
        return qid, spec is None

    def _enqueue(self, meta: Meta, head: bytes, headers: bytes, full: Path | None, tail: bytes,
                 state: str) -> None:
        """Body (head, the original's headers or the whole original copied in 64 KiB pieces,
        tail) fdatasync'ed and renamed into body/, then the record: as QueueFile.commit."""
        tmp = self.store.path("tmp", f"{meta.id}.{os.getpid()}.body")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write(fd, head)
            if full is not None:
                with open(full, "rb") as src:
                    last = b"\r\n"
                    while chunk := src.read(64 * 1024):
                        _write(fd, chunk)
                        last = chunk[-2:]
                    if last != b"\r\n":
                        _write(fd, b"\r\n")
            else:
                _write(fd, headers)
            _write(fd, tail)
            meta.size = os.fstat(fd).st_size
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        dest = self.store.body(meta.id)
        try:
            place_body(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(dest.parent)
        try:
            self.store.write(meta, state)
        except BaseException:
            os.unlink(dest)
            raise
