"""The queue on disk. Blocking: every function here runs on an executor thread.

    <queue_dir>/tmp/                 files being written (never read as queue state)
    <queue_dir>/body/<id>            the message: CRLF, not dot-stuffed, trace header on top
    <queue_dir>/incoming/<id>        meta record of a message due now (new, flushed, released)
    <queue_dir>/deferred/<b>/<id>    meta record of a message due at bucket b (policy.BUCKET)
    <queue_dir>/hold/<id>            meta record of a message on hold (never tried)
    <queue_dir>/failed/<id>          meta record of a message no recipient of which is pending
                                     and at least one failed (kept for the admin / the bounce)

A message's state is where its meta record is. Two files, not one: the body is written once and
never again, the small meta record is replaced atomically at every state change (temp file,
fsync, rename, directory fsync), so a change costs one small file's fsync instead of rewriting
the message. Each record has a sequence number: a crash between a move's rename and its unlink
leaves two records of one message, and the higher wins.

Accepting (QueueFile.place, then the directory syncs) takes two rounds of syncs, each pair run
together so that the file system commits its journal once per round: the body's and the
record's fdatasync (their writeback started together, store/writeback.py; side by side on two
threads where that is not available), then the body's link into body/ (`place_body`: never
a rename, which would replace a queued body of the same id) and the record's rename, then the
fsyncs of body/ and incoming/ (one round of the DirSync thread, shared by concurrent accepts).
Only then does the session answer 250. A crash before that may leave a record whose body never
became durable (the manager drops it, logged: it was never acknowledged) or a body without a
record (the orphan sweep removes it). Removing a delivered message syncs nothing: a crash may
bring the record back, and the message is delivered again (the duplicate window elemta(8)
describes), or leave a record without its body (dropped, logged) or a body without its record.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..delivery.stream import has_bare_lf
from ..store import writeback
from ..store.maildir import COMMIT_THREADS, DirSync, SpoolFile, fsync_dir
from . import policy

STATES = ("incoming", "deferred", "hold", "failed")
_ID = re.compile(r"[0-9A-F]{12}")
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def valid_id(qid: str) -> bool:
    return _ID.fullmatch(qid) is not None


def place_body(tmp: str | Path, body: Path) -> None:
    """Give the body file `tmp` its name in body/, which must be free: a hard link, then the
    tmp/ name removed. A rename would silently replace another message's body that drew the
    same 48-bit queue id; this raises FileExistsError instead (the message is refused with a
    4xx and comes back under a new id). Only body/'s entry needs the directory sync that
    follows: a tmp/ name left by a crash is removed at start."""
    os.link(tmp, body)
    os.unlink(tmp)


def stale_tmp(name: str, mtime: float, started: float, alive: Callable[[int], bool]) -> bool:
    """May tmp/ file `name` ("<id>.<pid>.body" or ".meta") be removed? Its writer is gone, or
    it is our own pid's but older than this process. Anything else may be in flight."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # not ours to be written: nobody finishes it
    pid = int(parts[1])
    if pid == os.getpid():
        return mtime < started
    return not alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Recipient:
    address: str
    transport: str  # the spec that delivers it
    state: str = policy.PENDING
    reply: str = ""  # the last reply, "451 4.4.1 ..." as the server sent it
    relay: str = ""
    notify: str = ""  # RCPT NOTIFY= (RFC 3461), "" when not given
    orcpt: str = ""  # RCPT ORCPT= as sent ("rfc822;" xtext)


@dataclass
class Meta:
    id: str
    sender: str
    created: float
    size: int
    recipients: list[Recipient]
    attempts: int = 0
    next_attempt: float = 0.0
    seq: int = 0
    eight_bit: bool = False  # received with BODY=8BITMIME: passed on to the next hop
    smtputf8: bool = False  # received with SMTPUTF8: passed on likewise
    ret: str = ""  # MAIL RET= (FULL / HDRS), "" when not given (issue 13)
    envid: str = ""  # MAIL ENVID= (xtext)
    crlf: bool = False  # the body holds no bare LF (checked as it was written): not rechecked
    delay_warned: float = 0.0  # when its delay notice was decided (sent or not wanted); 0: not

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Meta:
        raw = json.loads(data)
        rcpts = [Recipient(**r) for r in raw.pop("recipients")]
        return cls(recipients=rcpts, **raw)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == policy.PENDING]


@dataclass(frozen=True)
class Census:
    """What the queue holds, counted from the directories (no record is read)."""

    messages: dict[str, int]
    bytes: int
    oldest: float | None  # creation time (body mtime) of the oldest message


# Threads for the second sync of a pair (QueueFile.commit): as many as commits may run at once.
SIDE_THREADS = COMMIT_THREADS


