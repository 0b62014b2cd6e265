"""LMTP (RFC 2033) delivery: transport specs and the LMTP flavour of the shared client.

LHLO once per connection; after the dot one reply per accepted recipient, in RCPT order.
Everything else (replies, the transaction, streaming, the connection pool, how failures become
per-recipient 4xx results) is client.py's, shared with the SMTP client (smtp.py).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from concurrent.futures import Executor
from dataclasses import dataclass

from .base import Transport
from .client import Connection, PooledTransport, Timeouts, greet, open_connection

log = logging.getLogger("elemta.delivery.lmtp")

LMTP_PORT = 24


# -- transport specs --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportSpec:
    kind: str  # "maildir" or "lmtp"
    host: str = ""  # lmtp over TCP: name or address (IPv6 without brackets)
    port: int = 0
    path: str = ""  # lmtp over a unix socket

    def __str__(self) -> str:
        if self.kind == "maildir":
            return "maildir"
        if self.path:
            return f"lmtp:unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"lmtp:{host}:{self.port}"

    @property
    def where(self) -> str:
        """How reasons name the destination: "/run/dovecot/lmtp", "127.0.0.1:24", "[::1]:24"."""
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{spec!r}: port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def parse_transport(spec: str) -> TransportSpec:
    """ "maildir", "lmtp:unix:/path", "lmtp:HOST:PORT", "lmtp:[IPV6]:PORT" (port default 24).

    Raises ValueError with a message that names the problem (config prefixes file and key).
    """
    if not isinstance(spec, str):
        raise ValueError(f"expected a string, got {type(spec).__name__} {spec!r}")
    if spec == "maildir":
        return TransportSpec("maildir")
    kind, colon, rest = spec.partition(":")
    if kind != "lmtp" or not colon:
        raise ValueError(f"must be \"maildir\", \"lmtp:unix:/path\", \"lmtp:HOST:PORT\" or "
                         f"\"lmtp:[IPV6]:PORT\", got {spec!r}")
    if rest.startswith("unix:"):
        path = rest[5:]
        if not path.startswith("/"):
            raise ValueError(f"{spec!r}: the unix socket path must be absolute")
        return TransportSpec("lmtp", path=path)
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{spec!r}: {host!r} in brackets is not an IPv6 address") from None
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"{spec!r}: expected \"lmtp:[IPV6]:PORT\"")
        return TransportSpec("lmtp", host=host, port=_port(tail[1:], spec) if tail else LMTP_PORT)
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port = rest, ""
    if ":" in host:
        raise ValueError(f"{spec!r}: an IPv6 address needs brackets: \"lmtp:[{host}]:{port}\"")
    if not host or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{spec!r}: {host!r} is not a host name or address")
    return TransportSpec("lmtp", host=host, port=_port(port, spec) if port else LMTP_PORT)


# -- connections -------------------------------------------------------------------------------


async def connect(spec: TransportSpec, timeouts: Timeouts, lhlo_name: str) -> Connection:
    """Connected, greeted and LHLO'd. Raises OSError, TimeoutError, ProtocolError or Refused."""
    conn = await open_connection(spec.host, spec.port, spec.path, timeouts.connect)
    try:
        await greet(conn, timeouts, "LHLO", lhlo_name)
    except BaseException:
        conn.writer.close()
        raise
    return conn


# -- the transport ---------------------------------------------------------------------------


class LmtpTransport(PooledTransport):
    """`Transport` for one LMTP destination (client.PooledTransport)."""

    name = "lmtp"
    lmtp = True

    def __init__(self, spec: TransportSpec | str, *, max_connections: int = 10,
                 idle_timeout: float = 30.0, timeouts: Timeouts | None = None,
                 executor: Executor | None = None, lhlo_name: str = "localhost") -> None:
        self.spec = parse_transport(spec) if isinstance(spec, str) else spec
        if self.spec.kind != "lmtp":
            raise ValueError(f"not an LMTP transport: {self.spec}")
        super().__init__(self.spec.where, max_connections=max_connections,
                         idle_timeout=idle_timeout, timeouts=timeouts, executor=executor)
        self.lhlo_name = lhlo_name

    async def _open(self) -> Connection:
        return await open_connection(self.spec.host, self.spec.port, self.spec.path,
                                     self.timeouts.connect)

    async def _greet(self, conn: Connection) -> None:
        await greet(conn, self.timeouts, "LHLO", self.lhlo_name)


def _is_a_transport(t: LmtpTransport) -> Transport:
    return t  # mypy checks here that LmtpTransport keeps to the queue's Protocol
