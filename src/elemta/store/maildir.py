"""Durable Maildir delivery: tmp/ -> fsync -> link/rename into new/ -> fsync dir; only then 250.

A message for several recipients is written once and hard-linked into each mailbox's new/.
Nothing reaches new/ before its bytes are on disk, so a crash at any moment leaves either
a complete message in new/ or, at most, a stale file in tmp/ that `clean_tmp` removes at start.
All of it (mailbox directories, the spool file, its writes and fsyncs) runs on the commit
threads: the event loop only buffers bytes and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    """12 hex digits, unique enough to find one message in logs and on disk.

    From the `random` module's generator, which Python seeds from os.urandom at start and
    again in every forked child: a queue id needs to be unpredictable to nobody, and this
    costs no getrandom syscall per message (secrets.token_hex did)."""
    return f"{random.getrandbits(48):012X}"


@dataclass(frozen=True)
class Mailbox:
    domain: str
    localpart: str

    def __str__(self) -> str:
        return f"{self.localpart}@{self.domain}"


def mailbox_path(root: Path, box: Mailbox) -> Path:
    """Where a mailbox lives: <root>/<domain>/<localpart>/ (holding tmp/, new/, cur/)."""
    return root / box.domain / box.localpart


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Per-mailbox memos (directories known to exist) are bounded: an MX with many mailboxes must
# not grow them forever. Forgetting one is always safe: it only costs a fresh check (ensure).
MEMO_LIMIT = 4096


def _remember(memo: dict[Path, _T], key: Path, value: _T) -> _T:
    """memo[key] = value, first forgetting the oldest entry when the memo is full."""
    if len(memo) >= MEMO_LIMIT:
        del memo[next(iter(memo))]
    memo[key] = value
    return value


Synced = Callable[[OSError | None], None]


def _wait(start: Callable[[Callable[[BaseException | None], None]], None]) -> None:
    """Call `start(done)` and block until something calls `done`; raise what it was given."""
    finished = threading.Event()
    outcome: list[BaseException | None] = []

    def done(error: BaseException | None) -> None:
        outcome.append(error)
        finished.set()

    start(done)
    finished.wait()
    if outcome[0] is not None:
        raise outcome[0]


class DirSync:
    """Group commit for directory fsyncs, on a thread of its own.

    A commit that has linked its file into new/ registers here (`sync_then`) and its thread
    goes back to the pool; this object's thread fsyncs the registered directories in rounds
    and calls each registrant back once an fsync that began after its registration has
    finished (with the OSError if it failed). So one fsync serves every commit registered
    before it began, no commit thread sits blocked behind another's fsync, and waking the
    waiters is one pass over a list instead of a chain of lock hand-offs: thread switches
    were the largest cost of a durable commit here (perf: a third of the receiving
    process's CPU time was spent switching and waking threads).

    In a round the directories are fsynced one after another: on a journaling filesystem
    the first fsync commits the journal for all of them, the rest find it done. The thread
    exits after IDLE seconds without work and starts again on demand.
    """

    IDLE = 10.0

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._waiting: dict[Path, list[Synced]] = {}
        self._thread: threading.Thread | None = None
        self.fsyncs = 0  # directory fsyncs actually made (tests check the coalescing with it)

    def sync_then(self, paths: Sequence[Path], done: Synced) -> None:
        """Call `done` once an fsync of each of `paths` that began after this call has
        finished: once, on this object's thread, with the first error if any failed."""
        unique = list(dict.fromkeys(paths))
        if not unique:
            done(None)
            return
        left = [len(unique)]
        failed: list[OSError] = []

        def one(error: OSError | None) -> None:  # only ever called on the syncing thread
            if error is not None:
                failed.append(error)
            left[0] -= 1
            if left[0] == 0:
                done(failed[0] if failed else None)

        with self._cond:
            for path in unique:
                self._waiting.setdefault(path, []).append(one)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="elemta-dirsync",
                                                daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    def sync(self, path: Path) -> None:
        """Return once an fsync of `path` that began after this call has completed."""
        _wait(lambda done: self.sync_then([path], done))

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._waiting and not self._cond.wait_for(lambda: self._waiting, self.IDLE):
                    self._thread = None  # under the lock: the next sync_then starts another
                    return
                batch, self._waiting = self._waiting, {}
            for path, callbacks in batch.items():
                error: OSError | None = None
                try:
                    fsync_dir(path)
                    self.fsyncs += 1
                except OSError as exc:  # each registrant hears it; the next round tries again
                    error = exc
                for callback in callbacks:
                    try:
                        callback(error)
                    except Exception:  # a registrant's bug must not stop the others' syncs
                        log.exception("directory sync callback")


# fsync is where a durable store spends its time; concurrent fsyncs let the filesystem
# batch them into one journal commit, so the pool is wider than asyncio's default (6 here).
COMMIT_THREADS = 32


@dataclass
class Maildir:
    root: Path
    hostname: str
    _ready: dict[Path, None] = field(default_factory=dict)  # insertion-ordered set
    _ready_lock: threading.Lock = field(default_factory=threading.Lock)  # commit threads add
    dirsync: DirSync = field(default_factory=DirSync)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit")
    )

    _dirs: dict[Mailbox, tuple[Path, str, str, Path]] = field(default_factory=dict)

    def mailbox_dir(self, box: Mailbox) -> Path:
        return self._dirs_of(box)[0]

    def _dirs_of(self, box: Mailbox) -> tuple[Path, str, str, Path]:
        """(mailbox, its tmp/ and new/ as strings, new/), built once per mailbox: a message's
        file names are then joined as strings. pathlib joins, str() and hashes of fresh Paths
        were ~7% of the loop and commit threads' time per message (py-spy, workload a)."""
        dirs = self._dirs.get(box)
        if dirs is None:
            base = mailbox_path(self.root, box)
            dirs = (base, str(base / "tmp"), str(base / "new"), base / "new")
            if len(self._dirs) >= MEMO_LIMIT:
                del self._dirs[next(iter(self._dirs))]
            self._dirs[box] = dirs
        return dirs

    def ensure(self, box: Mailbox) -> Path:
        """Create <root>/<domain>/<localpart>/{tmp,new,cur}, durably, once per process.

        Blocking: `open` runs it on a commit thread.
        """
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
            fsync_dir(parent)
        with self._ready_lock:
            _remember(self._ready, base, None)
        return base

    def _ensure_all(self, boxes: list[Mailbox]) -> None:
        for box in boxes:
            self.ensure(box)

    async def open(self, recipients: Iterable[Mailbox], header: bytes, qid: str) -> Spool:
        """A spool for `qid` in the first mailbox's tmp/, with `header` buffered.

        Mailboxes this process has not used yet are created (or checked) on a commit thread,
        so only a message to a new mailbox pays that round trip.
        """
        boxes = list(dict.fromkeys(recipients))
        spool = self.open_now(boxes, header, qid)
        if spool is None:
            await asyncio.wrap_future(self.executor.submit(self._ensure_all, boxes))
            spool = self._spool([self._dirs_of(b) for b in boxes], header, qid)
        return spool

    def open_now(self, boxes: list[Mailbox], header: bytes, qid: str) -> Spool | None:
        """`open` for mailboxes this process has made ready already; None if one is new."""
        dirs = [self._dirs_of(b) for b in boxes]
        if any(d[0] not in self._ready for d in dirs):
            return None
        return self._spool(dirs, header, qid)

    def _spool(self, dirs: list[tuple[Path, str, str, Path]], header: bytes, qid: str) -> Spool:
        name = spool_name(time.time(), os.getpid(), next(_counter), qid, self.hostname)
        file = SpoolFile(f"{dirs[0][1]}/{name}", [f"{d[2]}/{name}" for d in dirs], self.dirsync,
                         newdirs=[d[3] for d in dirs])
        spool = Spool(qid, file, self.executor)
        spool.buffer(header)
        return spool

    def clean_tmp(self) -> int:
        """Remove, from every tmp/, what `stale_tmp_file` calls stale; returns how many.

        Run at start-up, before this process writes anything (see `_writer_alive`).
        """
        removed = 0
        if not self.root.is_dir():
            return 0
        now = time.time()
        booted = _boot_time()
        for tmpdir in self.root.glob("*/*/tmp"):
            for entry in os.scandir(tmpdir):
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    touched = max(st.st_mtime, st.st_atime)
                    if not stale_tmp_file(entry.name, now - touched, self.hostname, _writer_alive,
                                          before_boot=touched < booted):
                        continue
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass  # its writer finished (or cleaned up) meanwhile
        return removed


