"""[delivery] relay_recipients: which recipients of a relay domain are taken at RCPT, against a
real Postfix hub (tests/postfixhub.py: virtual mailboxes for alice, bob, carol, ...; any other
address of relay.test refused by Postfix at RCPT) and the elemta daemon."""

from __future__ import annotations

import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

import postfixhub
from daemon import Daemon, free_port, running, wait_until
from elemta import config
from postfixhub import DOMAIN, Postfix

pytestmark = pytest.mark.skipif(not postfixhub.installed(), reason="postfix not installed")

UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
NO_LOOKUP = "451 4.4.3 <{}>: Recipient address lookup failed, try again later"
REREAD = "recipient map re-read"


@pytest.fixture(scope="module")
def hub() -> Iterator[Postfix]:
    with postfixhub.running() as p:
        yield p


def at(user: str) -> str:
    return f"{user}@{DOMAIN}"


def relay_config(tmp_path: Path, port: int, relay_recipients: str) -> str:
    return (f'[delivery]\nrelay_domains = ["{DOMAIN}"]\n'
            f'relay_transport = "smtp:[127.0.0.1]:{port}"\n'
            f'relay_recipients = "{relay_recipients}"\n'
            f'queue_dir = "{tmp_path / "queue"}"\n'
            'minimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"\n')


def rcpts(d: Daemon, addresses: list[str]) -> tuple[list[str], smtplib.SMTP]:
    """Each RCPT's reply as "code text"; the session is left open after MAIL and the RCPTs."""
    s = d.smtp()
    s.ehlo("client.test")
    s.mail("sender@example.org")
    return [f"{code} {text.decode()}" for code, text in (s.rcpt(a) for a in addresses)], s


def queued(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "queue").rglob("*") if p.is_file()
            and p.parent.name in ("incoming", "active", "hold", "failed", "body")]


def rejects(hub: Postfix, address: str) -> int:
    """Postfix's log lines for RCPTs of `address` it refused (one per question asked)."""
    return sum(1 for line in hub.log.splitlines()
               if "NOQUEUE: reject: RCPT" in line and f"<{address}>" in line)


def test_file_accepts_the_listed_and_refuses_the_rest_before_taking_the_message(
        hub: Postfix, tmp_path: Path) -> None:
    table = tmp_path / "relay-recipients"
    table.write_text(f"# the hub's users\n{at('alice')}\nBob@{DOMAIN.upper()}\n")
    with running(tmp_path, relay_config(tmp_path, hub.port, f"file:{table}")) as d:
        replies, s = rcpts(d, [at("Alice"), at("bob"), at("carol"), at("nobody")])
        with s:
            assert replies == ["250 2.1.5 Recipient ok", "250 2.1.5 Recipient ok",
                               UNKNOWN.format(at("carol")), UNKNOWN.format(at("nobody"))]
            s.rset()
            s.mail("sender@example.org")
            assert s.rcpt(at("carol"))[0] == 550
            assert s.docmd("DATA")[0] == 503  # no recipient taken: no message either
        assert queued(tmp_path) == []
        # SIGHUP re-reads the file: carol is listed now.
        table.write_text(f"{at('alice')}\n{at('carol')}\n")
        expected = d.log.count(REREAD) + 1
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.log.count(REREAD) >= expected, "the relay recipients re-read")
        replies, s = rcpts(d, [at("carol"), at("bob")])
        s.close()
        assert replies == ["250 2.1.5 Recipient ok", UNKNOWN.format(at("bob"))]
        assert "relay recipients: file" in d.log


def test_file_problems_are_config_errors_naming_file_key_and_line(tmp_path: Path) -> None:
    table = tmp_path / "relay-recipients"
    table.write_text(f"{at('alice')}\nbob@example.test\nnot an address\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[delivery]\nrelay_domains = ["{DOMAIN}"]\n'
                    'relay_transport = "smtp:[127.0.0.1]:25"\n'
                    f'relay_recipients = "file:{table}"\n')
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert info.value.problems == [
        f"{path}:4: [delivery] relay_recipients: {table}:2: example.test is not in "
        "[delivery] relay_domains",
        f"{path}:4: [delivery] relay_recipients: {table}:3: 'not an address' is not an "
        "address (local@domain)",
    ]
    path.write_text(f'[delivery]\nrelay_domains = ["{DOMAIN}"]\nrelay_recipients = "ldap"\n')
    with pytest.raises(config.ConfigError, match=r"relay_recipients: must be \"any\", "):
        config.load(path)


def test_smtp_probe_asks_the_hub_at_rcpt_and_remembers_the_answer(
        hub: Postfix, tmp_path: Path) -> None:
    with running(tmp_path, relay_config(tmp_path, hub.port, "smtp")) as d:
        replies, s = rcpts(d, [at("alice"), at("dave"), at("dave"), at("Bob")])
        with s:
            assert replies == ["250 2.1.5 Recipient ok", UNKNOWN.format(at("dave")),
                               UNKNOWN.format(at("dave")), "250 2.1.5 Recipient ok"]
            code, _ = s.data(b"Subject: probed\r\nMessage-ID: <probed-1@test>\r\n\r\nx\r\n")
            assert code == 250
        hub.wait_for("alice", b"probed-1@test")
        hub.wait_for("bob", b"probed-1@test")
        # Postfix logs its refusals in order: once a later question is in its log, every
        # earlier one is too. dave was asked once for two RCPTs.
        replies, s = rcpts(d, [at("erin")])
        s.close()
        assert replies == [UNKNOWN.format(at("erin"))]
        wait_until(lambda: rejects(hub, at("erin")) == 1, "the hub's refusal of erin logged")
        assert rejects(hub, at("dave")) == 1, hub.log
        # SIGHUP to "any": the probe is dropped, nobody is asked any more.
        d.config_path.write_text(d.config_path.read_text().replace(
            'relay_recipients = "smtp"', 'relay_recipients = "any"'))
        expected = d.log.count(REREAD) + 1
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.log.count(REREAD) >= expected, "the recipient maps re-read")
        replies, s = rcpts(d, [at("dave")])
        s.close()
        assert replies == ["250 2.1.5 Recipient ok"]


def test_smtp_probe_with_the_hub_down_answers_451(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with running(tmp_path, relay_config(tmp_path, port, "smtp")) as d:
        replies, s = rcpts(d, [at("alice")])
        s.close()
        assert replies == [NO_LOOKUP.format(at("alice"))]
        assert queued(tmp_path) == []
        assert f"recipient probe for <{at('alice')}> failed: 127.0.0.1:{port}: " \
               "Connection refused" in d.log
