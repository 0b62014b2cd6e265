"""Recipient decisions (pure), the map files' errors, check-config, and the Maildir cache."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from elemta import config, mailboxes
from elemta.recipients import (
    CACHE_LIMIT,
    FOUND_TTL,
    MISSING_TTL,
    Lookup,
    MailboxCache,
    MapError,
    RecipientMap,
    RecipientRefusal,
    RecipientTable,
    decide,
    parse_aliases,
    parse_mailbox,
    parse_table,
)
from elemta.smtp.policy import classify_recipient
from elemta.store.maildir import Mailbox

DOMAINS = ("example.test", "localhost")
A, B, PM = Mailbox("example.test", "a"), Mailbox("localhost", "b"), Mailbox("example.test", "postmaster")


def test_rcpt_syntax_and_domain_replies() -> None:
    assert classify_recipient("A@Example.Test.", DOMAINS) == A
    assert classify_recipient("<postmaster>".strip("<>"), DOMAINS) == PM
    assert classify_recipient("x@other.org", DOMAINS).startswith("550 5.7.1")  # type: ignore[union-attr]
    assert classify_recipient("a/b@example.test", DOMAINS).startswith("553 5.1.3")  # type: ignore[union-attr]
    assert parse_mailbox("nodomain", DOMAINS) is RecipientRefusal.BAD_SYNTAX


@pytest.mark.parametrize(
    ("rmap", "box", "expected"),
    [
        (RecipientMap("maildir"), A, Lookup.MAILDIR),
        (RecipientMap("maildir"), PM, (PM,)),
        (RecipientMap("maildir"), Mailbox("localhost", "postmaster"), (Mailbox("localhost", "postmaster"),)),
        (RecipientMap("any"), A, (A,)),
        (RecipientMap("file", RecipientTable(frozenset({A}))), A, (A,)),
        (RecipientMap("file", RecipientTable(frozenset({A}))), B, RecipientRefusal.UNKNOWN_USER),
        (RecipientMap("file", RecipientTable(catchall=frozenset({"localhost"}))), B, (B,)),
        (RecipientMap("file", RecipientTable(catchall=frozenset({"localhost"}))), A, RecipientRefusal.UNKNOWN_USER),
        # an alias wins over every mode, over postmaster, and expands to its targets as given
        (RecipientMap("file", aliases={A: (B, PM)}), A, (B, PM)),
        (RecipientMap("maildir", aliases={PM: (A,)}), PM, (A,)),
    ],
)
def test_decide(rmap: RecipientMap, box: Mailbox, expected: object) -> None:
    assert decide(rmap, box) == expected


def test_recipient_table_lines() -> None:
    table = parse_table("# head\n\nA@Example.Test  # trailing\n@LOCALHOST\n", "t", DOMAINS)
    assert table == RecipientTable(frozenset({A}), frozenset({"localhost"}))
    with pytest.raises(MapError) as info:
        parse_table("ok@example.test\nnot an address\nx@other.org\n@other.org\n", "t", DOMAINS)
    assert info.value.problems == [
        "t:2: 'not an address' is not an address (local@domain)",
        "t:3: other.org is not in [delivery] domains",
        "t:4: '@other.org': other.org is not in [delivery] domains",
    ]


def test_alias_lines() -> None:
    aliases = parse_aliases("sales@example.test: a@example.test, B@localhost, a@example.test\n"
                            "c@localhost: c@localhost, postmaster@example.test  # self: keep a copy\n",
                            "al", DOMAINS)
    c = Mailbox("localhost", "c")
    assert aliases == {Mailbox("example.test", "sales"): (A, B), c: (c, PM)}
    with pytest.raises(MapError) as info:
        parse_aliases("x@example.test a@example.test\n"
                      "y@example.test:\n"
                      "z@example.test: a@other.org\n"
                      "chain@example.test: sales@example.test\n"
                      "sales@example.test: a@example.test\n"
                      "sales@example.test: b@localhost\n", "al", DOMAINS)
    assert info.value.problems == [
        "al:1: expected \"address: mailbox, mailbox\"",
        "al:2: an empty target",
        "al:2: y@example.test has no target",
        "al:3: other.org is not in [delivery] domains",
        "al:3: z@example.test has no target",
        "al:6: sales@example.test is already an alias (at al:5)",
        "al:4: target sales@example.test is itself an alias (at al:5); aliases expand one "
        "level: name its mailboxes",
    ]


def test_map_file_problems_name_config_file_key_and_map_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    bad = tmp_path / "aliases"
    bad.write_text("ok@example.test: a@example.test\nbroken\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[delivery]\nrecipients = "file:{missing}"\naliases = "{bad}"\n')
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert info.value.problems == [
        f"{path}:2: [delivery] recipients: cannot read '{missing}': No such file or directory",
        f"{path}:3: [delivery] aliases: {bad}:2: expected \"address: mailbox, mailbox\"",
    ]
    path.write_text('[delivery]\nrecipients = "everyone"\n')
    with pytest.raises(config.ConfigError, match=r"recipients: must be \"maildir\", \"any\", "):
        config.load(path)


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_check_config_warns_on_any_only(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[delivery]\nrecipients = "any"\n')
    out = _check(path)
    assert out.returncode == 0
    assert "[delivery] recipients = \"any\"" in out.stderr and "without bound" in out.stderr
    assert 'recipients = "any"' in out.stdout
    path.write_text("")
    out = _check(path)
    assert out.returncode == 0 and "recipients" not in out.stderr
    assert 'recipients = "maildir"' in out.stdout


def test_default_is_maildir() -> None:
    assert config.Config().delivery.recipients == "maildir"
    assert config.Config().delivery.aliases == ""


class CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that records which calls it ran (and proves they ran off the loop)."""

    def __init__(self) -> None:
        super().__init__(2)
        self.threads: list[str] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def run() -> Any:
            self.threads.append(threading.current_thread().name)
            return fn(*args, **kwargs)
        return super().submit(run)


