"""Durable Maildir delivery: tmp/ -> fsync -> link/rename into new/ -> fsync dir; only then 250.

A message for several recipients is written once and hard-linked into each mailbox's new/.
Nothing reaches new/ before its bytes are on disk, so a crash at any moment leaves either
a complete message in new/ or, at most, a stale file in tmp/ that `clean_tmp` removes at start.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("elemta.store")
_T = TypeVar("_T")

_counter = itertools.count(1)
_DIR_MODE = 0o700
_FILE_MODE = 0o600
SPOOL_BUFFER = 64 * 1024


def new_queue_id() -> str:
    """12 hex digits, unique enough to find one message in logs and on disk."""
    return secrets.token_hex(6).upper()


@dataclass(frozen=True)
class Mailbox:
    domain: str
    localpart: str

    def __str__(self) -> str:
        return f"{self.localpart}@{self.domain}"


def mailbox_path(root: Path, box: Mailbox) -> Path:
    """Where a mailbox lives: <root>/<domain>/<localpart>/ (holding tmp/, new/, cur/)."""
    return root / box.domain / box.localpart


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirState:
    def __init__(self) -> None:
        self.counter = threading.Lock()  # guards `entered`
        self.syncing = threading.Lock()  # one fsync of this directory at a time
        self.entered = 0  # commits whose links into the directory are done
        self.synced = 0  # every commit up to this number is covered by a finished fsync


# Per-mailbox memos (directories known to exist, fsync bookkeeping) are bounded: an MX with
# many mailboxes must not grow them forever. Forgetting one is always safe: it only costs a
# fresh check (ensure) or a fsync that no queued commit shares (DirSync).
MEMO_LIMIT = 4096


def _remember(memo: dict[Path, _T], key: Path, value: _T) -> _T:
    """memo[key] = value, first forgetting the oldest entry when the memo is full."""
    if len(memo) >= MEMO_LIMIT:
        del memo[next(iter(memo))]
    memo[key] = value
    return value


class DirSync:
    """Group commit for directory fsyncs.

    Concurrent commits into one mailbox each need new/ fsynced after their link. An fsync that
    starts after a commit's link covers that link, so a commit that finds one has finished
    since returns at once, and one fsync serves every commit that queued behind it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: dict[Path, _DirState] = {}
        self.fsyncs = 0  # directory fsyncs actually made (tests check the coalescing with it)

    def sync(self, path: Path) -> None:
        """Return once an fsync of `path` that began after this call has completed."""
        with self._lock:
            state = self._dirs.get(path)
            if state is None:  # a forgotten state's users keep theirs
                state = _remember(self._dirs, path, _DirState())
        with state.counter:
            state.entered += 1
            mine = state.entered
        with state.syncing:
            if state.synced >= mine:
                return
            with state.counter:
                covers = state.entered
            _fsync_dir(path)  # raises: `synced` stays, so the next commit in line tries again
            state.synced = covers
        with self._lock:
            self.fsyncs += 1


# fsync is where a durable store spends its time; concurrent fsyncs let the filesystem
# batch them into one journal commit, so the pool is wider than asyncio's default (6 here).
COMMIT_THREADS = 32


@dataclass
class Maildir:
    root: Path
    hostname: str
    _ready: dict[Path, None] = field(default_factory=dict)  # insertion-ordered set
    dirsync: DirSync = field(default_factory=DirSync)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit")
    )

    def mailbox_dir(self, box: Mailbox) -> Path:
        return mailbox_path(self.root, box)

    def ensure(self, box: Mailbox) -> Path:
        """Create <root>/<domain>/<localpart>/{tmp,new,cur}, durably, once per process."""
        base = self.mailbox_dir(box)
        if base in self._ready:
            return base
        created: list[Path] = []
        if not self.root.is_dir():
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            created.append(self.root)
        for path in (self.root / box.domain, base):
            if not path.is_dir():
                path.mkdir(mode=_DIR_MODE, exist_ok=True)
                created.append(path)
        for sub in ("tmp", "new", "cur"):
            if not (base / sub).is_dir():
                (base / sub).mkdir(mode=_DIR_MODE, exist_ok=True)
                created.append(base / sub)
        # A new directory entry is durable only once its parent directory is synced.
        for parent in {p.parent for p in created}:
            _fsync_dir(parent)
        _remember(self._ready, base, None)
        return base

    def open(self, recipients: Iterable[Mailbox], header: bytes, qid: str) -> Spool:
        """A spool file in the first mailbox's tmp/, with `header` written, for `qid`."""
        boxes = list(dict.fromkeys(recipients))
        bases = [self.ensure(b) for b in boxes]
        now = time.time()
        name = (
            f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}_{qid}"
            f".{self.hostname}"
        )
        tmp = bases[0] / "tmp" / name
        spool = Spool(qid, tmp, [b / "new" / name for b in bases], self.dirsync)
        spool.write(header)
        return spool

    def clean_tmp(self) -> int:
        """Remove partial files left in tmp/ by a crash; returns how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for tmpdir in self.root.glob("*/*/tmp"):
            for entry in os.scandir(tmpdir):
                if entry.is_file(follow_symlinks=False):
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed


@dataclass
class Spool:
    """One message on its way to disk. Not thread-safe: one session owns it.

    The first SPOOL_BUFFER bytes are kept in memory (and counted in the session's ledger), so a
    typical small message is created, written, fsynced and linked in one call on the commit
    thread instead of costing the event loop an open(); a larger one goes to its tmp/ file as
    soon as it passes the buffer and is streamed from then on.
    """

    queue_id: str
    tmp: Path
    targets: list[Path]
    dirsync: DirSync
    size: int = 0
    fd: int = -1
    _pending: list[bytes] = field(default_factory=list)
    _pending_len: int = 0
    _closed: bool = False

    @property
    def buffered(self) -> int:
        """Bytes of this message held in memory right now."""
        return self._pending_len

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= SPOOL_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self.fd < 0:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        view = memoryview(b"".join(self._pending))
        self._pending, self._pending_len = [], 0
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def commit(self) -> None:
        """Write what is buffered, fdatasync the file, move it into every new/ (hard links for all
        but the last, which takes the tmp/ name by rename), fsync those dirs. Blocking: run in a
        thread.

        On any failure every file placed in new/ is removed again and OSError propagates: the
        caller answers 452 4.3.1 and nothing is left behind.
        """
        placed: list[Path] = []
        try:
            self._flush()
            # The data and what reading it back needs (size, blocks); the directory entry is
            # made durable by the new/ fsync below. Cheaper than fsync (no timestamps).
            os.fdatasync(self.fd)
            os.close(self.fd)
            self._closed = True
            *linked, last = self.targets
            for target in linked:
                os.link(self.tmp, target)
                placed.append(target)
            os.rename(self.tmp, last)
            placed.append(last)
            for newdir in dict.fromkeys(t.parent for t in self.targets):
                self.dirsync.sync(newdir)
        except OSError:
            for target in placed:
                _unlink_quietly(target)
            self.abort()
            raise

    def abort(self) -> None:
        self._pending, self._pending_len = [], 0
        if self.fd < 0:
            return  # never reached the disk
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)
        _unlink_quietly(self.tmp)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, exc.strerror)
