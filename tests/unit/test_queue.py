"""The queue's pure decisions, its on-disk records and the delivery manager, with in-test
transports (scripted per-recipient replies, one that hangs, one that raises): the edge cases a
real LMTP server will not produce on demand. The daemon-level tests are in
tests/integration/test_queue_daemon.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from elemta import config
from elemta.delivery.base import Envelope, RecipientResult, Reply
from elemta.memory.governor import delivery_concurrency
from elemta.memory.snapshot import BreakerState, MemoryState
from elemta.queue import policy, routing
from elemta.queue.local import CrlfToLf
from elemta.queue.manager import Manager
from elemta.queue.store import Meta, QueueFile, QueueStore, Recipient, stale_tmp
from elemta.store import maildir

S = policy.Backoff(300, 4000, 5 * 86400)


# -- pure decisions -------------------------------------------------------------------------
def test_backoff_doubles_from_minimal_to_maximal_with_downward_jitter() -> None:
    rng = random.Random(1)
    for attempts, base in [(1, 300), (2, 600), (3, 1200), (4, 2400), (5, 4000), (30, 4000),
                           (10_000, 4000)]:
        delays = [policy.backoff_delay(attempts, S, rng) for _ in range(200)]
        assert all(max(300, base * (1 - policy.JITTER)) <= d <= base for d in delays), attempts
        if base > 300:
            assert len(set(delays)) > 100  # jittered, not one value


def test_first_retry_is_minimal_backoff() -> None:
    assert policy.next_attempt(1, 1000.0, S, random.Random(0)) == 1300.0


def test_expired_and_outcome() -> None:
    assert not policy.expired(0, 5 * 86400 - 1, 5 * 86400)
    assert policy.expired(0, 5 * 86400, 5 * 86400)
    assert [policy.outcome(c) for c in (250, 251, 421, 452, 550, 552)] == [
        "delivered", "delivered", "pending", "pending", "failed", "failed"]


def test_buckets_are_never_early() -> None:
    for when in (0.0, 0.5, 9.99, 10.0, 10.01, 1e9 + 3.3):
        b = policy.bucket_of(when)
        due = b * policy.BUCKET  # the bucket is opened then: not before `when`, < BUCKET after
        assert when <= due < when + policy.BUCKET
        assert policy.due_buckets([b], due) == [b]
        assert policy.due_buckets([b], due - 0.001) == []


def test_governor_decides_delivery_concurrency() -> None:
    assert delivery_concurrency(MemoryState.NORMAL, BreakerState.CLOSED, 20) == 20
    assert delivery_concurrency(MemoryState.WARNING, BreakerState.CLOSED, 20) == 10
    assert delivery_concurrency(MemoryState.WARNING, BreakerState.CLOSED, 1) == 1
    assert delivery_concurrency(MemoryState.CRITICAL, BreakerState.CLOSED, 20) == 0
    assert delivery_concurrency(MemoryState.NORMAL, BreakerState.OPEN, 20) == 0
    assert delivery_concurrency(MemoryState.NORMAL, BreakerState.HALF_OPEN, 20) == 20


@pytest.mark.parametrize("spec", ["maildir", "lmtp:unix:/run/dovecot/lmtp", "lmtp:127.0.0.1:24",
                                  "lmtp:dovecot.example",
                                  "lmtp:[::1]:24", "lmtp:mail.example.org:2424"])
def test_transport_specs(spec: str) -> None:
    assert config.build({"delivery": {"transport": spec}}).delivery.transport == spec


@pytest.mark.parametrize(("spec", "problem"), [
    ("ftp:x:25", "must be \"maildir\""), ("smtp:x:25", "write the next hop in brackets"),
    ("lmtp:unix:run/lmtp", "absolute"),
    ("lmtp:host:x", "port must be a number"), ("lmtp:host:0", "from 1 to 65535"),
    ("lmtp:[fe::1::2]:24", "IPv6"), ("lmtp:bad_host:24", "host name"),
    ("lmtp:unix:/a\nb", "control character"), (24, "expected a transport string"),
])
def test_bad_transport_is_one_line(spec: object, problem: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.build({"delivery": {"transport": spec}}, "q.toml")
    (line,) = exc.value.problems
    assert line.startswith("q.toml: [delivery] transport: ") and problem in line, line


def test_routes_from_array_of_tables(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[delivery]\ndomains = ["a.test", "b.test"]\ntransport = "lmtp:127.0.0.1:24"\n'
                    '[[delivery.route]]\ndomain = "B.test"\ntransport = "maildir"\n')
    cfg = config.load(path)
    assert cfg.delivery.route == (routing.Route("b.test", "maildir"),)
    assert routing.transport_for("b.test", cfg.delivery.transport, cfg.delivery.route) == "maildir"
    assert routing.transport_for("a.test", cfg.delivery.transport, cfg.delivery.route) == \
        "lmtp:127.0.0.1:24"
    assert config.load(path) == config.build(
        __import__("tomllib").loads(config.to_toml(cfg)), str(path))


@pytest.mark.parametrize(("routes", "problem"), [
    ([{"domain": "elsewhere.test", "transport": "maildir"}], "not one of [delivery] domains"),
    ([{"domain": "a.test", "transport": "maildir"}] * 2, "routed twice"),
    ([{"domain": "a.test"}], "exactly the keys"),
    ([{"domain": "a.test", "transport": "maildir", "x": 1}], "unknown: 'x'"),
    ([{"domain": "a.test", "transport": "ftp:x"}], "route 1: must be \"maildir\""),
])
def test_bad_routes_are_one_line(routes: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.build({"delivery": {"domains": ["a.test"], "route": routes}}, "q.toml")
    (line,) = exc.value.problems
    assert line.startswith("q.toml: [delivery] route: ") and problem in line, line


def test_queued_transport_runs_with_workers() -> None:
    # The supervisor hosts the delivery manager (test_queue_workers.py): workers > 1 is fine.
    cfg = config.build({"delivery": {"transport": "lmtp:127.0.0.1:24"}, "server": {"workers": 2}})
    assert cfg.server.workers == 2


def test_crlf_to_lf_across_chunk_boundaries() -> None:
    data = b"a\r\nb\r\r\nc\rd\r\n" * 50
    for size in (1, 2, 3, 7, 64):
        conv = CrlfToLf()
        out = b"".join(conv.feed(data[i:i + size]) for i in range(0, len(data), size)) + conv.end()
        assert out == data.replace(b"\r\n", b"\n"), size


# -- records on disk ------------------------------------------------------------------------
def meta(qid: str = "0123456789AB", rcpts: Sequence[tuple[str, str]] = (("a@x.test", "t1"),),
         created: float = 1000.0) -> Meta:
    return Meta(qid, "s@x.test", created, 5, [Recipient(a, t) for a, t in rcpts])


def make_store(tmp_path: Path) -> QueueStore:
    store = QueueStore(tmp_path / "q")
    store.init()
    return store


def put(store: QueueStore, m: Meta, body: bytes = b"hi\r\n") -> Path:
    store.body(m.id).write_bytes(body)
    return store.write(m, "incoming")


def test_state_changes_move_the_record_and_a_leftover_loses_to_the_newer(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    m = meta()
    first = put(store, m)
    saved = first.read_bytes()
    m.next_attempt = 5000.0
    second = store.write(m, "deferred", first)
    assert not first.exists() and second.parent.name == str(policy.bucket_of(5000.0))
    # A crash between the rename and the unlink: the old record is still there.
    first.write_bytes(saved)
    state, path = store.locate(m.id) or ("", Path())
    assert (state, path) == ("deferred", second)
    assert json.loads(second.read_bytes())["seq"] == 2
    assert not list((store.root / "tmp").iterdir())


def test_due_lists_incoming_then_due_buckets_only(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    ids = [f"{n:012X}" for n in range(5)]
    put(store, meta(ids[0]))
    for qid, when in zip(ids[1:], (100.0, 200.0, 5000.0, 90000.0), strict=True):
        m = meta(qid)
        m.next_attempt = when
        store.write(m, "deferred", put(store, m))
    assert [p.name for p in store.due(300.0, 10, frozenset())] == ids[:3]
    assert [p.name for p in store.due(300.0, 2, frozenset())] == ids[:2]
    assert [p.name for p in store.due(300.0, 10, frozenset({ids[0]}))] == ids[1:3]
    assert [p.name for p in store.due(1e6, 10, frozenset())] == ids
    c = store.census()
    assert c.messages == {"incoming": 1, "deferred": 4, "hold": 0, "failed": 0}
    assert c.bytes == 5 * 4


# -- the manager, with in-test transports ---------------------------------------------------
class Scripted:
    """Replies per recipient from a script; records what it was asked; may hang or raise."""

    name = "fake"

    def __init__(self, replies: dict[str, Reply] | None = None, hang: asyncio.Event | None = None,
                 raises: bool = False) -> None:
        self.replies = replies or {}
        self.calls: list[Envelope] = []
        self.hang = hang
        self.raises = raises
        self.running = 0
        self.peak = 0

    async def deliver(self, envelope: Envelope) -> Sequence[RecipientResult]:
        self.calls.append(envelope)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            assert envelope.body.read_bytes() == b"hi\r\n"
            if self.hang is not None:
                await self.hang.wait()
            if self.raises:
                raise RuntimeError("transport bug")
            return [RecipientResult(r, self.replies.get(r, Reply(250, "2.0.0 ok")), "fake[1]")
                    for r in envelope.recipients]
        finally:
            self.running -= 1

    async def close(self) -> None:
        pass


def make_manager(tmp_path: Path, transports: dict[str, Scripted], now: list[float],
                 limit: Callable[[], int] = lambda: 20, **delivery: object
                 ) -> tuple[Manager, QueueStore]:
    store = make_store(tmp_path)
    cfg = config.Config()
    cfg = dataclasses.replace(cfg, delivery=dataclasses.replace(cfg.delivery, **delivery))
    mgr = Manager(cfg, store, lambda spec: transports[spec], limit,
                  ThreadPoolExecutor(4), rng=random.Random(0), clock=lambda: now[0])
    assert mgr.lock.try_acquire()  # what start() waits for; the tests drive the loop by hand
    return mgr, store


async def settle(mgr: Manager) -> None:
    """Run the scheduler until nothing is active (or a test's hang holds it)."""
    for _ in range(500):
        mgr.limit = mgr._concurrency()
        await mgr._fill()
        if not mgr.active and not mgr._jobs:  # nothing due was left to take
            return
        mgr._pump()
        await asyncio.sleep(0.001)
    raise AssertionError(f"still active: {list(mgr.active)}")


def test_per_recipient_results_decide_each_recipients_state(tmp_path: Path) -> None:
    t = Scripted({"b@x.test": Reply(451, "4.2.0 try later"), "c@x.test": Reply(550, "5.1.1 no")})
    now = [1000.0]
    mgr, store = make_manager(tmp_path, {"t1": t}, now)
    m = meta(rcpts=[("a@x.test", "t1"), ("b@x.test", "t1"), ("c@x.test", "t1")])
    put(store, m)

    async def go() -> None:
        await settle(mgr)

    asyncio.run(go())
    assert len(t.calls) == 1 and t.calls[0].recipients == ("a@x.test", "b@x.test", "c@x.test")
    state, path = store.locate(m.id) or ("", Path())
    assert state == "deferred"
    rec = store.read(path)
    assert [(r.state, r.reply) for r in rec.recipients] == [
        ("delivered", "250 2.0.0 ok"), ("pending", "451 4.2.0 try later"),
        ("failed", "550 5.1.1 no")]
    assert rec.attempts == 1 and rec.next_attempt == 1300.0
    assert path.parent.name == str(policy.bucket_of(1300.0))

    # Due again: only the deferred recipient is tried; it is delivered; the message, with one
    # failed recipient, goes to failed/ for the admin.
    t.replies.clear()
    now[0] = 1310.0
    asyncio.run(go())
    assert t.calls[1].recipients == ("b@x.test",)
    state, path = store.locate(m.id) or ("", Path())
    assert state == "failed"
    assert [r.state for r in store.read(path).recipients] == ["delivered", "delivered", "failed"]
    assert store.body(m.id).exists()


def test_all_delivered_removes_record_and_body(tmp_path: Path) -> None:
    t = Scripted()
    mgr, store = make_manager(tmp_path, {"t1": t, "t2": t}, [1000.0])
    m = meta(rcpts=[("a@x.test", "t1"), ("b@y.test", "t2")])
    put(store, m)
    asyncio.run(settle(mgr))
    assert sorted(c.recipients for c in t.calls) == [("a@x.test",), ("b@y.test",)]
    assert store.locate(m.id) is None and not store.body(m.id).exists()


def test_still_deferred_at_lifetime_fails(tmp_path: Path) -> None:
    t = Scripted({"a@x.test": Reply(421, "4.3.2 down")})
    mgr, store = make_manager(tmp_path, {"t1": t}, [1000.0 + 5 * 86400])
    m = meta()
    put(store, m)
    asyncio.run(settle(mgr))
    state, path = store.locate(m.id) or ("", Path())
    assert state == "failed"
    assert store.read(path).recipients[0].state == "failed"


def test_a_raising_transport_defers_instead_of_losing(tmp_path: Path) -> None:
    t = Scripted(raises=True)
    mgr, store = make_manager(tmp_path, {"t1": t}, [1000.0])
    m = meta()
    put(store, m)
    asyncio.run(settle(mgr))
    state, path = store.locate(m.id) or ("", Path())
    assert state == "deferred"
    assert "internal error" in store.read(path).recipients[0].reply


def test_concurrency_limits_total_and_per_destination_and_pause(tmp_path: Path) -> None:
    async def go() -> None:
        hang = asyncio.Event()
        t1, t2 = Scripted(hang=hang), Scripted(hang=hang)
        limit = [0]
        mgr, store = make_manager(tmp_path, {"t1": t1, "t2": t2}, [1000.0],
                                  limit=lambda: limit[0], concurrency=3,
                                  destination_concurrency=2)
        for n in range(10):
            put(store, meta(f"{n:012X}", [("a@x.test", "t1" if n % 2 else "t2")]))
        mgr.limit = limit[0]
        await mgr._fill()  # paused: nothing taken, nothing started
        mgr._pump()
        assert not mgr.active and t1.running == t2.running == 0
        limit[0] = mgr.limit = 3
        await mgr._fill()
        mgr._pump()
        await asyncio.sleep(0.01)
        assert t1.running + t2.running == 3 and max(t1.running, t2.running) == 2
        hang.set()
        await settle(mgr)
        assert len(t1.calls) == len(t2.calls) == 5
        assert t1.peak <= 2 and t2.peak <= 2
        assert store.census().messages == {"incoming": 0, "deferred": 0, "hold": 0, "failed": 0}

    asyncio.run(go())


def test_active_set_is_bounded(tmp_path: Path) -> None:
    async def go() -> None:
        hang = asyncio.Event()
        t = Scripted(hang=hang)
        mgr, store = make_manager(tmp_path, {"t1": t}, [1000.0], active_limit=4)
        for n in range(10):
            put(store, meta(f"{n:012X}"))
        mgr.limit = 20
        await mgr._fill()
        await mgr._fill()
        assert len(mgr.active) == 4
        hang.set()
        await settle(mgr)
        assert len(t.calls) == 10

    asyncio.run(go())


def test_admin_verbs(tmp_path: Path) -> None:
    async def go() -> None:
        t = Scripted({"a@x.test": Reply(451, "4.0.0 later")})
        now = [1000.0]
        mgr, store = make_manager(tmp_path, {"t1": t}, now)
        a, b = meta("00000000000A"), meta("00000000000B")
        put(store, a)
        put(store, b)
        assert await mgr.act("hold", b.id) == f"{b.id}: on hold"
        await settle(mgr)
        assert len(t.calls) == 1  # b held, not tried
        assert (await mgr.show(a.id) or {})["state"] == "deferred"
        assert (await mgr.show(b.id) or {})["state"] == "hold"
        listing = await mgr.listing()
        assert listing["total"] == 2
        assert {m["id"]: m["state"] for m in listing["messages"]} == {a.id: "deferred",
                                                                        b.id: "hold"}
        assert await mgr.act("flush", None) == "1 deferred message(s) scheduled now"
        assert (await mgr.show(a.id) or {})["state"] == "incoming"
        with pytest.raises(ValueError):
            await mgr.act("release", a.id)
        assert await mgr.act("release", b.id) == f"{b.id}: scheduled now"
        assert await mgr.act("delete", a.id) == f"{a.id}: deleted"
        assert await mgr.show(a.id) is None and not store.body(a.id).exists()
        with pytest.raises(KeyError):
            await mgr.act("delete", a.id)
        with pytest.raises(KeyError):
            await mgr.act("delete", "../../etc")
        await settle(mgr)
        assert t.calls[-1].queue_id == b.id

    asyncio.run(go())


def test_restart_resumes_from_disk(tmp_path: Path) -> None:
    """A manager that dies mid-delivery (its record untouched) leaves the message due: a new
    manager on the same directory delivers it."""
    async def first() -> None:
        hang = asyncio.Event()
        t = Scripted(hang=hang)
        mgr, store = make_manager(tmp_path, {"t1": t}, [1000.0])
        put(store, meta())
        mgr.limit = 20
        await mgr._fill()
        mgr._pump()
        await asyncio.sleep(0.01)
        assert t.running == 1
        # the process dies here: nothing more is written, the kernel drops its lock
        mgr.lock.release()

    asyncio.run(first())
    shutil.rmtree(tmp_path / "q" / "tmp")
    t = Scripted()
    mgr, store = make_manager(tmp_path, {"t1": t}, [1000.0])
    asyncio.run(settle(mgr))
    assert len(t.calls) == 1 and store.locate("0123456789AB") is None


def test_flush_leaves_a_message_being_delivered_alone(tmp_path: Path) -> None:
    """Its record is in a deferred/ bucket while it is delivered: moving it to incoming/ would
    leave a second record after the delivery is written (and a second delivery)."""
    async def go() -> None:
        t = Scripted({"a@x.test": Reply(451, "4.0.0 later")})
        now = [1000.0]
        mgr, store = make_manager(tmp_path, {"t1": t}, now)
        put(store, meta())
        await settle(mgr)  # deferred, in a bucket
        now[0] = 2000.0
        t.hang = asyncio.Event()
        mgr.limit = 20
        await mgr._fill()
        mgr._pump()
        await asyncio.sleep(0.01)
        assert t.running == 1
        assert await mgr.act("flush", None) == "0 deferred message(s) scheduled now"
        t.hang.set()
        await settle(mgr)
        assert [s for s, _ in store.records()] == ["deferred"]

    asyncio.run(go())


def test_lmtp_transport_with_maildir_recipients_is_warned_about() -> None:
    cfg = config.build({"delivery": {"transport": "lmtp:127.0.0.1:24"}}, "w.toml")
    assert any("recipients = \"lmtp\" asks the server" in w for w in config.warnings(cfg))
    cfg = config.build({"delivery": {"transport": "lmtp:127.0.0.1:24", "recipients": "lmtp"}})
    assert not any("asks the server" in w for w in config.warnings(cfg))


def test_stale_tmp_spares_files_a_live_writer_may_finish() -> None:
    me = os.getpid()
    alive = {me, 4242}.__contains__
    assert stale_tmp("0123456789AB.999999.body", 0.0, 10.0, alive)  # its writer is gone
    assert not stale_tmp("0123456789AB.4242.body", 0.0, 10.0, alive)  # another live process
    assert stale_tmp(f"0123456789AB.{me}.meta", 5.0, 10.0, alive)  # ours, from before our start
    assert not stale_tmp(f"0123456789AB.{me}.meta", 11.0, 10.0, alive)  # ours, being written


def test_orphans_are_old_bodies_without_a_record_in_any_state(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    held, later, due = meta("00000000000A"), meta("00000000000B"), meta("00000000000C")
    for m in (held, later, due):
        put(store, m)
    store.write(held, "hold", store.path("incoming", held.id))
    later.next_attempt = 5000.0
    store.write(later, "deferred", store.path("incoming", later.id))
    for qid in ("00000000000D", "00000000000E", "00000000000F"):
        store.body(qid).write_bytes(b"lost\r\n")
    old = time.time() - 7200
    for entry in (store.root / "body").iterdir():
        os.utime(entry, (old, old))
    store.body("00000000000F").touch()  # fresh: may be a commit in flight
    # batch=2: old bodies are checked against the records a few at a time.
    assert sorted(store.orphans(time.time() - 3600, batch=2)) == ["00000000000D", "00000000000E"]
    assert store.remove_orphans(["00000000000D", "00000000000E", "00000000000A"],
                                frozenset({"00000000000E"})) == ["00000000000D"]
    assert sorted(p.name for p in (store.root / "body").iterdir()) == [
        "00000000000A", "00000000000B", "00000000000C", "00000000000E", "00000000000F"]


def test_a_record_without_its_body_is_dropped_and_logged(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # What a crash may leave (store.py): the record's rename durable, the body's not (never
    # acknowledged), or the body's unlink durable and the record's not (already delivered).
    t = Scripted()
    mgr, store = make_manager(tmp_path, {"t1": t}, [1000.0])
    lost, kept = meta("00000000000A"), meta("00000000000B")
    put(store, lost)
    put(store, kept)
    store.body(lost.id).unlink()
    asyncio.run(settle(mgr))
    assert [c.queue_id for c in t.calls] == [kept.id]
    assert store.locate(lost.id) is None and store.locate(kept.id) is None
    assert "queue 00000000000A: record without a body removed" in caplog.text
    assert "to=a@x.test" in caplog.text


def test_accepting_syncs_then_places_body_before_record_and_leaves_nothing_on_error(
        tmp_path: Path) -> None:
    store = make_store(tmp_path)
    placed: list[str] = []
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        placed.append(Path(dst).parent.name)
        real_rename(src, dst)

    m = meta("00000000000C")
    f = queue_file(store, m)
    f.append(b"Subject: x\r\n\r\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "rename", rename)
        f.commit(b"body\r\n")
    assert placed == ["incoming"]  # the body is linked into body/ (place_body), never renamed
    assert store.read(store.path("incoming", m.id)).size == len(b"Subject: x\r\n\r\nbody\r\n")
    assert store.body(m.id).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert os.listdir(store.path("tmp")) == []

    # A failing directory sync (EIO, say) or fdatasync (the disk full of a delayed
    # allocation): no body, no record, no tmp/ file is left.
    def fails(errno: int, why: str) -> Callable[[object], None]:
        def raise_(_: object) -> None:
            raise OSError(errno, why)
        return raise_

    for qid, target, name, errno, why in (
            ("00000000000D", maildir, "fsync_dir", 5, "Input/output error"),
            ("00000000000E", os, "fdatasync", 28, "No space left on device")):
        f2 = queue_file(store, meta(qid))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(target, name, fails(errno, why))
            with pytest.raises(OSError):
                f2.commit(b"x\r\n")
        assert not store.body(qid).exists() and store.locate(qid) is None
        assert os.listdir(store.path("tmp")) == []


@pytest.mark.parametrize("writeback_works", [True, False])
def test_body_and_record_are_synced_on_one_thread_when_writeback_can_be_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback_works: bool) -> None:
    # sync_file_range on both, then two fdatasyncs here (store/writeback.py); where the kernel
    # or a seccomp filter refuses it, the two fdatasyncs run side by side as before. Either
    # way both files are fdatasynced before the renames.
    from elemta.store import writeback

    store = make_store(tmp_path)
    synced: list[int] = []
    real = os.fdatasync
    side_jobs: list[object] = []
    real_submit = store.side.submit

    def fdatasync(fd: int) -> None:
        real(fd)
        synced.append(fd)

    def submit(fn: Callable[..., object], /, *args: object) -> object:
        side_jobs.append(fn)
        return real_submit(fn, *args)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(store.side, "submit", submit)
    if not writeback_works:
        monkeypatch.setattr(writeback, "start", lambda fd: False)
    m = meta("00000000000F")
    queue_file(store, m).commit(b"Subject: x\r\n\r\nbody\r\n")
    assert len(synced) == 2 and len(set(synced)) == 2
    assert len(side_jobs) == (0 if writeback_works else 1)
    assert store.read(store.path("incoming", m.id)).size == len(b"Subject: x\r\n\r\nbody\r\n")


def queue_file(store: QueueStore, m: Meta) -> QueueFile:
    """A message's way into the queue, as intake.QueueIntake.open makes it."""
    return QueueFile(store.path("tmp", f"{m.id}.{os.getpid()}.body"), [], store.dirsync,
                     store=store, meta=m)


def test_the_queue_records_whether_a_body_holds_a_bare_lf(tmp_path: Path) -> None:
    # The delivering side skips the bare-LF check for a body recorded clean (Meta.crlf):
    # a CRLF split between two writes is clean, a LF alone in any write is not.
    store = make_store(tmp_path)
    for qid, pieces, clean in (("0000000000A1", [b"a\r", b"\nb\r\n"], True),
                               ("0000000000A2", [b"a\r\n", b"b\nc\r\n"], False),
                               ("0000000000A3", [b"a\r\n", b"\n"], False)):
        f = queue_file(store, meta(qid))
        for piece in pieces[:-1]:
            f.append(piece)
        f.commit(pieces[-1])
        assert store.read(store.path("incoming", qid)).crlf is clean, qid


def test_a_queue_id_drawn_twice_never_replaces_the_queued_message(tmp_path: Path) -> None:
    """Queue ids are 48 random bits: should a new message draw the id of one still queued,
    its commit fails (the client hears a 4xx and sends it again under a new id) and the
    queued message's body and record stay as they were."""
    store = make_store(tmp_path)
    first = meta("0000000000B1")
    queue_file(store, first).commit(b"Subject: first\r\n\r\nkept\r\n")
    second = queue_file(store, meta("0000000000B1"))
    with pytest.raises(FileExistsError):
        second.commit(b"Subject: second\r\n\r\nrefused\r\n")
    assert store.body(first.id).read_bytes() == b"Subject: first\r\n\r\nkept\r\n"
    assert store.read(store.path("incoming", first.id)).size == len(
        b"Subject: first\r\n\r\nkept\r\n")
    assert os.listdir(store.path("tmp")) == []
