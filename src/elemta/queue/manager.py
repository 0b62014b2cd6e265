"""The delivery manager: takes due messages into a bounded active set, runs their deliveries
with bounded concurrency (in total, set by the memory governor, and per destination), and
records each recipient's result on disk before anything else happens to the message.

Memory is O(active): the rest of the queue stays on disk, found through the directories
(store.due lists incoming/ and the due deferred/ buckets only). Counts and ages come from a
periodic census of the directories; metrics, /api/stats, /health and `elemta queue` read them
here (`stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..config import Config
from ..delivery.base import Envelope, RecipientResult, Reply, Transport
from ..events import emit
from . import policy
from .lock import QueueLock
from .store import Census, Meta, QueueStore, valid_id

log = logging.getLogger("elemta.queue")
_T = TypeVar("_T")

TICK = 1.0  # the scheduler looks at the due directories at least this often
LOCK_RETRY = 0.2  # seconds between tries for a queue lock another process holds
# A body with no record this long after its last write is an orphan (a crash between the
# body's rename and the record's): no commit in flight takes an hour. Swept at start and then
# this often.
ORPHAN_AGE = 3600.0
# The census (counting the directories: O(queue) file-system work, O(1) memory) runs after
# changes, at most every CENSUS_GAP seconds and never more than a tenth of the time, and at
# least every CENSUS_EVERY seconds.
CENSUS_EVERY = 10.0
CENSUS_GAP = 1.0
_DSN = {policy.DELIVERED: "2.0.0", policy.PENDING: "4.0.0", policy.FAILED: "5.0.0"}
_EVENT = {policy.DELIVERED: "message_delivered", policy.PENDING: "message_deferred",
          policy.FAILED: "message_failed"}
_STATUS = {policy.DELIVERED: "sent", policy.PENDING: "deferred", policy.FAILED: "bounced"}


class DeliveryObserver(Protocol):
    def delivery(self, transport: str, result: str, seconds: float) -> None: ...


class NullDeliveryObserver:
    def delivery(self, transport: str, result: str, seconds: float) -> None:
        pass


@dataclass
class Active:
    meta: Meta
    path: Path  # where its record is now
    state: str  # "incoming" or "deferred" (the directory of `path`)
    running: int = 0  # deliveries (one per transport) in flight
    then: str | None = None  # "delete" / "hold", asked for while it was being delivered
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one record write at a time


def settings_of(config: Config) -> policy.Backoff:
    d = config.delivery
    return policy.Backoff(d.minimal_backoff_time, d.maximal_backoff_time,
                          d.maximal_queue_lifetime)


def dsn_of(reply: Reply, state: str) -> str:
    first = reply.text.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(reply.code)[0]:
        return first
    return _DSN[state]


class Manager:
    def __init__(self, config: Config, store: QueueStore,
                 transport: Callable[[str], Transport], concurrency: Callable[[], int],
                 executor: ThreadPoolExecutor, *, observer: DeliveryObserver | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time,
                 bounce: Callable[[Meta], object] | None = None,
                 warn: Callable[[Meta], object] | None = None) -> None:
        self.config = config
        self.store = store
        self._make_transport = transport
        self._concurrency = concurrency
        self._executor = executor
        self.observer = observer or NullDeliveryObserver()
        self._rng = rng or random.Random()
        self._clock = clock
        # Called on the executor with a message about to move to failed/ (queue/bounce.py):
        # an OSError keeps the record where it is, so the bounce is tried again.
        self._bounce = bounce
        # Likewise with a deferred message whose delay notice is due (delay_warning_time).
        self._warn = warn
        self.active: dict[str, Active] = {}
        # Queue ids ready to deliver, per transport spec: a destination at its concurrency
        # limit is passed over in one step, not message by message (with 1,000 active messages
        # for one busy destination, a scan per finished delivery was a fifth of the loop).
        self._ready: dict[str, deque[str]] = {}
        self.running = 0
        self._by_dest: Counter[str] = Counter()
        self.limit = 0
        self._transports: dict[str, Transport] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # the census is out of date
        # Taking records into the active set and the admin's moves of records exclude each
        # other, so a record is never moved under a delivery that read it.
        self._moving = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._census_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self.census: Census | None = None
        self.failing_since: dict[str, float] = {}  # spec -> first of an unbroken run of 4xx
        self._stopping = False
        self.lock = QueueLock(store.root)
        self.started = self._clock()

    async def _run_io(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self._run_io(self.store.init)
        self.census = await self._run_io(self.store.census)
        c = self.census
        log.info("queue %s: %s message(s), %d bytes", self.store.root,
                 ", ".join(f"{n} {s}" for s, n in c.messages.items()), c.bytes)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name="elemta-queue")
        self._census_task = loop.create_task(self._census_loop(), name="elemta-queue-census")

    def wake(self) -> None:
        """New mail in incoming/ (or a flush): look now instead of at the next tick."""
        self._wake.set()
        self._changed.set()

    async def _own(self) -> None:
        """Schedule only while holding the queue's lock: a daemon started while an earlier one
        still drains (or any second process on this queue_dir) waits here instead of
        delivering the same records beside it. Then clear what dead writers left in tmp/."""
        waiting = False
        while True:
            try:
                if await self._run_io(self.lock.try_acquire):
                    break
                if not waiting:
                    waiting = True
                    log.warning("queue %s is delivered by another elemta process (pid %s): "
                                "waiting for it to stop", self.store.root,
                                await self._run_io(self.lock.holder))
            except OSError as exc:
                log.error("queue %s: cannot take %s: %s", self.store.root, self.lock.path, exc)
            await asyncio.sleep(LOCK_RETRY)
        if waiting:
            log.info("queue %s: the other process stopped; delivering now", self.store.root)
        removed = await self._run_io(self.store.clean_tmp, self.started)
        if removed:
            log.warning("queue %s: removed %d file(s) a stopped process left in tmp/",
                        self.store.root, removed)

    async def _sweeps(self) -> None:
        while True:
            try:
                found = await self._run_io(lambda: list(self.store.orphans(
                    self._clock() - ORPHAN_AGE)))
                if found:
                    async with self._moving:  # no record of a message not active moves now
                        removed = await self._run_io(self.store.remove_orphans, found,
                                                     frozenset(self.active))
                    if removed:
                        log.warning("queue %s: removed %d body file(s) without a record, "
                                    "left by a crash while a message was being queued "
                                    "(never acknowledged): %s", self.store.root, len(removed),
                                    " ".join(removed))
                        self._changed.set()
            except OSError as exc:
                log.error("queue %s: orphan sweep: %s", self.store.root, exc)
            await asyncio.sleep(ORPHAN_AGE)

    def forget_lock(self) -> None:
        """In a process forked from the lock's holder: close the inherited descriptor (the
        lock stays with the parent; a copy here would keep it after the parent died)."""
        self.lock.forget_inherited()

    async def stop(self, timeout: float) -> None:
        """No new deliveries; running ones get `timeout` to finish and be recorded, then are
        cancelled (their recipients stay pending: delivered again after the restart)."""
        self._stopping = True
        for task in (self._task, self._census_task, self._sweep_task):
            if task is not None:
                task.cancel()
        if self._jobs:
            _, left = await asyncio.wait(set(self._jobs), timeout=timeout)
            for job in left:
                job.cancel()
            if left:
                await asyncio.wait(left)
        for t in self._transports.values():
            with contextlib.suppress(Exception):
                await t.close()
        self.lock.release()

    # -- scheduling ------------------------------------------------------------------------
    async def _loop(self) -> None:
        await self._own()
        self._sweep_task = asyncio.get_running_loop().create_task(
            self._sweeps(), name="elemta-queue-orphans")
        while True:
            try:
                self.limit = self._concurrency()
                await self._fill()
                self._pump()
            except OSError as exc:
                log.error("queue %s: %s", self.store.root, exc)
            except Exception:  # a bug: logged, and the scheduler goes on
                log.exception("queue scheduler")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()

    async def _census_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), CENSUS_EVERY)
            self._changed.clear()
            started = time.monotonic()
            try:
                self.census = await self._run_io(self.store.census)
            except OSError as exc:
                log.error("queue %s: census: %s", self.store.root, exc)
            await asyncio.sleep(max(CENSUS_GAP, 10 * (time.monotonic() - started)))

    async def _fill(self) -> None:
        async with self._moving:
            await self._take_due()

    async def _take_due(self) -> None:
        room = self.config.delivery.active_limit - len(self.active)
        if room <= 0 or self.limit <= 0:  # paused by the governor: the rest stays on disk
            return
        found = await self._run_io(self._load_due, self._clock(), room,
                                   frozenset(self.active))
        for path, meta in found:
            if meta.id in self.active:
                continue
            a = Active(meta, path, "deferred" if path.parent.parent.name == "deferred"
                       else "incoming")
            self.active[meta.id] = a
            specs = list(dict.fromkeys(r.transport for r in meta.pending()))
            if not specs:  # every recipient recorded before a crash: just finish it
                job = asyncio.get_running_loop().create_task(self._settle(a))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
                continue
            a.running = len(specs)
            for spec in specs:
                self._ready.setdefault(spec, deque()).append(meta.id)

    def _load_due(self, now: float, room: int,
                  skip: frozenset[str]) -> list[tuple[Path, Meta]]:
        out = []
        for path in self.store.due(now, room, skip):
            try:
                meta = self.store.read(path)
                if not self.store.body(meta.id).exists():
                    self._drop_bodiless(path, meta)
                    continue
                out.append((path, meta))
            except FileNotFoundError:
                continue  # moved meanwhile (an admin command)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("queue: unreadable record %s (left in place): %s", path, exc)
        return out

    def _drop_bodiless(self, path: Path, meta: Meta) -> None:
        """A record whose body is gone: only a crash leaves one (store.py says when), and
        its message was either never acknowledged or already delivered."""
        log.error("queue %s: record without a body removed (a crash before the message was "
                  "acknowledged, or after it was delivered); from=<%s> to=%s", meta.id,
                  meta.sender, ",".join(r.address for r in meta.recipients))
        self.store.remove(path, meta.id)

    def _pump(self) -> None:
        """Start ready deliveries while the total and per-destination limits allow; the
        destinations take turns (one that started some goes to the back of the line)."""
        per_dest = self.config.delivery.destination_concurrency
        loop = asyncio.get_running_loop()
        for spec in list(self._ready):
            if self.running >= self.limit or self._stopping:
                return
            waiting = self._ready[spec]
            started = False
            while waiting and self.running < self.limit and self._by_dest[spec] < per_dest:
                qid = waiting.popleft()
                started = True
                self.running += 1
                self._by_dest[spec] += 1
                job = loop.create_task(self._deliver(qid, spec), name=f"elemta-deliver-{qid}")
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
            if not waiting:
                del self._ready[spec]
            elif started:
                self._ready[spec] = self._ready.pop(spec)

    def _transport(self, spec: str) -> Transport:
        t = self._transports.get(spec)
        if t is None:
            t = self._transports[spec] = self._make_transport(spec)
        return t

    # -- one delivery ----------------------------------------------------------------------
    async def _deliver(self, qid: str, spec: str) -> None:
        a = self.active[qid]
        try:
            rcpts = [r for r in a.meta.pending() if r.transport == spec]
            m = a.meta
            env = Envelope(qid, m.sender, tuple(r.address for r in rcpts), self.store.body(qid),
                           m.size, eight_bit=m.eight_bit, smtputf8=m.smtputf8, ret=m.ret,
                           envid=m.envid, notify=tuple(r.notify for r in rcpts),
                           orcpt=tuple(r.orcpt for r in rcpts), crlf=m.crlf)
            started = time.monotonic()
            name = spec or "none"
            try:
                # Inside: a record may name a spec that builds nothing (a held bounce with no
                # route, released by the admin): deferred below like a transport's bug.
                transport = self._transport(spec)
                name = transport.name
                results: Sequence[RecipientResult] = await transport.deliver(env)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the transport: the queue keeps the message
                why = f"internal error: {exc!r}"
                if spec:
                    log.exception("queue %s: transport %s raised", qid, spec)
                else:
                    why = "no route for this recipient's domain (queue/bounce.py)"
                results = [RecipientResult(r, Reply(451, f"4.3.0 {why}"), spec)
                           for r in env.recipients]
            seconds = time.monotonic() - started
            self._record(a, spec, name, rcpts, results, seconds)
        finally:
            self.running -= 1
            self._by_dest[spec] -= 1
        a.running -= 1
        await self._settle(a)
        self._pump()

    def _record(self, a: Active, spec: str, name: str, rcpts: list[Any],
                results: Sequence[RecipientResult], seconds: float) -> None:
        now = self._clock()
        by_address = {r.recipient: r for r in results}
        kinds = set()
        for r in rcpts:
            res = by_address.get(r.address)
            reply = res.reply if res else Reply(451, "4.3.0 no reply for this recipient")
            r.state = policy.outcome(reply.code)
            r.reply = str(reply)
            r.relay = res.relay if res else spec
            kinds.add(r.state)
            self.observer.delivery(name, reply.kind, seconds)
            self._log_result(a.meta, r.address, name, r.relay, reply, r.state, now)
        if kinds == {policy.PENDING}:
            self.failing_since.setdefault(spec, now)
        else:
            self.failing_since.pop(spec, None)

    def _log_result(self, meta: Meta, rcpt: str, transport: str, relay: str, reply: Reply,
                    state: str, now: float) -> None:
        delay = max(0.0, now - meta.created)
        dsn = dsn_of(reply, state)
        emit(log, _EVENT[state],
             f"{meta.id}: to=<{rcpt}>, relay={relay}, delay={delay:.2f}, dsn={dsn}, "
             f"status={_STATUS[state]} ({reply})",
             queue_id=meta.id, recipient=rcpt, transport=transport, relay=relay, dsn=dsn,
             delay=round(delay, 3), reply=str(reply))

    async def _settle(self, a: Active) -> None:
        """Write the message's record after a delivery: in place while others of its
        deliveries run (so their results survive a crash), else its next state."""
        async with a.lock:
            if a.running > 0:
                a.path = await self._run_io(self.store.write, a.meta, a.state, a.path)
                return
            await self._finish(a)

    async def _finish(self, a: Active) -> None:
        m = a.meta
        now = self._clock()
        try:
            if a.then == "delete":
                await self._run_io(self.store.remove, a.path, m.id)
                log.info("%s: removed (elemta queue delete)", m.id)
                return
            pending = m.pending()
            m.attempts += 1
            if pending:
                if policy.expired(m.created, now, self.config.delivery.maximal_queue_lifetime):
                    for r in pending:
                        r.state = policy.FAILED
                        reply = Reply(550, f"5.4.7 delivery time expired (last reply: {r.reply})")
                        self._log_result(m, r.address, "queue", r.relay, reply, policy.FAILED,
                                         now)
                else:
                    m.next_attempt = policy.next_attempt(m.attempts, now, settings_of(self.config),
                                                         self._rng)
            if a.then == "hold":
                await self._run_io(self.store.write, m, "hold", a.path)
            elif m.pending():
                await self._delay_warning(m, now)
                await self._run_io(self.store.write, m, "deferred", a.path)
            elif any(r.state == policy.FAILED for r in m.recipients):
                if self._bounce is not None:
                    await self._run_io(self._bounce, m)
                    self.wake()
                await self._run_io(self.store.write, m, "failed", a.path)
            else:
                await self._run_io(self.store.remove, a.path, m.id)
                log.info("%s: removed (delivered to every recipient)", m.id)
        except OSError as exc:
            # The record stays where it was: the message is tried again (a duplicate for the
            # recipients just delivered, the window elemta(8) describes).
            log.error("%s: cannot record the delivery: %s", m.id, exc)
        finally:
            self.active.pop(m.id, None)
            self._changed.set()

    async def _delay_warning(self, m: Meta, now: float) -> None:
        """Queue the delay notice if it is due, and mark the record (written next) so that it
        is never sent twice, a restart included. If it cannot be queued, the message is
        deferred all the same, and the notice tried again at its next attempt."""
        if self._warn is None or not policy.delay_warning_due(
                m.created, now, self.config.delivery.delay_warning_time, m.delay_warned):
            return
        try:
            await self._run_io(self._warn, m)
        except OSError as exc:
            log.error("%s: cannot queue the delay notification: %s", m.id, exc)
            return
        m.delay_warned = now
        self.wake()

    # -- what the admin sees and does ------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The queue's one set of figures (metrics, /api/stats, /health, `elemta queue`).

        Called from the admin endpoint's threads: it only copies (no iteration over a dict the
        loop may change meanwhile)."""
        c = self.census
        now = self._clock()
        messages = dict(c.messages) if c else {}
        messages["active"] = len(self.active)
        oldest = None if c is None or c.oldest is None else max(0.0, now - c.oldest)
        stuck_age = self.config.delivery.stuck_queue_age
        stuck = []
        if oldest is not None and oldest > stuck_age:
            stuck.append(f"oldest queued message is {oldest:.0f}s old")
        for spec, since in list(self.failing_since.items()):
            if now - since > stuck_age:
                stuck.append(f"{spec} deferring every recipient for {now - since:.0f}s")
        return {"messages": messages, "bytes": c.bytes if c else 0,
                "oldest_age_seconds": oldest, "stuck_age_seconds": stuck_age,
                "concurrency": {"limit": self.limit, "running": self.running},
                "stuck": stuck}

    async def listing(self, limit: int = 1000) -> dict[str, Any]:
        entries, total = await self._run_io(self._list, limit)
        return {"total": total, "messages": entries}

    def _list(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        out: list[dict[str, Any]] = []
        total = 0
        now = self._clock()
        for state, path in self.store.records():
            total += 1
            if len(out) >= limit:
                continue
            try:
                meta = self.store.read(path)
            except (OSError, ValueError, TypeError, KeyError):
                continue
            out.append(describe(meta, "active" if meta.id in self.active else state, now))
        return out, total

    async def show(self, qid: str) -> dict[str, Any] | None:
        if not valid_id(qid):
            return None
        if qid in self.active:
            return describe(self.active[qid].meta, "active", self._clock())
        found = await self._run_io(self.store.locate, qid)
        if found is None:
            return None
        state, path = found
        meta = await self._run_io(self.store.read, path)
        return describe(meta, state, self._clock())

    async def act(self, verb: str, qid: str | None) -> str:
        """flush [ID], delete ID, hold ID, release ID: a one-line answer (KeyError: no such
        message; ValueError: not possible in its state)."""
        if not self.lock.held:
            raise ValueError(f"the queue is delivered by another elemta process (pid "
                             f"{self.lock.holder()}) until it stops: ask that one")
        try:
            async with self._moving:
                return await self._act(verb, qid)
        finally:
            self._changed.set()

    async def _act(self, verb: str, qid: str | None) -> str:
        if verb == "flush" and qid is None:
            n = await self._run_io(self.store.flush_deferred, frozenset(self.active))
            self.wake()
            return f"{n} deferred message(s) scheduled now"
        if qid is None or not valid_id(qid):
            raise KeyError(qid)
        a = self.active.get(qid)
        if a is not None:
            if verb in ("delete", "hold"):
                a.then = verb
                return f"{qid}: being delivered; {verb} applies when this attempt ends"
            return f"{qid}: being delivered now"
        found = await self._run_io(self.store.locate, qid)
        if found is None:
            raise KeyError(qid)
        state, path = found
        meta = await self._run_io(self.store.read, path)
        if verb == "delete":
            await self._run_io(self.store.remove, path, qid)
            return f"{qid}: deleted"
        if verb == "hold":
            if state == "hold":
                return f"{qid}: already on hold"
            if state == "failed":
                raise ValueError(f"{qid}: failed, nothing to hold")
            await self._run_io(self.store.write, meta, "hold", path)
            return f"{qid}: on hold"
        if verb in ("release", "flush"):
            if verb == "release" and state != "hold":
                raise ValueError(f"{qid}: not on hold")
            if state == "failed":
                raise ValueError(f"{qid}: failed, no recipient left to try")
            if state != "incoming":
                await self._run_io(self.store.write, meta, "incoming", path)
            self.wake()
            return f"{qid}: scheduled now"
        raise ValueError(f"unknown verb {verb!r}")


def describe(meta: Meta, state: str, now: float) -> dict[str, Any]:
    return {"id": meta.id, "state": state, "age": round(max(0.0, now - meta.created), 1),
            "size": meta.size, "sender": meta.sender, "attempts": meta.attempts,
            "next_attempt": meta.next_attempt or None,
            "recipients": [{"address": r.address, "state": r.state, "transport": r.transport,
                            "reply": r.reply, "relay": r.relay} for r in meta.recipients]}
