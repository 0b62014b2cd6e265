"""SMTP (RFC 5321) relay to a next hop: transport specs and the SMTP flavour of the shared
client (client.py).

EHLO with the configured hostname (HELO when EHLO is refused with a 5xx); PIPELINING, SIZE
(a message above the hop's SIZE is failed before MAIL) and 8BITMIME used when offered; after
the dot one reply, which is every accepted recipient's. One connection per hop is reused for
the next message (RSET between), as client.PooledTransport does for LMTP.

Only "smtp:[HOST]:PORT" is accepted: the brackets say, as in Postfix's relayhost, that HOST is
the host to connect to, not a domain whose MX records to look up. elemta does no MX lookup
(it would need a DNS client the standard library lacks), so the form without brackets is
refused by the parser rather than silently treated as an A/AAAA lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from base64 import b64encode
from concurrent.futures import Executor
from dataclasses import dataclass

from .base import Reply, Transport
from .client import Connection, PooledTransport, Refused, Timeouts, greet, hello, open_connection

SMTP_PORT = 25

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


@dataclass(frozen=True)
class SmtpSpec:
    host: str  # a name, an IPv4 address or an IPv6 address (without brackets)
    port: int = SMTP_PORT

    def __str__(self) -> str:
        return f"smtp:[{self.host}]:{self.port}"

    @property
    def where(self) -> str:
        """How reasons name the hop: "hub.example.org:25", "[::1]:25"."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_smtp(spec: str) -> bool:
    return spec.startswith("smtp:")


def parse_smtp(spec: str) -> SmtpSpec:
    """ "smtp:[HOST]:PORT" or "smtp:[HOST]" (port 25); HOST a name, IPv4 or IPv6 address.

    Raises ValueError with a message that names the problem (config prefixes file and key).
    """
    kind, colon, rest = spec.partition(":")
    if kind != "smtp" or not colon:
        raise ValueError(f"expected \"smtp:[HOST]:PORT\", got {spec!r}")
    if not rest.startswith("["):
        raise ValueError(f"{spec!r}: write the next hop in brackets, \"smtp:[HOST]:PORT\" "
                         "(without brackets Postfix looks up MX records, which elemta does "
                         "not do)")
    host, bracket, tail = rest[1:].partition("]")
    if not bracket or (tail and not tail.startswith(":")):
        raise ValueError(f"{spec!r}: expected \"smtp:[HOST]:PORT\"")
    port = SMTP_PORT
    if tail:
        text = tail[1:]
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ValueError(f"{spec!r}: port must be a number from 1 to 65535, got {text!r}")
        port = int(text)
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{spec!r}: {host!r} is not an IPv6 address") from None
    elif not host or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{spec!r}: {host!r} is not a host name or address")
    return SmtpSpec(host.rstrip("."), port)


TLS_LEVELS = ("none", "may", "encrypt")


@dataclass(frozen=True)
class TlsPolicy:
    """STARTTLS to the hop, as Postfix's smtp_tls_security_level: "none" never; "may" when
    offered, unauthenticated (encryption against passive listeners only); "encrypt" always,
    the certificate verified against `ca_file` (or the system store) and the host name of the
    spec. Whatever goes wrong with "encrypt" defers the message: never sent in clear."""

    level: str = "may"
    ca_file: str = ""  # PEM CA certificates; empty: the system store

    def context(self) -> ssl.SSLContext:
        """Blocking (reads the CA files): call it on an executor."""
        if self.level == "encrypt":
            return ssl.create_default_context(cafile=self.ca_file or None)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _tls_failed(text: str) -> Refused:
    return Refused(Reply(451, f"4.7.5 {text}"), "")


class SmtpTransport(PooledTransport):
    """`Transport` for one SMTP next hop (client.PooledTransport)."""

    name = "smtp"
    lmtp = False

    def __init__(self, spec: SmtpSpec | str, *, max_connections: int = 10,
                 idle_timeout: float = 30.0, timeouts: Timeouts | None = None,
                 executor: Executor | None = None, helo_name: str = "localhost",
                 tls: TlsPolicy | None = None, auth: tuple[str, str] | None = None) -> None:
        self.spec = parse_smtp(spec) if isinstance(spec, str) else spec
        super().__init__(self.spec.where, max_connections=max_connections,
                         idle_timeout=idle_timeout, timeouts=timeouts, executor=executor)
        self.helo_name = helo_name
        self.tls = tls or TlsPolicy("none")
        self._context: ssl.SSLContext | None = None
        self.auth = auth  # (user, password) for AUTH, given only inside TLS

    async def _open(self) -> Connection:
        return await open_connection(self.spec.host, self.spec.port, "", self.timeouts.connect)

    async def _greet(self, conn: Connection) -> None:
        await greet(conn, self.timeouts, "EHLO", self.helo_name, fallback="HELO")
        await self._starttls(conn)
        if self.auth is not None:
            await self._authenticate(conn, *self.auth)

    async def _starttls(self, conn: Connection) -> None:
        level = self.tls.level
        if level == "none":
            return
        if "STARTTLS" not in conn.extensions:
            if level == "encrypt":
                raise _tls_failed(f"TLS is required, but {conn.relay} does not offer STARTTLS")
            return
        reply = await conn.command("STARTTLS", self.timeouts.command, "in reply to STARTTLS")
        if reply.code != 220:
            if level == "encrypt":
                raise _tls_failed(f"TLS is required, but {conn.relay} refused STARTTLS: "
                                  f"{reply.reply()}")
            return  # "may": the session goes on in clear, as the server asked
        if self._context is None:
            self._context = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.tls.context)
        try:
            await asyncio.wait_for(conn.writer.start_tls(
                self._context, server_hostname=self.spec.host), self.timeouts.connect)
        except ssl.SSLCertVerificationError as exc:
            raise _tls_failed(f"TLS handshake with {conn.relay}: server certificate not "
                              f"trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise _tls_failed(f"TLS handshake with {conn.relay} failed: "
                              f"{exc.reason or exc}") from None
        conn.tls = True
        await hello(conn, self.timeouts, "EHLO", self.helo_name)

    async def _authenticate(self, conn: Connection, user: str, password: str) -> None:
        """AUTH PLAIN, else LOGIN (RFC 4954); a refusal defers, as Postfix's default
        smtp_sasl_auth_soft_bounce does: a wrong password must not bounce mail."""
        if not conn.tls:
            raise Refused(Reply(451, f"4.7.0 credentials for {self.where} are sent only inside "
                                     f"TLS, and {conn.relay} did not start it"), "")
        offered = conn.extensions.get("AUTH", "").upper().split()
        t = self.timeouts.command
        if "PLAIN" in offered:
            token = b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = await conn.command(f"AUTH PLAIN {token}", t, "in reply to AUTH")
        elif "LOGIN" in offered:
            reply = await conn.command("AUTH LOGIN", t, "in reply to AUTH")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await conn.command(b64encode(secret.encode()).decode(), t,
                                           "in reply to AUTH")
        else:
            raise Refused(Reply(451, f"4.7.0 {conn.relay} offers no AUTH PLAIN or LOGIN "
                                     f"(AUTH {' '.join(offered) or 'not offered'})"), "")
        if reply.code != 235:
            raise Refused(Reply(451, f"4.7.0 SASL authentication to {conn.relay} failed: "
                                     f"{reply.reply()}"), "")


def _is_a_transport(t: SmtpTransport) -> Transport:
    return t  # mypy checks here that SmtpTransport keeps to the queue's Protocol
