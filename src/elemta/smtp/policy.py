"""Which recipients we accept, and the exact reply for those we do not. Pure functions."""

from __future__ import annotations

import re
from collections.abc import Collection

from ..store.maildir import Mailbox

# RFC 5322 atext plus dots between atoms; anything else (quotes, slashes, NUL, non-ASCII)
# could not name a Maildir safely, so it is refused rather than mangled.
_LOCALPART = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*")

REPLY_RELAY_DENIED = "550 5.7.1 Relaying denied: we do not accept mail for that domain"
REPLY_BAD_MAILBOX = "553 5.1.3 Bad recipient address syntax"


def classify_recipient(address: str, domains: Collection[str]) -> Mailbox | str:
    """The Mailbox for an accepted recipient, or the SMTP reply refusing it."""
    if address.lower() == "postmaster" and domains:
        # RFC 5321 4.5.1: "RCPT TO:<Postmaster>" without a domain must be accepted.
        return Mailbox(next(iter(domains)), "postmaster")
    localpart, at, domain = address.rpartition("@")
    if not at or not localpart or not domain:
        return REPLY_BAD_MAILBOX
    domain = domain.lower().rstrip(".")
    if domain not in domains:
        return REPLY_RELAY_DENIED
    localpart = localpart.lower()
    if len(localpart) > 64 or not _LOCALPART.fullmatch(localpart):
        return REPLY_BAD_MAILBOX
    return Mailbox(domain, localpart)