def test_maildir_lookups_run_in_the_executor_and_are_remembered_briefly(tmp_path: Path) -> None:
    now = [1000.0]
    executor = CountingExecutor()
    cache = MailboxCache(tmp_path, executor, clock=lambda: now[0])

    async def exists(box: Mailbox) -> bool:
        return await cache.exists(box)

    try:
        assert asyncio.run(exists(A)) is False
        assert len(executor.threads) == 1 and executor.threads[0] != threading.current_thread().name
        mailboxes.create(tmp_path, A)
        assert asyncio.run(exists(A)) is False  # the refusal is remembered ...
        now[0] += MISSING_TTL + 0.01
        assert asyncio.run(exists(A)) is True  # ... for MISSING_TTL only
        assert len(executor.threads) == 2
        now[0] += FOUND_TTL - 0.02
        assert asyncio.run(exists(A)) is True and len(executor.threads) == 2
        now[0] += 0.03
        assert asyncio.run(exists(A)) is True and len(executor.threads) == 3
        cache.forget()
        assert cache.cached(A) is None
    finally:
        executor.shutdown()


def test_the_cache_stays_bounded_under_a_flood_of_random_names(tmp_path: Path) -> None:
    executor = ThreadPoolExecutor(2)
    cache = MailboxCache(tmp_path, executor)

    async def flood() -> None:
        for i in range(CACHE_LIMIT + 50):
            assert not await cache.exists(Mailbox("example.test", f"u{i}"))

    try:
        asyncio.run(flood())
    finally:
        executor.shutdown()
    assert len(cache._seen) == CACHE_LIMIT
    assert cache.cached(Mailbox("example.test", "u0")) is None  # the oldest went first
    assert cache.cached(Mailbox("example.test", f"u{CACHE_LIMIT + 49}")) is False