def spool_name(now: float, pid: int, n: int, qid: str, hostname: str) -> str:
    """A Maildir file name unique on this host: time, microseconds, pid, counter, queue id."""
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{pid}Q{n}_{qid}.{hostname}"


_SPOOL_NAME = re.compile(r"\d+\.M\d+P(\d+)Q\d+_[0-9A-F]{12}\.(.+)")

# The Maildir convention: a tmp/ file nobody has touched for 36 hours is abandoned.
TMP_STALE_AFTER = 36 * 3600


def stale_tmp_file(name: str, idle: float, hostname: str, alive: Callable[[int], bool],
                   before_boot: bool = False) -> bool:
    """May a start-up remove tmp/ file `name`, untouched for `idle` seconds (`before_boot`: last
    touched before this boot)?

    Another program (an IMAP server, a second elemta) may be writing any tmp/ file, so only
    what the convention calls abandoned goes, and elemta's own leftovers: files named by
    `spool_name` with this hostname whose writing process is gone. A live process with that
    pid may be another elemta on this maildir (or an unrelated process that reused the pid):
    its file stays, until it is 36 hours old. Unless the file dates from before this boot (a
    power cut, a crash): pids start again at boot, so whoever has that pid now never wrote it.
    """
    if idle > TMP_STALE_AFTER:
        return True
    m = _SPOOL_NAME.fullmatch(name)
    if m is None or m.group(2) != hostname:
        return False
    return before_boot or not alive(int(m.group(1)))


