"""The queue's own maildir agent: delivers queued recipients routed to "maildir" (a message
whose recipients go to different transports is queued whole) into the Maildir store, streaming
the body file and turning its CRLF back into the store's LF."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Sequence

from ..delivery.base import Envelope, RecipientResult, Reply
from ..store.maildir import Mailbox, Maildir, SpoolFile, spool_name

CHUNK = 64 * 1024
_counter = itertools.count(1)


def mailbox_of(address: str) -> Mailbox:
    local, _, domain = address.rpartition("@")
    return Mailbox(domain.lower(), local)


class CrlfToLf:
    """CRLF -> LF across chunk boundaries (a CR ending one chunk waits for the next)."""

    def __init__(self) -> None:
        self._cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n")

    def end(self) -> bytes:
        return b"\r" if self._cr else b""


class MaildirAgent:
    name = "maildir"

    def __init__(self, store: Maildir) -> None:
        self.store = store

    async def deliver(self, envelope: Envelope) -> Sequence[RecipientResult]:
        relay = str(self.store.root)
        try:
            await asyncio.wrap_future(self.store.executor.submit(self._deliver, envelope))
        except OSError as exc:
            reply = Reply(451, f"4.3.0 cannot store: {exc.strerror or exc}")
        else:
            reply = Reply(250, "2.0.0 delivered to maildir")
        return [RecipientResult(r, reply, relay) for r in envelope.recipients]

    def _deliver(self, env: Envelope) -> None:
        boxes = list(dict.fromkeys(mailbox_of(r) for r in env.recipients))
        bases = [self.store.ensure(b) for b in boxes]
        name = spool_name(time.time(), os.getpid(), next(_counter), env.queue_id,
                          self.store.hostname)
        file = SpoolFile(bases[0] / "tmp" / name, [b / "new" / name for b in bases],
                         self.store.dirsync)
        try:
            file.append(f"Return-Path: <{env.sender}>\n".encode("utf-8", "replace"))
            conv = CrlfToLf()
            with open(env.body, "rb") as src:
                while chunk := src.read(CHUNK):
                    file.append(conv.feed(chunk))
            file.commit(conv.end())
        except BaseException:
            file.abort()
            raise

    async def close(self) -> None:
        pass
