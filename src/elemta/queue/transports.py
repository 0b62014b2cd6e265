"""Transport objects for the specs of [delivery] transport and routes."""

from __future__ import annotations

from ..delivery.base import Transport
from ..delivery.lmtp import LmtpTransport
from ..store.maildir import Maildir
from .local import MaildirAgent
from .routing import MAILDIR


def build(spec: str, maildir: Maildir, max_connections: int) -> Transport:
    """The transport for `spec`: the queue's maildir agent or an LMTP client whose connection
    pool matches the per-destination concurrency."""
    if spec == MAILDIR:
        return MaildirAgent(maildir)
    return LmtpTransport(spec, max_connections=max_connections, executor=maildir.executor,
                         lhlo_name=maildir.hostname)
