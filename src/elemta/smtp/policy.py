"""The exact reply for each recipient we refuse. Pure functions; the decisions are in recipients.py."""

from __future__ import annotations

from collections.abc import Collection

from ..recipients import RecipientRefusal, parse_mailbox
from ..store.maildir import Mailbox

REPLY_RELAY_DENIED = "550 5.7.1 Relaying denied: we do not accept mail for that domain"
REPLY_BAD_MAILBOX = "553 5.1.3 Bad recipient address syntax"


def recipient_reply(refusal: RecipientRefusal, box: Mailbox | None = None) -> str:
    if refusal is RecipientRefusal.FOREIGN_DOMAIN:
        return REPLY_RELAY_DENIED
    if refusal is RecipientRefusal.UNKNOWN_USER:
        # Postfix's wording; the address is ours and checked (atext only), safe to echo.
        return f"550 5.1.1 <{box}>: Recipient address rejected: User unknown"
    if refusal is RecipientRefusal.LOOKUP_FAILED:
        # RFC 3463 X.4.3 "directory server failure": we could not ask, the address may be fine.
        return f"451 4.4.3 <{box}>: Recipient address lookup failed, try again later"
    return REPLY_BAD_MAILBOX


def classify_recipient(address: str, domains: Collection[str]) -> Mailbox | str:
    """The Mailbox an RCPT address names, or the SMTP reply refusing its syntax or domain."""
    box = parse_mailbox(address, domains)
    return recipient_reply(box) if isinstance(box, RecipientRefusal) else box
