"""Transport objects for the specs of [delivery] transport and routes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..delivery.base import Transport
from ..delivery.lmtp import LmtpTransport
from ..store.maildir import Maildir
from .local import MaildirAgent
from .manager import DeliveryObserver, Manager
from .routing import MAILDIR
from .store import QueueStore


def build(spec: str, maildir: Maildir, max_connections: int) -> Transport:
    """The transport for `spec`: the queue's maildir agent or an LMTP client whose connection
    pool matches the per-destination concurrency."""
    if spec == MAILDIR:
        return MaildirAgent(maildir)
    return LmtpTransport(spec, max_connections=max_connections, executor=maildir.executor,
                         lhlo_name=maildir.hostname)


def manager(config: Config, maildir: Maildir, concurrency: Callable[[], int],
            observer: DeliveryObserver) -> Manager:
    """The delivery manager of [delivery] queue_dir, as the daemon (workers = 1) and the
    supervisor (workers > 1) each run it: one per queue, whichever process hosts it."""
    d = config.delivery
    return Manager(config, QueueStore(Path(d.queue_dir)),
                   lambda spec: build(spec, maildir, d.destination_concurrency),
                   concurrency, maildir.executor, observer=observer)
