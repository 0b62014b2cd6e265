"""recipients = "lmtp": the RCPT probe against a real Dovecot, and the SMTP replies it leads to."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

import dovecot
from dovecot import Dovecot
from elemta import config
from elemta.delivery.base import Reply
from elemta.delivery.probe import LmtpProbe, verdict
from elemta.recipients import Lookup, MailboxCache, RecipientMap, RecipientRefusal, Recipients, decide
from elemta.smtp.policy import recipient_reply
from elemta.store.maildir import Mailbox


@pytest.fixture(scope="module")
def dc() -> Iterator[Dovecot]:
    with dovecot.running() as d:
        yield d


def ask(probe: LmtpProbe, *addresses: str) -> list[bool | None]:
    async def main() -> list[bool | None]:
        try:
            return [await probe.exists(a) for a in addresses]
        finally:
            await probe.close()
    return asyncio.run(main())


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_known_unknown(dc: Dovecot, via: str) -> None:
    probe = LmtpProbe(getattr(dc, via))
    got = ask(probe, "alice@example.test", "nobody@example.test", "Bob@Example.Test",
              "alice@example.test", "nobody@example.test")
    assert got == [True, False, True, True, False]
    assert probe.lookups == 3, "the repeats came from the cache"
    assert probe.connections == 1, "one probe connection for every question"


def test_server_down_is_none_and_not_cached() -> None:
    with dovecot.running() as dc:
        pass
    probe = LmtpProbe(dc.tcp)
    assert ask(probe, "alice@example.test") == [None]
    assert probe.last_error == f"127.0.0.1:{dc.port}: Connection refused"
    assert probe.cached("alice@example.test") is None
    # a server just found down is not asked again at once (no connect storm at RCPT rate)
    assert ask(probe, "bob@example.test") == [None] and probe.attempts == 1


def test_kept_connection_closed_by_the_server_is_reopened() -> None:
    """Dovecot restarted between two questions: the second one still gets its answer."""
    with dovecot.running() as dc:
        probe = LmtpProbe(dc.tcp, found_ttl=0)

        async def main() -> list[bool | None]:
            try:
                first = await probe.exists("alice@example.test")
                dc.stop()
                dc.start()
                return [first, await probe.exists("alice@example.test")]
            finally:
                await probe.close()
        assert asyncio.run(main()) == [True, True]
        assert probe.connections == 2


def test_cache_is_bounded(dc: Dovecot) -> None:
    probe = LmtpProbe(dc.tcp, cache_limit=3)
    ask(probe, *(f"u{i}@example.test" for i in range(10)))
    assert len(probe._seen) == 3
    assert probe.cached("u9@example.test") is False and probe.cached("u0@example.test") is None


def test_concurrent_questions_for_one_address_ask_once(dc: Dovecot) -> None:
    probe = LmtpProbe(dc.tcp)

    async def main() -> list[bool | None]:
        try:
            return list(await asyncio.gather(*(probe.exists("bob@example.test") for _ in range(20))))
        finally:
            await probe.close()
    assert asyncio.run(main()) == [True] * 20
    assert probe.lookups == 1


def test_recipients_lmtp_mode_gives_smtp_replies(dc: Dovecot, tmp_path: Path) -> None:
    """The path handle_RCPT takes: Recipients.resolve, then recipient_reply."""
    rmap = RecipientMap("lmtp")
    assert decide(rmap, Mailbox("example.test", "alice")) is Lookup.LMTP

    async def main(spec: str) -> list[str]:
        with ThreadPoolExecutor(1) as ex:
            r = Recipients(rmap, MailboxCache(tmp_path, ex), LmtpProbe(spec))
            try:
                out = []
                for user in ("alice", "nobody"):
                    box = Mailbox("example.test", user)
                    got = await r.resolve(box)
                    out.append("250" if isinstance(got, tuple) else recipient_reply(got, box))
                return out
            finally:
                await r.close()
    assert asyncio.run(main(dc.tcp)) == [
        "250", "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"]
    down = f"lmtp:127.0.0.1:{dovecot.free_port()}"
    assert asyncio.run(main(down)) == [
        f"451 4.4.3 <{u}@example.test>: Recipient address lookup failed, try again later"
        for u in ("alice", "nobody")]


@pytest.mark.parametrize(("reply", "expected"), [
    (Reply(250, "2.1.5 OK"), True),
    (Reply(550, "5.1.1 <x@y> User doesn't exist: x@y"), False),
    (Reply(550, "User unknown"), False),
    (Reply(553, "5.1.3 bad address"), False),
    (Reply(552, "5.2.2 <carol@example.test> Quota exceeded"), None),  # lmtp_rcpt_check_quota
    (Reply(550, "5.7.1 policy"), None),
    (Reply(451, "4.3.0 Temporary internal error"), None),
    (Reply(421, "4.3.2 shutting down"), None),
])
def test_verdict(reply: Reply, expected: bool | None) -> None:
    assert verdict(reply) is expected


def test_config_lmtp_recipients_need_an_lmtp_transport(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[delivery]\nrecipients = "lmtp"\n')
    with pytest.raises(config.ConfigError, match=r"recipients: \"lmtp\" asks the LMTP server, "
                                                 r"but \[delivery\] transport is 'maildir'"):
        config.load(path)


def test_build_takes_the_transport_for_the_probe(tmp_path: Path) -> None:
    delivery = replace(config.DeliveryConfig(), recipients="lmtp")
    object.__setattr__(delivery, "transport", "lmtp:unix:/run/dovecot/lmtp")  # the queue branch's key
    with ThreadPoolExecutor(1) as ex:
        r = Recipients.build(delivery, tmp_path, ex)
    assert isinstance(r.probe, LmtpProbe) and r.probe.spec.path == "/run/dovecot/lmtp"
    assert RecipientRefusal.LOOKUP_FAILED.value == "recipient lookup failed"


def test_reload_into_and_out_of_lmtp_mode(dc: Dovecot, tmp_path: Path) -> None:
    """SIGHUP switching recipients to "lmtp" (or its transport) makes a probe for the new
    target; switching away closes the old probe's connection."""
    def delivery(mode: str, transport: str) -> config.DeliveryConfig:
        d = replace(config.DeliveryConfig(), recipients=mode)
        object.__setattr__(d, "transport", transport)  # the queue branch's key
        return d

    async def main() -> None:
        with ThreadPoolExecutor(1) as ex:
            r = Recipients.build(delivery("maildir", "maildir"), tmp_path, ex)
            try:
                assert r.probe is None
                r.reload(delivery("lmtp", dc.tcp))
                assert await r.resolve(Mailbox("example.test", "alice")) == (
                    Mailbox("example.test", "alice"),)
                assert await r.resolve(Mailbox("example.test", "nobody")) is \
                    RecipientRefusal.UNKNOWN_USER
                old = r.probe
                assert isinstance(old, LmtpProbe) and old._conn is not None
                r.reload(delivery("lmtp", dc.unix))
                assert r.probe is not old and old._conn is None
                assert isinstance(r.probe, LmtpProbe) and r.probe.spec.path == dc.socket_path
                assert await r.resolve(Mailbox("example.test", "bob")) == (
                    Mailbox("example.test", "bob"),)
                unix = r.probe
                r.reload(delivery("maildir", dc.unix))
                assert r.probe is None and unix._conn is None
            finally:
                await r.close()
    asyncio.run(main())