@dataclass
class QueueStore:
    root: Path
    dirsync: DirSync = field(default_factory=DirSync)
    side: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        SIDE_THREADS, thread_name_prefix="queue-sync"))

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def init(self) -> None:
        """Create the layout (durably)."""
        created = []
        for sub in ("", "tmp", "body", *STATES):
            p = self.path(sub) if sub else self.root
            if not p.is_dir():
                p.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                created.append(p)
        for parent in {p.parent for p in created}:
            fsync_dir(parent)

    def clean_tmp(self, started: float) -> int:
        """Remove what stopped writers left in tmp/ (names carry the writer's pid); returns
        how many. `started`: when this process started (a file of our own pid written before
        is a leftover of an earlier process that had it)."""
        removed = 0
        for entry in os.scandir(self.path("tmp")):
            try:
                if stale_tmp(entry.name, entry.stat().st_mtime, started, _alive):
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # its writer finished meanwhile
        return removed

    # -- one record ------------------------------------------------------------------------
    def write(self, meta: Meta, state: str, old: Path | None = None) -> Path:
        """Put `meta` (seq + 1) in `state` atomically; remove the `old` record if elsewhere."""
        dest_dir = self._state_dir(state, meta)
        if state == "deferred" and not dest_dir.is_dir():
            dest_dir.mkdir(mode=_DIR_MODE, exist_ok=True)
            self.dirsync.sync(dest_dir.parent)
        tmp, fd = self._record_file(meta)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dest = dest_dir / meta.id
        os.rename(tmp, dest)
        self.dirsync.sync(dest_dir)
        if old is not None and old != dest:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
            self.dirsync.sync(old.parent)
        return dest

    def _record_file(self, meta: Meta) -> tuple[Path, int]:
        """`meta` (seq + 1) written to its tmp/ file, not yet synced: (path, open descriptor)."""
        meta.seq += 1
        tmp = self.path("tmp", f"{meta.id}.{os.getpid()}.meta")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
        try:
            os.write(fd, meta.to_json())
        except OSError:
            os.close(fd)
            raise
        return tmp, fd

    def _state_dir(self, state: str, meta: Meta) -> Path:
        if state == "deferred":
            return self.path("deferred", str(policy.bucket_of(meta.next_attempt)))
        return self.path(state)

    def read(self, path: Path) -> Meta:
        return Meta.from_json(path.read_bytes())

    def remove(self, meta_path: Path, qid: str) -> None:
        """The record, then the body. Nothing is synced: see the module's docstring."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meta_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path("body", qid))

    def body(self, qid: str) -> Path:
        return self.path("body", qid)

    def locate(self, qid: str) -> tuple[str, Path] | None:
        """(state, path) of message `qid`'s record, the newest if a crash left two."""
        found: list[tuple[int, str, Path]] = []
        candidates = [(s, self.path(s, qid)) for s in ("incoming", "hold", "failed")]
        candidates += [("deferred", Path(b.path) / qid) for b in self._buckets()]
        for state, p in candidates:
            try:
                found.append((self.read(p).seq, state, p))
            except (FileNotFoundError, ValueError, TypeError, KeyError):
                continue
        if not found:
            return None
        _, state, p = max(found)
        return state, p

    def _buckets(self) -> list[os.DirEntry[str]]:
        return [e for e in os.scandir(self.path("deferred")) if e.name.isdigit()]

    # -- the schedule ----------------------------------------------------------------------
    def due(self, now: float, limit: int, skip: set[str] | frozenset[str]) -> list[Path]:
        """Up to `limit` records due at `now` and not in `skip`: incoming/ first, then the due
        deferred buckets, oldest first. Lists only those directories."""
        out: list[Path] = []
        if limit <= 0:
            return out
        for entry in os.scandir(self.path("incoming")):
            if entry.name not in skip and valid_id(entry.name):
                out.append(Path(entry.path))
                if len(out) >= limit:
                    return out
        buckets = {int(b.name): b.path for b in self._buckets()}
        for b in policy.due_buckets(list(buckets), now):
            empty = True
            for entry in os.scandir(buckets[b]):
                empty = False
                if entry.name not in skip and valid_id(entry.name):
                    out.append(Path(entry.path))
                    if len(out) >= limit:
                        return out
            if empty:
                with contextlib.suppress(OSError):  # a writer may be filling it right now
                    os.rmdir(buckets[b])
        return out

    def records(self, states: tuple[str, ...] = STATES) -> Iterator[tuple[str, Path]]:
        """Every record (for `elemta queue`), streamed: nothing is collected here."""
        for state in states:
            if state == "deferred":
                for b in sorted(self._buckets(), key=lambda e: int(e.name)):
                    for entry in os.scandir(b.path):
                        if valid_id(entry.name):
                            yield state, Path(entry.path)
            else:
                for entry in os.scandir(self.path(state)):
                    if valid_id(entry.name):
                        yield state, Path(entry.path)

    def flush_deferred(self, skip: frozenset[str] = frozenset()) -> int:
        """Every deferred record not in `skip` (being delivered) into incoming/ (retry now);
        returns how many moved."""
        moved = 0
        for b in self._buckets():
            for entry in os.scandir(b.path):
                if valid_id(entry.name) and entry.name not in skip:
                    os.rename(entry.path, self.path("incoming", entry.name))
                    moved += 1
            self.dirsync.sync(Path(b.path))
        if moved:
            self.dirsync.sync(self.path("incoming"))
        return moved

    def orphans(self, before: float, batch: int = 4096) -> Iterator[str]:
        """Bodies last written before `before` that have no record in any state: what a crash
        between a body's link and its record's rename leaves. Memory stays bounded: old
        bodies are checked `batch` at a time against one listing of the records each."""
        group: set[str] = set()
        for entry in os.scandir(self.path("body")):
            try:
                old = entry.stat(follow_symlinks=False).st_mtime < before
            except FileNotFoundError:
                continue
            if old and valid_id(entry.name):
                group.add(entry.name)
                if len(group) >= batch:
                    yield from self._unrecorded(group)
                    group = set()
        if group:
            yield from self._unrecorded(group)

    def _unrecorded(self, ids: set[str]) -> list[str]:
        for _, path in self.records():
            ids.discard(path.name)
        return sorted(ids)

    def remove_orphans(self, ids: list[str], active: frozenset[str]) -> list[str]:
        """Remove the bodies of `ids` (from `orphans`) whose record is still nowhere, looked for
        again one by one: a listing can miss a record that moved between two directories while
        it ran. The caller holds the moves still (and names the messages being delivered)."""
        removed = []
        for qid in ids:
            if qid not in active and self.locate(qid) is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.body(qid))
                    removed.append(qid)
        return removed

    def census(self) -> Census:
        counts = dict.fromkeys(STATES, 0)
        for state, _ in self.records():
            counts[state] += 1
        total, oldest = 0, None
        for entry in os.scandir(self.path("body")):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            total += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        return Census(counts, total, oldest)


