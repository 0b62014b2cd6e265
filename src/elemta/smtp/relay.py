"""Which RCPT addresses we take for relaying: those of [delivery] relay_domains, and no other.

A pure decision. Never an open relay: an address is relayed only when its domain is listed,
whoever the client is (elemta has no AUTH and no trusted networks on the SMTP side).
"""

from __future__ import annotations

from collections.abc import Collection

from ..recipients import LOCALPART
from ..store.maildir import Mailbox
from .policy import REPLY_BAD_MAILBOX


def relay_mailbox(address: str, relay_domains: Collection[str]) -> Mailbox | str | None:
    """The address to relay to when its domain is a relay domain, or the reply refusing its
    local part (only a plain dot-atom is relayed); None when the domain is not a relay domain
    (the caller's refusal stands). The local part keeps its case: it is the next hop's to
    interpret (RFC 5321 2.4); only the domain is folded."""
    if not relay_domains:
        return None
    localpart, at, domain = address.rpartition("@")
    domain = domain.lower().rstrip(".")
    if not at or domain not in relay_domains:
        return None
    if not localpart or len(localpart) > 64 or not LOCALPART.fullmatch(localpart.lower()):
        return REPLY_BAD_MAILBOX
    return Mailbox(domain, localpart)
