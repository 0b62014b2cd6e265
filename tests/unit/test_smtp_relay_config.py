"""The SMTP transport spec and the relay settings: what is accepted, and the one-line errors."""

from __future__ import annotations

import tomllib

import pytest

from elemta import config
from elemta.delivery.smtp import SmtpSpec, parse_smtp
from elemta.queue import routing
from elemta.smtp.relay import relay_mailbox
from elemta.store.maildir import Mailbox


@pytest.mark.parametrize(("spec", "parsed"), [
    ("smtp:[127.0.0.1]:2525", SmtpSpec("127.0.0.1", 2525)),
    ("smtp:[hub.example.org]", SmtpSpec("hub.example.org", 25)),
    ("smtp:[hub.example.org.]:587", SmtpSpec("hub.example.org", 587)),
    ("smtp:[::1]:25", SmtpSpec("::1", 25)),
])
def test_parse_smtp(spec: str, parsed: SmtpSpec) -> None:
    assert parse_smtp(spec) == parsed
    assert parse_smtp(str(parsed)) == parsed


@pytest.mark.parametrize(("spec", "problem"), [
    ("smtp:hub.example.org:25", "write the next hop in brackets"),
    ("smtp:hub.example.org", "which elemta does not do"),
    ("smtp:[hub", "expected \"smtp:[HOST]:PORT\""),
    ("smtp:[hub]x", "expected \"smtp:[HOST]:PORT\""),
    ("smtp:[hub]:0", "port must be a number from 1 to 65535"),
    ("smtp:[bad_host]:25", "is not a host name"),
    ("smtp:[::g]:25", "is not an IPv6 address"),
    ("smtp:[]:25", "is not a host name"),
])
def test_parse_smtp_errors(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        parse_smtp(spec)


def load(text: str) -> config.Config:
    return config.build(tomllib.loads(text), "t.toml", text)


def test_relay_domains_route_to_relay_transport_unless_routed() -> None:
    cfg = load('[delivery]\nrelay_domains = ["a.test", "b.test"]\n'
               'relay_transport = "smtp:[hub.test]:25"\n'
               'route = [{ domain = "b.test", transport = "smtp:[other.test]:2525" }]\n')
    d = cfg.delivery
    assert routing.transport_for("a.test", d.transport, d.all_routes()) == "smtp:[hub.test]:25"
    assert routing.transport_for("b.test", d.transport, d.all_routes()) == \
        "smtp:[other.test]:2525"
    assert routing.transport_for("example.test", d.transport, d.all_routes()) == "maildir"


@pytest.mark.parametrize(("toml", "needle"), [
    ('relay_domains = ["a.test"]\nrelay_transport = "smtp:hub.test:25"',
     "t.toml:3: [delivery] relay_transport: 'smtp:hub.test:25': write the next hop in brackets"),
    ('relay_domains = ["a.test"]\nrelay_transport = "maildir"',
     "t.toml:3: [delivery] relay_transport: \"maildir\" stores mail locally"),
    ('relay_domains = ["a.test"]',
     "[delivery] relay_transport: not set, and relay domain(s) a.test have no "
     "[[delivery.route]]"),
    ('relay_domains = ["example.test"]\nrelay_transport = "smtp:[h.test]"',
     "[delivery] relay_domains: 'example.test' is also in [delivery] domains"),
    ('transport = "smtp:h.test"', "[delivery] transport: 'smtp:h.test': write the next hop"),
    ('smtp_connect_timeout = "0s"', "[delivery] smtp_connect_timeout: must be at least 0.1"),
])
def test_relay_config_errors_name_file_and_key(toml: str, needle: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        load(f"[delivery]\n{toml}\n")
    assert any(needle in p for p in err.value.problems), err.value.problems


def test_relay_mailbox_takes_only_relay_domains() -> None:
    relay = ("relay.test",)
    assert relay_mailbox("Bob@Relay.Test.", relay) == Mailbox("relay.test", "Bob")
    assert relay_mailbox("bob@other.test", relay) is None
    assert relay_mailbox("bob@sub.relay.test", relay) is None
    assert relay_mailbox("bob@relay.test", ()) is None
    assert relay_mailbox('"a b"@relay.test', relay) == "553 5.1.3 Bad recipient address syntax"
    assert relay_mailbox("@relay.test", relay) == "553 5.1.3 Bad recipient address syntax"