@dataclass
class QueueFile(SpoolFile):
    """A message on its way into the queue: the SMTP side's Spool drives it like a Maildir
    spool file (append, commit, abort; one job at a time on the commit threads)."""

    store: QueueStore | None = None
    meta: Meta | None = None
    # Bare LF seen so far, and whether the last byte written was CR (a CRLF split in two).
    # Checked here, on a commit thread of the receiving process, so the delivering one
    # (the supervisor, with workers) need not check every chunk again (Meta.crlf).
    bare_lf: bool = False
    _after_cr: bool = False

    def append(self, data: bytes) -> None:
        if data and not self.bare_lf:
            self.bare_lf = has_bare_lf(data, self._after_cr)
            self._after_cr = data[-1:] == b"\r"
        super().append(data)

    def place(self, data: bytes) -> list[Path]:
        """Body and record synced (side by side), then placed in body/ and incoming/; the
        caller (SpoolFile.commit, commit_then) has both directories synced before the session
        may answer 250. The body is in body/ before the record appears. On OSError nothing is
        left in the queue."""
        assert self.store is not None and self.meta is not None
        store, meta = self.store, self.meta
        meta_tmp: Path | None = None
        try:
            self.append(data)
            meta.size = os.fstat(self.fd).st_size
            meta.crlf = not self.bare_lf
            meta_tmp, meta_fd = store._record_file(meta)
            try:
                if writeback.start(self.fd) and writeback.start(meta_fd):
                    os.fdatasync(self.fd)  # commits the journal for both (store/writeback.py)
                    os.fdatasync(meta_fd)
                else:
                    _side_by_side(store.side, lambda: os.fdatasync(meta_fd),
                                  lambda: os.fdatasync(self.fd))
            finally:
                os.close(meta_fd)
                fd, self.fd = self.fd, -1
                os.close(fd)
            body, record = store.body(meta.id), store.path("incoming", meta.id)
            place_body(self.tmp, body)
            self._placed.append(body)
            os.rename(meta_tmp, record)
            self._placed.append(record)
        except OSError:
            if meta_tmp is not None:  # gone already if renamed
                with contextlib.suppress(OSError):
                    os.unlink(meta_tmp)
            self.unplace()
            raise
        return [body.parent, record.parent]


def _side_by_side(side: ThreadPoolExecutor, first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run `first` on a `side` thread while `second` runs here; raise the first OSError.

    Two fsyncs issued together end in one journal commit where they would take two in a row.
    A side job never waits for anything but its own syscall, so the commit threads waiting
    on the side pool cannot deadlock it."""
    job = side.submit(first)
    try:
        second()
    finally:
        job.result()
