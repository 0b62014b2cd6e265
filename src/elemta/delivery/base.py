"""What every delivery transport promises the queue: per-recipient results, never an exception
for the remote side's failures.

The queue hands a transport one message (envelope plus the path of its body file) and gets one
RecipientResult per recipient, in order. 2xx: delivered; 4xx: retry later; 5xx: failed. A
connection refused, a timeout or a protocol error mid-way is a 4xx result for every recipient
whose outcome is unknown, with the reason in the text (the queue defers them); an exception
escaping `deliver` is a bug.

Body files hold the message as the queue stores it: CRLF line endings, not dot-stuffed, the
trace headers already at the top; a transport streams it (stuffing on the fly), never reads it
whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Reply:
    code: int  # 250, 451, 550, ...
    text: str  # the rest of the (last) reply line, enhanced status code included if sent

    @property
    def kind(self) -> str:
        """"delivered", "deferred" or "failed": how the queue treats it."""
        return "delivered" if 200 <= self.code < 300 else "failed" if self.code >= 500 else "deferred"

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    reply: Reply
    relay: str  # who answered, as Postfix logs it: "lmtp.test[127.0.0.1]:24" / "/run/dovecot/lmtp"


@dataclass(frozen=True)
class Envelope:
    queue_id: str
    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    body: Path
    size: int  # bytes of the body file
    eight_bit: bool = False  # received with BODY=8BITMIME: sent on with it where offered
    smtputf8: bool = False  # received with SMTPUTF8: sent on with it where offered
    # The DSN parameters (RFC 3461) the client gave, sent on to a server that offers DSN:
    ret: str = ""  # MAIL RET=
    envid: str = ""  # MAIL ENVID=
    notify: tuple[str, ...] = ()  # RCPT NOTIFY= per recipient ("" where not given); () none
    orcpt: tuple[str, ...] = ()  # RCPT ORCPT= per recipient, likewise
    crlf: bool = False  # the body is known to hold no bare LF (store.Meta.crlf)


class Transport(Protocol):
    name: str  # "lmtp", later "smtp": the label of elemta_deliveries_total{transport}

    async def deliver(self, envelope: Envelope) -> Sequence[RecipientResult]: ...

    async def close(self) -> None: ...
