"""Durable commits on a real filesystem: group commit of directory fsyncs, rename into new/."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from elemta.store import maildir
from elemta.store.maildir import DirSync, Mailbox, Maildir


def test_one_fsync_serves_every_commit_queued_behind_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = DirSync()
    real = maildir.fsync_dir
    in_fsync, release = threading.Event(), threading.Event()

    def slow_first(path: Path) -> None:  # the first fsync is "in progress" until released
        if not in_fsync.is_set():
            in_fsync.set()
            assert release.wait(10)
        real(path)

    monkeypatch.setattr(maildir, "fsync_dir", slow_first)
    first = threading.Thread(target=sync.sync, args=(tmp_path,))
    first.start()
    assert in_fsync.wait(10)
    # Ten commits arrive during that fsync: it began before them, so it cannot cover them.
    heard: list[OSError | None] = []
    for _ in range(10):
        sync.sync_then([tmp_path], heard.append)
    time.sleep(0.2)
    assert heard == []
    release.set()
    first.join(10)
    deadline = time.monotonic() + 10
    while len(heard) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard == [None] * 10
    assert sync.fsyncs == 2  # the next round fsynced once for all ten


def test_a_message_in_two_directories_hears_once_after_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = DirSync()
    synced: list[Path] = []
    real = maildir.fsync_dir

    def record(path: Path) -> None:
        real(path)
        synced.append(path)

    monkeypatch.setattr(maildir, "fsync_dir", record)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    heard: list[tuple[OSError | None, list[Path]]] = []
    done = threading.Event()
    # b does not exist: its fsync fails, and the message hears that error, once, after a's.
    sync.sync_then([a, b, a], lambda error: (heard.append((error, list(synced))), done.set()))
    assert done.wait(10)
    time.sleep(0.1)
    assert len(heard) == 1
    error, before = heard[0]
    assert isinstance(error, FileNotFoundError) and before == [a]


def test_a_failed_fsync_is_retried_by_the_next_commit(tmp_path: Path) -> None:
    sync = DirSync()
    missing = tmp_path / "gone"
    with pytest.raises(OSError):
        sync.sync(missing)
    missing.mkdir()
    sync.sync(missing)
    assert sync.fsyncs == 1


def test_the_sync_thread_exits_when_idle_and_comes_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DirSync, "IDLE", 0.1)
    sync = DirSync()
    sync.sync(tmp_path)
    thread = sync._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive() and sync._thread is None
    sync.sync(tmp_path)
    assert sync.fsyncs == 2


def deliver(store: Maildir, boxes: list[Mailbox], header: bytes, qid: str,
            body: bytes = b"", before_commit: Callable[[], object] = lambda: None) -> None:
    """One message through the session's path: open, buffer (written out when full), commit
    (on the store's threads)."""

    async def run() -> None:
        spool = await store.open(boxes, header, qid)
        try:
            if spool.buffer(body):
                written: asyncio.Future[OSError | None] = asyncio.get_running_loop().create_future()
                spool.flush_then(written.set_result)
                error = await written
                if error is not None:
                    raise error
            before_commit()
            await spool.start_commit()
        finally:
            spool.discard()

    asyncio.run(run())


def test_commit_moves_the_file_into_every_new_dir(tmp_path: Path) -> None:
    store = Maildir(tmp_path, "mx.test")
    boxes = [Mailbox("a.test", "x"), Mailbox("a.test", "y"), Mailbox("b.test", "x")]
    deliver(store, boxes, b"Header: 1\n", "ABC", b"\nbody\n")
    for box in boxes:
        base = store.mailbox_dir(box)
        files = list((base / "new").iterdir())
        assert [f.read_bytes() for f in files] == [b"Header: 1\n\nbody\n"]
        assert not list((base / "tmp").iterdir())
    assert store.dirsync.fsyncs >= 3  # three new/ directories, each fsynced
    store.executor.shutdown()


def test_failed_commit_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Maildir(tmp_path, "mx.test")
    boxes = [Mailbox("a.test", "x"), Mailbox("a.test", "y")]
    # The second mailbox's new/ vanishes before the commit.
    with pytest.raises(OSError):
        deliver(store, boxes, b"H: 1\n", "DEF",
                before_commit=(store.mailbox_dir(boxes[1]) / "new").rmdir)
    for box in boxes:
        for sub in ("tmp", "new"):
            d = store.mailbox_dir(box) / sub
            assert not d.exists() or not list(d.iterdir())
    store.executor.shutdown()


def test_failed_directory_sync_takes_the_message_back_out_of_new(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The session's path (Spool.commit -> commit_then -> the DirSync thread): an fsync of new/
    # that fails (EIO) fails the commit (452) and removes the links already made, so a
    # message the client will send again is not delivered twice.
    store = Maildir(tmp_path, "mx.test")
    boxes = [Mailbox("a.test", "x"), Mailbox("b.test", "y")]
    deliver(store, boxes, b"H: 0\n", "OK0")  # mailboxes made, with one message each

    def eio(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(maildir, "fsync_dir", eio)
    with pytest.raises(OSError, match="Input/output"):
        deliver(store, boxes, b"H: 1\n", "EIO")
    for box in boxes:
        base = store.mailbox_dir(box)
        assert [f.read_bytes() for f in (base / "new").iterdir()] == [b"H: 0\n"]
        assert not list((base / "tmp").iterdir())
    store.executor.shutdown()


def test_per_mailbox_memos_stay_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "MEMO_LIMIT", 3)
    store = Maildir(tmp_path, "mx.test")
    for i in range(6):
        deliver(store, [Mailbox("a.test", f"u{i}")], b"H: 1\n", f"Q{i}")
    assert len(store._ready) <= 3
    # A forgotten mailbox is simply checked and synced again.
    deliver(store, [Mailbox("a.test", "u0")], b"H: 2\n", "QX")
    assert len(list((store.mailbox_dir(Mailbox("a.test", "u0")) / "new").iterdir())) == 2
    store.executor.shutdown()


def test_queue_ids_differ_between_forked_processes() -> None:
    """Workers are forked from the supervisor: each must draw its own queue ids (the queue's
    file names), not repeat the parent's sequence."""
    from elemta.store.maildir import new_queue_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, " ".join(new_queue_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        child = f.read().split()
    mine = [new_queue_id() for _ in range(3)]
    assert len(child) == 3 and all(len(q) == 12 for q in child + mine)
    assert set(child).isdisjoint(mine)
