"""Durable commits on a real filesystem: group commit of directory fsyncs, rename into new/."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from elemta.store import maildir
from elemta.store.maildir import DirSync, Mailbox, Maildir


def test_one_fsync_serves_every_commit_queued_behind_it(tmp_path: Path) -> None:
    sync = DirSync()
    sync.sync(tmp_path)  # creates the directory's state
    assert sync.fsyncs == 1
    state = sync._dirs[tmp_path]
    done: list[int] = []
    with state.syncing:  # an fsync "in progress": ten commits arrive and queue behind it
        threads = [threading.Thread(target=lambda: (sync.sync(tmp_path), done.append(1)))
                   for _ in range(10)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while state.entered < 11 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.entered == 11 and not done
    for t in threads:
        t.join(10)
    assert len(done) == 10
    assert sync.fsyncs == 2  # the first in line fsynced once for all ten


def test_a_failed_fsync_is_retried_by_the_next_commit(tmp_path: Path) -> None:
    sync = DirSync()
    missing = tmp_path / "gone"
    with pytest.raises(OSError):
        sync.sync(missing)
    missing.mkdir()
    sync.sync(missing)
    assert sync.fsyncs == 1
    assert sync._dirs[missing].synced == 2


def deliver(store: Maildir, boxes: list[Mailbox], header: bytes, qid: str,
            body: bytes = b"", before_commit: Callable[[], object] = lambda: None) -> None:
    """One message through the session's path: open, write, commit (on the store's threads)."""

    async def run() -> None:
        spool = await store.open(boxes, header, qid)
        try:
            await spool.write(body)
            before_commit()
            await spool.commit()
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


def test_per_mailbox_memos_stay_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "MEMO_LIMIT", 3)
    store = Maildir(tmp_path, "mx.test")
    for i in range(6):
        deliver(store, [Mailbox("a.test", f"u{i}")], b"H: 1\n", f"Q{i}")
    assert len(store._ready) <= 3 and len(store.dirsync._dirs) <= 3
    # A forgotten mailbox is simply checked and synced again.
    deliver(store, [Mailbox("a.test", "u0")], b"H: 2\n", "QX")
    assert len(list((store.mailbox_dir(Mailbox("a.test", "u0")) / "new").iterdir())) == 2
    store.executor.shutdown()
