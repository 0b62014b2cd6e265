"""No file-system call on the event loop: mailbox creation, spool open, writes and fsyncs all
run on the store's commit threads, while the real SMTP server serves a real client.

The server runs in this process (so the calls can be watched); the client is smtplib in a
thread, over loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from elemta.config import DeliveryConfig, build
from elemta.smtp.server import SmtpContext, session_factory
from elemta.store.maildir import SPOOL_BUFFER, Maildir

WATCHED = ("mkdir", "open", "write", "fsync", "fdatasync", "link", "rename", "unlink", "close")


@dataclasses.dataclass
class Calls:
    """(call, thread name) of every watched os call made while the server runs."""

    seen: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def on(self, thread: str) -> list[str]:
        return [name for name, t in self.seen if t == thread]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    record = Calls()

    def watch(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kw: Any) -> Any:
            with record.lock:
                record.seen.append((name, threading.current_thread().name))
            return real(*args, **kw)
        return wrapper

    for name in WATCHED:
        monkeypatch.setattr(os, name, watch(name, getattr(os, name)))
    yield record


def config(root: Path, **server: Any) -> Any:
    delivery: dict[str, Any] = {"maildir_root": str(root), "domains": ["example.test"]}
    if "recipients" in {f.name for f in dataclasses.fields(DeliveryConfig)}:
        delivery["recipients"] = "any"  # this test is about new mailboxes: accept any user
    return build({"server": {"hostname": "mx.test", **server}, "delivery": delivery})


def serve(root: Path, client: Callable[[int], None], store: Maildir | None = None,
          **server: Any) -> str:
    """Run the SMTP server on a fresh loop in this thread until `client(port)` returns;
    returns the loop thread's name."""
    cfg = config(root, **server)
    store = store or Maildir(root, "mx.test")

    async def main() -> str:
        loop = asyncio.get_running_loop()
        ctx = SmtpContext(cfg, store)
        server = await loop.create_server(session_factory(ctx), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        done: Future[None] = Future()
        threading.Thread(target=lambda: _run_into(done, client, port), name="client").start()
        await asyncio.wrap_future(done)
        server.close()
        await server.wait_closed()
        return threading.current_thread().name

    try:
        return asyncio.run(main())
    finally:
        store.executor.shutdown()


def _run_into(done: Future[None], client: Callable[[int], None], port: int) -> None:
    try:
        client(port)
        done.set_result(None)
    except BaseException as exc:
        done.set_exception(exc)


def message(size: int) -> bytes:
    line = b"y" * 70 + b"\r\n"
    return b"Subject: loop\r\n\r\n" + line * (size // len(line))


def test_no_file_system_call_on_the_event_loop(tmp_path: Path, calls: Calls) -> None:
    big = message(200 * 1024)
    assert len(big) > 3 * SPOOL_BUFFER  # opened and written out before the final dot

    def client(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            assert not s.sendmail("s@example.org", ["fresh@example.test"], big)

    loop_thread = serve(tmp_path / "mail", client)
    files = list((tmp_path / "mail" / "example.test" / "fresh" / "new").iterdir())
    assert len(files) == 1 and files[0].read_bytes().endswith(big.replace(b"\r\n", b"\n"))
    on_loop = calls.on(loop_thread)
    assert not on_loop, f"file-system calls on the event loop: {sorted(set(on_loop))}"
    elsewhere = {name for name, thread in calls.seen
                 if thread.startswith(("commit", "elemta-dirsync"))}
    assert {"mkdir", "open", "write", "fsync", "fdatasync", "rename"} <= elsewhere, elsewhere


def test_a_small_message_to_a_known_mailbox_is_one_commit_job(tmp_path: Path,
                                                              calls: Calls) -> None:
    """The fast path: written, fsynced and linked in one job; no round trip per write."""
    jobs: list[str] = []

    def client(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("s@example.org", ["known@example.test"], message(1000))  # new mailbox
            jobs.clear()
            for _ in range(3):
                assert not s.sendmail("s@example.org", ["known@example.test"], message(20_000))

    class Counting(ThreadPoolExecutor):
        def submit(self, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> Any:
            jobs.append(getattr(fn, "__name__", repr(fn)))
            return super().submit(fn, *args, **kw)

    root = tmp_path / "mail"
    serve(root, client, Maildir(root, "mx.test", executor=Counting(4)))
    assert jobs == ["commit", "commit", "commit"]
    assert len(list((root / "example.test" / "known" / "new").iterdir())) == 4


def test_a_refused_message_is_gone_before_the_reply(tmp_path: Path) -> None:
    """The file of a message refused after it reached disk is removed on a commit thread; the
    reply waits for that, so "nothing is left behind" holds when the client reads it."""
    aborted: list[object] = []

    class SlowDisk(ThreadPoolExecutor):  # an unlink that takes a while, as on a busy disk
        def submit(self, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> Any:
            if getattr(fn, "__name__", "") == "abort":
                aborted.append(fn)

                def slow() -> None:
                    time.sleep(0.3)
                    fn()
                return super().submit(slow)
            return super().submit(fn, *args, **kw)

    root = tmp_path / "mail"
    tmp = root / "example.test" / "big" / "tmp"
    left: list[list[Path]] = []

    def client(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("s@example.org")  # no SIZE=: the size is found out during DATA
            s.rcpt("big@example.test")
            code, _ = s.data(message(200 * 1024))
            assert code == 552
            left.append(list(tmp.iterdir()))
        assert aborted  # the message did reach the disk before it was refused

    serve(root, client, Maildir(root, "mx.test", executor=SlowDisk(4)),
          max_message_size=160 * 1024)
    assert left == [[]]


def test_a_write_failing_mid_data_is_never_a_truncated_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One write of a large message fails (a transient EIO, a disk full for a moment) and the
    rest, the commit included, would succeed: the message is refused with a temporary
    failure, never stored without the failed piece; the session goes on serving."""
    from elemta.store.maildir import SpoolFile

    real = SpoolFile.append
    failed: list[int] = []

    def append(self: SpoolFile, data: bytes) -> None:
        if not failed:
            failed.append(len(data))
            raise OSError(5, "Input/output error")
        real(self, data)

    monkeypatch.setattr(SpoolFile, "append", append)
    big = message(200 * 1024)
    replies: list[int] = []

    def client(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("s@example.org")
            s.rcpt("box@example.test")
            replies.append(s.data(big)[0])
            assert not s.sendmail("s@example.org", ["box@example.test"], message(1000))

    root = tmp_path / "mail"
    serve(root, client)
    assert failed and replies and 400 <= replies[0] < 500
    stored = list((root / "example.test" / "box" / "new").iterdir())
    assert len(stored) == 1 and len(stored[0].read_bytes()) < 2000  # only the second one
    assert list((root / "example.test" / "box" / "tmp").iterdir()) == []
