"""Which transport a recipient's domain goes to: spec syntax, [[delivery.route]] tables, lookup.

A spec is kept as its string in the Config (a description); the daemon builds transports from
it. "maildir" is the direct store (no queue); every other spec is a queued transport.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..delivery.lmtp import parse_transport
from ..delivery.smtp import is_smtp, parse_smtp

MAILDIR = "maildir"

_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


@dataclass(frozen=True)
class Route:
    domain: str
    transport: str


def parse_spec(value: object) -> str:
    """"maildir", "lmtp:unix:/abs/path", "lmtp:HOST[:PORT]" ([v6]:PORT) or "smtp:[HOST]:PORT",
    checked by the client's own parser (delivery.lmtp.parse_transport, delivery.smtp.parse_smtp:
    the one place for each syntax); the Config keeps the string."""
    if not isinstance(value, str):
        raise ValueError(f"expected a transport string, got {type(value).__name__} {value!r}")
    if "\x00" in value or any(c < " " for c in value):
        raise ValueError(f"{value!r} holds a control character")
    if is_smtp(value):
        parse_smtp(value)
    elif value == MAILDIR or value.startswith("lmtp:"):
        parse_transport(value)
    else:
        raise ValueError(f"must be \"maildir\", \"lmtp:unix:/path\", \"lmtp:HOST:PORT\", "
                         f"\"lmtp:[IPV6]:PORT\" or \"smtp:[HOST]:PORT\", got {value!r}")
    return value


def parse_relay_spec(value: object) -> str:
    """[delivery] relay_transport: empty, or a queued transport (relayed mail is never stored
    in the local Maildir)."""
    if value == "":
        return ""
    spec = parse_spec(value)
    if not queued(spec):
        raise ValueError("\"maildir\" stores mail locally, it does not relay: use "
                         "\"smtp:[HOST]:PORT\" (or an LMTP spec)")
    return spec


def parse_routes(value: object) -> tuple[Route, ...]:
    """[[delivery.route]] tables (TOML gives a list of dicts), each exactly domain + transport."""
    if not isinstance(value, list):
        raise ValueError(f"expected [[delivery.route]] tables, got {type(value).__name__}")
    out: list[Route] = []
    for n, item in enumerate(value, 1):
        if not isinstance(item, Mapping):
            raise ValueError(f"route {n}: expected a table with domain and transport, "
                             f"got {item!r}")
        extra = sorted(set(item) - {"domain", "transport"})
        if extra or "domain" not in item or "transport" not in item:
            raise ValueError(f"route {n}: needs exactly the keys domain and transport"
                             + (f" (unknown: {', '.join(map(repr, extra))})" if extra else ""))
        domain = item["domain"]
        if not isinstance(domain, str) or not _DOMAIN.fullmatch(d := domain.strip().lower()
                                                                .rstrip(".")):
            raise ValueError(f"route {n}: {domain!r} is not a domain name")
        try:
            spec = parse_spec(item["transport"])
        except ValueError as exc:
            raise ValueError(f"route {n}: {exc}") from None
        out.append(Route(d, spec))
    return tuple(out)


def problems(routes: Sequence[Route], domains: Iterable[str]) -> list[str]:
    known = set(domains)
    seen: set[str] = set()
    out = []
    for r in routes:
        if r.domain in seen:
            out.append(f"domain {r.domain!r} routed twice")
        seen.add(r.domain)
        if r.domain not in known:
            out.append(f"domain {r.domain!r} is not one of [delivery] domains or relay_domains "
                       "(no mail for it is accepted)")
    return out


def relay_routes(relay_domains: Sequence[str], relay_transport: str,
                 routes: Sequence[Route]) -> tuple[Route, ...]:
    """A route to relay_transport for each relay domain that no [[delivery.route]] names."""
    if not relay_transport:
        return ()
    routed = {r.domain for r in routes}
    return tuple(Route(d, relay_transport) for d in relay_domains if d not in routed)


def relay_problems(relay_domains: Sequence[str], relay_transport: str, routes: Sequence[Route],
                   domains: Iterable[str]) -> list[tuple[str, str]]:
    """(key, problem) for relay settings that cannot work."""
    out = []
    local = set(domains)
    for d in relay_domains:
        if d in local:
            out.append(("relay_domains", f"{d!r} is also in [delivery] domains (a domain is "
                                         "either ours or relayed)"))
    routed = {r.domain for r in routes}
    unrouted = [d for d in relay_domains if d not in routed]
    if unrouted and not relay_transport:
        out.append(("relay_transport", f"not set, and relay domain(s) {', '.join(unrouted)} "
                                       "have no [[delivery.route]]: set relay_transport = "
                                       "\"smtp:[HOST]:PORT\""))
    return out


def transport_for(domain: str, default: str, routes: Sequence[Route]) -> str:
    """The spec that delivers mail for `domain`."""
    for r in routes:
        if r.domain == domain:
            return r.transport
    return default


def queued(spec: str) -> bool:
    return spec != MAILDIR


def any_queued(default: str, routes: Sequence[Route]) -> bool:
    return queued(default) or any(queued(r.transport) for r in routes)
