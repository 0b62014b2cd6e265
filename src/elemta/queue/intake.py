"""The SMTP side's door into the queue: which recipients are queued, and a Spool whose commit
puts body and record into the queue (store.QueueFile) before the session answers 250."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..config import DeliveryConfig
from ..delivery.dsnparams import MailDsn, RcptDsn
from ..store.maildir import Mailbox, Spool
from . import routing
from .store import Meta, QueueFile, QueueStore, Recipient


class QueueIntake:
    def __init__(self, store: QueueStore, executor: ThreadPoolExecutor,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.executor = executor
        self.wake = wake  # the manager looks at incoming/ now

    @staticmethod
    def routes(mailboxes: Sequence[Mailbox], delivery: DeliveryConfig) -> list[tuple[str, str]] | None:
        """(address, transport spec) per recipient when any goes to a queued transport (then
        the whole message is queued), None when all go to maildir (stored directly)."""
        routes = delivery.all_routes()
        specs = [(str(b), routing.transport_for(b.domain, delivery.transport, routes))
                 for b in mailboxes]
        return specs if any(routing.queued(s) for _, s in specs) else None

    def open(self, routes: list[tuple[str, str]], sender: str, header: bytes, qid: str,
             eight_bit: bool = False, smtputf8: bool = False, mail_dsn: MailDsn | None = None,
             rcpt_dsn: Mapping[str, RcptDsn] | None = None) -> Spool:
        none = RcptDsn()
        rcpts = [Recipient(a, s, notify=(rcpt_dsn or {}).get(a, none).notify,
                           orcpt=(rcpt_dsn or {}).get(a, none).orcpt) for a, s in routes]
        mail_dsn = mail_dsn or MailDsn()
        meta = Meta(qid, sender, time.time(), 0, rcpts, eight_bit=eight_bit, smtputf8=smtputf8,
                    ret=mail_dsn.ret, envid=mail_dsn.envid)
        tmp = self.store.path("tmp", f"{qid}.{os.getpid()}.body")
        file = QueueFile(tmp, [], self.store.dirsync, store=self.store, meta=meta)
        spool = Spool(qid, file, self.executor)
        spool.buffer(header)
        return spool