def _boot_time() -> float:
    """When this machine booted (Linux /proc/stat btime); 0 where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


def _writer_alive(pid: int) -> bool:
    """May process `pid` still be writing a file in tmp/?"""
    if pid == os.getpid():
        # Called before this process writes anything: the file is a leftover of an earlier
        # process that had the same pid (a container's pid 1, say).
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


@dataclass
class SpoolFile:
    """A message's file in tmp/ and its way into new/. Blocking: every method runs on a commit
    thread, and only ever one at a time (`Spool` sees to that), so this object alone opens,
    writes and closes its descriptor.
    """

    tmp: str | Path
    targets: Sequence[str | Path]
    dirsync: DirSync
    fd: int = -1
    done: bool = False  # committed or aborted: nothing left to do
    newdirs: list[Path] | None = None  # the targets' directories (None: their parents)
    _placed: list[str | Path] = field(default_factory=list)  # in new/ (or the queue) so far

    def append(self, data: bytes) -> None:
        if self.fd < 0:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def place(self, data: bytes) -> list[Path]:
        """Append `data`, fdatasync the file, move it into every new/ (hard links for all but
        the last, which takes the tmp/ name by rename). Returns the directories whose fsync
        makes the message durable. On OSError nothing is left behind and it propagates."""
        try:
            self.append(data)
            # The data and what reading it back needs (size, blocks); the directory entry is
            # made durable by the new/ fsync that follows. Cheaper than fsync (no timestamps).
            os.fdatasync(self.fd)
            fd, self.fd = self.fd, -1
            os.close(fd)
            *linked, last = self.targets
            for target in linked:
                os.link(self.tmp, target)
                self._placed.append(target)
            os.rename(self.tmp, last)
            self._placed.append(last)
        except OSError:
            self.unplace()
            raise
        return list(dict.fromkeys(self.newdirs or [Path(t).parent for t in self.targets]))

    def unplace(self) -> None:
        """Remove what `place` put into new/ and the tmp/ file (a step failed: the caller
        answers 452 4.3.1, so the message must not be delivered anyway)."""
        for target in reversed(self._placed):
            _unlink_quietly(target)
        self._placed.clear()
        self.abort()

    def commit(self, data: bytes) -> None:
        """`commit_then`, waited for. On any failure every file placed in new/ is removed again
        and OSError propagates: the caller answers 452 4.3.1 and nothing is left behind."""
        _wait(lambda done: self.commit_then(data, done))

    def commit_then(self, data: bytes, done: Callable[[BaseException | None], None]) -> None:
        """`place`, then the fsyncs of its directories (one round of the DirSync thread):
        `done` is called once they have finished, or with the error after the clean-up."""
        try:
            dirs = self.place(data)
        except BaseException as exc:
            done(exc)
            return

        def synced(error: OSError | None) -> None:
            if error is not None:
                self.unplace()
            else:
                self.done = True
            done(error)

        self.dirsync.sync_then(dirs, synced)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        _unlink_quietly(self.tmp)


class Spool:
    """One message on its way to disk, as its session (on the event loop) sees it.

    The first SPOOL_BUFFER bytes are kept in memory (and counted in the session's ledger), so a
    typical small message is created, written, fsynced and linked in one call on a commit
    thread (`start_commit`). A larger one is written out each time the buffer fills (`buffer`
    says so, `flush_then` writes), and the session waits for that write before reading more
    from its client.

    Ownership: the event loop never touches the file. Each piece of file-system work is one
    job on the commit executor, and the session starts a job only when the previous one has
    finished. A commit cannot be split by cancellation: once started it runs to its end on
    its thread, and a session that ends any other way (`discard`) has its file removed by a
    job queued after whatever job is running.
    """

    def __init__(self, queue_id: str, file: SpoolFile, executor: ThreadPoolExecutor) -> None:
        self.queue_id = queue_id
        self.file = file
        self.size = 0
        self._executor = executor
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._writing = 0  # bytes handed to the running job
        self._job: Future[None] | None = None  # the latest job; None: the file does not exist
        self._finished = False  # commit or discard called: no more jobs from the session
        self.stored: asyncio.Future[None] | None = None  # the commit's outcome, once started
        self._gone: Future[None] | None = None  # done once a discarded file is removed

    @property
    def buffered(self) -> int:
        """Bytes of this message held in memory right now."""
        return self._pending_len + self._writing

    def buffer(self, data: bytes) -> bool:
        """Keep `data`; True when the buffer is full and `flush_then` is due."""
        self.size += len(data)
        self._pending.append(data)
        self._pending_len += len(data)
        return self._pending_len >= SPOOL_BUFFER

    def flush_then(self, done: Callable[[OSError | None], None]) -> None:
        """Write the buffer to the tmp/ file on a commit thread, then call `done` (on the
        event loop) with None or the OSError. No task and no future for the session to await:
        a 1 MiB message is sixteen of these."""
        loop = asyncio.get_running_loop()

        def written(job: Future[None]) -> None:  # on the commit thread
            # Cancelled: the executor was shut down with the write still queued.
            error = OSError(errno.ECANCELED, "write cancelled") if job.cancelled() else job.exception()
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(self._written, error, done)

        self._submit(self.file.append).add_done_callback(written)

    def _written(self, error: BaseException | None, done: Callable[[OSError | None], None]) -> None:
        self._writing = 0
        if error is not None and not isinstance(error, OSError):  # a bug: said, and a failure
            log.error("queue %s: write failed", self.queue_id, exc_info=error)
            error = OSError(errno.EIO, f"internal error: {error!r}")
        done(error)

    def start_commit(self) -> asyncio.Future[None]:
        """Write what is left, fsync and link the message (SpoolFile.commit_then), without
        waiting: its outcome (also kept as `stored`; OSError if not stored), which nothing can
        cancel (the commit runs on its thread to its end)."""
        self._finished = True
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:  # on the event loop
            if stored.done():
                return
            if error is None:
                stored.set_result(None)
            else:
                stored.set_exception(error)

        def done(error: BaseException | None) -> None:  # on a commit or the DirSync thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(settle, error)

        def commit(data: bytes) -> None:
            self.file.commit_then(data, done)

        self.stored = stored
        self._submit(commit)
        return stored

    def discard(self) -> None:
        """The message will not be committed: drop it, and its file once no job is using it."""
        if self._finished:
            return  # committing (the commit cleans up after itself), or discarded already
        self._finished = True
        self._pending, self._pending_len = [], 0
        if self._job is not None:  # else no job ever ran: there is no file
            self._gone = Future()
            # Runs on the finishing job's thread, or here at once if it has finished.
            self._job.add_done_callback(self._abort_after)

    async def discarded(self) -> None:
        """Return once a discarded message's file is gone (at once if it never had one)."""
        if self._gone is not None:
            await asyncio.shield(asyncio.wrap_future(self._gone))

    def _abort_after(self, _job: Future[None]) -> None:
        gone = self._gone
        assert gone is not None
        try:
            abort = self._executor.submit(self.file.abort)
        except RuntimeError:  # the interpreter is exiting: the next start-up removes the file
            gone.set_result(None)
            return
        abort.add_done_callback(lambda _: gone.set_result(None))

    def _submit(self, job: Callable[[bytes], None]) -> Future[None]:
        assert self._job is None or self._job.done(), "one job at a time"
        data = b"".join(self._pending)
        self._pending, self._pending_len = [], 0
        self._writing = len(data)
        self._job = self._executor.submit(job, data)
        return self._job


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, exc.strerror)
