"""Transport objects for the specs of [delivery] transport and routes."""

from __future__ import annotations

import importlib

from ..delivery.base import Transport
from ..store.maildir import Maildir
from .local import MaildirAgent, Unavailable
from .routing import MAILDIR


def build(spec: str, maildir: Maildir) -> Transport:
    """The transport for `spec`: the queue's maildir agent, or the LMTP client of
    elemta.delivery (parse_transport), which is the one place that turns a spec into it."""
    if spec == MAILDIR:
        return MaildirAgent(maildir)
    for name in ("elemta.delivery", "elemta.delivery.lmtp"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parse = getattr(module, "parse_transport", None)
        if callable(parse):
            transport: Transport = parse(spec)
            return transport
    return Unavailable(spec, "this build has no LMTP client")
