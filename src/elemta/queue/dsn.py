"""Delivery status notifications (RFC 3464): the bounce message, built by a pure function.

One DSN per message, listing its failed recipients: a multipart/report (RFC 6522) with a
human-readable part, a message/delivery-status part (per-message fields, Original-Envelope-Id
when the client gave ENVID, then per recipient Original-Recipient when it gave ORCPT,
Final-Recipient, Action, Status, Remote-MTA when a server answered, Diagnostic-Code,
Last-Attempt-Date) and the original message: its header section as text/rfc822-headers
(RET=HDRS, the default) or the whole of it as message/rfc822 (RET=FULL). `build` returns what
goes before and after the original, which the caller streams in between. CRLF line ends.
A delay notice is the same report for the recipients still pending (Action: delayed, a 4.x.x
Status, Will-Retry-Until); a postmaster's copy (`copy_to`) is one addressed to the postmaster.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..delivery.dsnparams import xtext_decode

EXPIRED_STATUS = "5.4.7"  # RFC 3463: delivery time expired
LINE_LIMIT = 900  # a Diagnostic-Code is cut here: a line must stay below 998 octets
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True)
class Failure:
    recipient: str
    reply: str  # the last reply as recorded: "550 5.1.1 <a@b>: User unknown"
    relay: str  # who answered: "hub.test[10.0.0.5]:25", or where we tried: "10.0.0.5:25"
    expired: bool = False  # still deferred at maximal_queue_lifetime
    orcpt: str = ""  # the client's ORCPT= ("rfc822;" xtext), "" when not given
    delayed: bool = False  # still pending: reported in a delay notice, not failed


def _clean(text: str) -> str:
    """One header-safe line: printable ASCII only (the report is 7bit), bounded."""
    out = "".join(c if " " <= c <= "~" else "?" for c in text)
    return out if len(out) <= LINE_LIMIT else out[:LINE_LIMIT] + "..."


def status_of(f: Failure) -> str:
    """The RFC 3463 status: the reply's enhanced code if it has one of the right class (5.x.x
    for a failure, 4.x.x for a delay), 5.4.7 when the recipient expired in the queue, else
    5.0.0 (4.0.0)."""
    if f.expired:
        return EXPIRED_STATUS
    cls = "4" if f.delayed else "5"
    parts = f.reply.split(" ", 2)
    if len(parts) > 1 and _ENHANCED.match(parts[1]) and parts[1][0] == cls:
        return parts[1]
    return f"{cls}.0.0"


def remote_mta(relay: str) -> str | None:
    """The name of the server that answered ("name[address]:port"), None when none did (a
    connection that failed, a local delivery)."""
    name, bracket, _ = relay.partition("[")
    return name if bracket and name else None


def diagnostic(f: Failure) -> str:
    if f.expired:
        return _clean(f"X-Elemta; delivery time expired, last reply: {f.reply or 'none'}")
    return _clean(f"smtp; {f.reply}")


def _human(f: Failure) -> str:
    where = remote_mta(f.relay)
    said = f"host {f.relay} said: {f.reply}" if where else f.reply
    if f.expired:
        said = f"delivery time expired; last attempt: {f.reply}"
    return _clean(f"<{f.recipient}>: {said}")


def _explanation(reporting_mta: str, retry_until: float | None) -> list[str]:
    if retry_until is None:
        return [f"This is the mail system at host {reporting_mta}.",
                "",
                "I'm sorry to have to inform you that your message could not",
                "be delivered to one or more recipients. It's attached below."]
    return [f"This is the mail system at host {reporting_mta}.",
            "",
            "This is a warning only: you do not need to send your message again.",
            "It has not yet been delivered to the recipients below; delivery",
            f"will be tried until {email.utils.formatdate(retry_until)}.",
            "Its header section is attached below."]


def build(*, queue_id: str, sender: str, reporting_mta: str, arrival: float, now: float,
          failures: Sequence[Failure], message_id: str, full: bool = False,
          envid: str = "", retry_until: float | None = None,
          copy_to: str = "") -> tuple[bytes, bytes]:
    """(head, tail) of the DSN sent to `sender` for `failures`: the original goes between,
    CRLF lines ending with CRLF (the header section without its empty line, or with `full`
    the whole message). With `retry_until` it is a delay notice (the failures are `delayed`
    ones, pending until then); with `copy_to` the postmaster's copy, addressed there."""
    boundary = f"{queue_id}.{int(now)}/{reporting_mta}"
    date = email.utils.formatdate(now)
    subject = ("Mail delivery delayed (still being retried)" if retry_until is not None
               else "Undelivered Mail Returned to Sender")
    copy = [f"Postmaster copy of the notice sent to <{_clean(sender)}> about message "
            f"{queue_id}.", ""] if copy_to else []
    lines = [
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)",
        f"To: <{_clean(copy_to or sender)}>",
        f"Subject: {'Postmaster Copy: ' if copy_to else ''}{subject}",
        f"Date: {date}",
        f"Message-ID: <{message_id}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *copy,
        *_explanation(reporting_mta, retry_until),
        "",
        *(_human(f) for f in failures),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        *([f"Original-Envelope-Id: {_clean(xtext_decode(envid))}"] if envid else []),
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Elemta-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival)}",
    ]
    for f in failures:
        lines.append("")
        if f.orcpt:
            kind, _, addr = f.orcpt.partition(";")
            lines.append(f"Original-Recipient: {_clean(kind)}; {_clean(xtext_decode(addr))}")
        lines += [f"Final-Recipient: rfc822; {_clean(f.recipient)}",
                  f"Action: {'delayed' if f.delayed else 'failed'}", f"Status: {status_of(f)}"]
        mta = remote_mta(f.relay)
        if mta:
            lines.append(f"Remote-MTA: dns; {_clean(mta)}")
        lines += [f"Diagnostic-Code: {diagnostic(f)}", f"Last-Attempt-Date: {date}"]
        if retry_until is not None:
            lines.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until)}")
    lines += ["", f"--{boundary}"]
    what = "Delayed" if retry_until is not None else "Undelivered"
    lines += ([f"Content-Description: {what} Message", "Content-Type: message/rfc822"]
              if full else [f"Content-Description: {what} Message Headers",
                            "Content-Type: text/rfc822-headers"])
    head = "\r\n".join([*lines, ""]).encode("ascii") + b"\r\n"
    return head, f"\r\n--{boundary}--\r\n".encode("ascii")
