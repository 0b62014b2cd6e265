"""elemta.toml: frozen dataclasses, one schema, errors that name file, key and problem.

Each config key is declared once, as a dataclass field whose metadata says how to parse and
check it; the loader, `check-config`, the man-page test and the effective-config printer all
read that one declaration. A Config is a description only: it reads no other file, asks no
resolver and counts no CPUs (runtime.py builds what the daemon runs with from it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import recipients
from .queue import routing
from .units import format_duration, parse_duration, parse_size

DEFAULT_CONFIG_PATH = Path("/etc/elemta/elemta.toml")
MiB = 1024 * 1024
GiB = 1024 * MiB
INT64_MAX = 2**63 - 1
# The smallest per_connection_memory_limit: above the buffers every session in DATA holds by
# elemta's own choice (elemta reads 64 KiB per recv, a session stops reading past 2 x the
# 1001-byte line limit while a command waits, the spool keeps 64 KiB before its first write,
# the decoder one partial line), so that 552 5.3.4 only ever answers memory the client made us hold.
MIN_SESSION_MEMORY = 512 * 1024
# What one session in DATA typically holds by elemta's own choice (64 KiB socket reads and their
# copies, the 64 KiB spool buffer, a line), as measured under a flood: what the governor reserves
# for each session entering DATA and what check-config's capacity figures multiply.
SESSION_BUFFERS = 330 * 1024


class ConfigError(Exception):
    """One or more problems; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: object) -> ListenAddress:
    if not isinstance(value, str):
        raise ValueError(f"expected \"host:port\", got {value!r}")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value.strip())
    if m is None:
        raise ValueError(f"cannot parse listen address {value!r} (use \"127.0.0.1:25\" or \"[::1]:25\")")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[{host}] is not an IPv6 address") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            host = check_hostname(host)
    return ListenAddress(host, port)


def check_hostname(name: str) -> str:
    """`name` as an RFC 1123 host name, or ValueError saying what is wrong with it.

    Letters, digits and hyphens in dot-separated labels of 1-63 octets that neither start nor
    end with a hyphen, 253 octets in all; one trailing dot (the absolute form) is dropped.
    Address literals are refused: the name goes into Maildir file names, where ':' is the
    flags separator, and a mail server greets with its name.
    """
    bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in ".-"))), None)
    if bad is not None:
        raise ValueError(f"{name!r} is not a host name: {bad!r} is not allowed "
                         "(letters, digits, hyphens and dots only)")
    host = name[:-1] if name.endswith(".") else name
    if len(host) > 253:
        raise ValueError(f"{name!r} is not a host name: longer than 253 octets")
    for label in host.split("."):
        if not label:
            raise ValueError(f"{name!r} is not a host name: empty label")
        if len(label) > 63:
            raise ValueError(f"{name!r} is not a host name: label {label[:20]!r}... is longer "
                             "than 63 octets")
        if label.startswith("-") or label.endswith("-"):
            raise ValueError(f"{name!r} is not a host name: label {label!r} starts or ends "
                             "with a hyphen")
    if host.rsplit(".", 1)[-1].isdigit():  # RFC 1123 2.1: the top label is never numeric
        raise ValueError(f"{name!r} is an address, not a host name (address literals are not "
                         "accepted; use the host's name)")
    return host


def is_loopback(addr: ListenAddress) -> bool:
    """Only this host can connect: 127.0.0.0/8, ::1 (also IPv4-mapped) or "localhost"."""
    try:
        ip = ipaddress.ip_address(addr.host)
    except ValueError:  # a name: only localhost is loopback by definition (RFC 6761)
        host = addr.host.lower()
        return host == "localhost" or host.endswith(".localhost")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _spec(
    kind: str,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    why: str = "",
) -> dict[str, Any]:
    return {"kind": kind, "doc": doc, "min": minimum, "max": maximum, "choices": choices,
            "why": why}


def _f(default: Any, kind: str, doc: str, **kw: Any) -> Any:
    meta = _spec(kind, doc, **kw)
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MemoryConfig:
    """The guide's nine [memory] keys with the guide's defaults."""

    max_memory_usage: int = _f(2 * GiB, "size", "Total memory budget of the daemon", minimum=1 * MiB)
    per_connection_memory_limit: int = _f(
        52428800, "size", "In-memory bytes one session may hold", minimum=MIN_SESSION_MEMORY,
        why="a session in DATA holds up to ~330 KiB of buffers elemta itself sizes (64 KiB socket "
            "reads and their copies, the 64 KiB spool buffer, a line); a lower budget would answer 552 "
            "5.3.4 to mail that fits",
    )
    memory_warning_threshold: float = _f(0.75, "fraction", "Log a warning above this utilization")
    memory_critical_threshold: float = _f(0.90, "fraction", "Refuse new work (452 4.3.1) above this")
    gc_threshold: float = _f(0.80, "fraction", "Force gc.collect() + malloc_trim above this")
    monitoring_interval: float = _f(
        5.0, "duration", "Period of the memory monitor", minimum=0.01, maximum=3600
    )
    max_goroutines: int = _f(2000, "int", "Cap on SMTP sessions plus asyncio tasks and threads", minimum=10)
    goroutine_leak_detection: bool = _f(True, "bool", "Warn when tasks grow while sessions do not")
    memory_exhaustion_protection: bool = _f(
        True, "bool", "Reject with 452 under pressure (false: log only)"
    )


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[ListenAddress, ...] = _f(
        [ListenAddress("127.0.0.1", 2525)], "listen", "SMTP listen addresses (IPv4 and IPv6)"
    )
    hostname: str = _f(
        "", "hostname", "Name in the greeting, Received: and Maildir file names (RFC 1123; "
        "empty: the host's FQDN)"
    )
    max_connections: int = _f(1000, "int", "Concurrent SMTP sessions", minimum=1, maximum=1_000_000)
    max_message_size: int = _f(52428800, "size", "Largest message (EHLO SIZE)", minimum=1024)
    max_recipients: int = _f(100, "int", "RCPT per message", minimum=1, maximum=100_000)
    command_timeout: float = _f(
        300.0, "duration", "Idle time allowed between commands", minimum=0.1, maximum=86400
    )
    data_timeout: float = _f(
        600.0, "duration", "Idle time allowed while receiving DATA", minimum=0.1, maximum=86400
    )
    drain_timeout: float = _f(
        30.0, "duration", "On SIGTERM/SIGINT: time sessions in DATA get to finish", maximum=3600
    )
    workers: int | str = _f(
        "auto", "workers", "Worker processes: 1 (one process), 2..64, or \"auto\" (usable CPUs, "
        "capped by memory: see elemta.toml(5))",
        minimum=1, maximum=64,
    )
    pin_workers: bool = _f(
        True, "bool", "With workers > 1: bind each worker to one usable CPU (round robin)"
    )
    event_loop: str = _f(
        "auto", "choice", "asyncio or uvloop (auto: asyncio; uvloop measured no faster)",
        choices=("auto", "asyncio", "uvloop"),
    )


@dataclass(frozen=True)
class DeliveryConfig:
    maildir_root: str = _f("var/mail", "str", "Maildir tree: <root>/<domain>/<localpart>/")
    domains: tuple[str, ...] = _f(
        ["localhost", "example.test"], "domains", "Domains we accept mail for"
    )
    recipients: str = _f(
        "maildir", "recipients", "Who may receive mail: \"maildir\" (mailboxes that exist), "
        "\"file:PATH\" (one address or @domain per line), \"lmtp\" (ask the LMTP server of "
        "[delivery] transport at RCPT) or \"any\""
    )
    aliases: str = _f("", "str", "Alias file, \"address: mailbox, mailbox\" per line (empty: none)")
    transport: str = _f(
        "maildir", "transport", "Where accepted mail goes: \"maildir\" (stored directly under "
        "maildir_root) or queued for \"lmtp:unix:/PATH\" / \"lmtp:HOST:PORT\""
    )
    route: tuple[routing.Route, ...] = _f(
        [], "routes", "[[delivery.route]] tables: domain = ..., transport = ... (overrides "
        "transport for that recipient domain)"
    )
    relay_domains: tuple[str, ...] = _f(
        [], "domains", "Domains we accept mail for and relay onward (to relay_transport or "
        "their [[delivery.route]]); mail for any other domain is still refused"
    )
    relay_transport: str = _f(
        "", "relay_transport", "Where mail for relay_domains goes: \"smtp:[HOST]:PORT\" "
        "(or an LMTP spec); empty: every relay domain needs a [[delivery.route]]"
    )
    relay_recipients: str = _f(
        "any", "relay_recipients", "Which recipients of relay_domains are taken: \"any\", "
        "\"file:PATH\" (one address or @domain per line) or \"smtp\" (ask the domain's next "
        "hop at RCPT, cached)"
    )
    smtp_connect_timeout: float = _f(
        30.0, "duration", "SMTP relay client: TCP connect plus the server's 220 greeting",
        minimum=0.1, maximum=86400,
    )
    smtp_command_timeout: float = _f(
        300.0, "duration", "SMTP relay client: the reply to EHLO, MAIL, RCPT and RSET",
        minimum=0.1, maximum=86400,
    )
    smtp_data_init_timeout: float = _f(
        120.0, "duration", "SMTP relay client: the 354 reply to DATA", minimum=0.1,
        maximum=86400,
    )
    smtp_data_xfer_timeout: float = _f(
        180.0, "duration", "SMTP relay client: each write of the message body (a stalled "
        "server, not a slow link)", minimum=0.1, maximum=86400,
    )
    smtp_data_done_timeout: float = _f(
        600.0, "duration", "SMTP relay client: the reply after the final dot", minimum=0.1,
        maximum=86400,
    )
    smtp_tls: str = _f(
        "may", "choice", "SMTP relay client STARTTLS: \"none\", \"may\" (when offered, "
        "unverified) or \"encrypt\" (required, certificate verified; else deferred)",
        choices=("none", "may", "encrypt"),
    )
    smtp_tls_ca_file: str = _f(
        "", "str", "PEM CA certificates that verify the hop with smtp_tls = \"encrypt\" "
        "(empty: the system store)"
    )
    relay_auth_file: str = _f(
        "", "str", "Credentials for SMTP hops, \"[HOST]:PORT user:password\" per line (mode "
        "0600); sent with AUTH PLAIN/LOGIN only inside TLS (empty: no AUTH)"
    )
    queue_dir: str = _f("var/queue", "str", "The delivery queue's directory (queued transports)")
    minimal_backoff_time: float = _f(
        300.0, "duration", "First retry of a deferred recipient after this long", minimum=1
    )
    maximal_backoff_time: float = _f(
        4000.0, "duration", "Longest wait between two delivery attempts", minimum=1
    )
    maximal_queue_lifetime: float = _f(
        432000.0, "duration", "A recipient still deferred after this long is failed", minimum=1
    )
    delay_warning_time: float = _f(
        0.0, "duration", "The sender of a message still deferred after this long gets one "
        "delay notice (RFC 3464 Action: delayed); 0: never"
    )
    notify_postmaster: tuple[str, ...] = _f(
        [], "notice_classes", "Notices postmaster@ the first of domains gets a copy of "
        "(headers only): \"bounce\", \"delay\"; empty: none"
    )
    queue_minfree: int = _f(
        78643200, "size", "Free space the queue and Maildir filesystems keep: below it MAIL "
        "gets 452 4.3.1"
    )
    active_limit: int = _f(
        1000, "int", "Queued messages held in memory for delivery at once", minimum=1,
        maximum=1_000_000,
    )
    concurrency: int = _f(20, "int", "Deliveries running at once, in total", minimum=1,
                          maximum=10_000)
    destination_concurrency: int = _f(
        20, "int", "Deliveries running at once to one transport destination", minimum=1,
        maximum=10_000,
    )
    stuck_queue_age: float = _f(
        3600.0, "duration", "/health warns when the oldest queued message (or a transport "
        "unreachable) is older than this", minimum=1
    )

    def all_routes(self) -> tuple[routing.Route, ...]:
        """[[delivery.route]] plus relay_transport for each relay domain not routed there."""
        return self.route + routing.relay_routes(self.relay_domains, self.relay_transport,
                                                 self.route)


@dataclass(frozen=True)
class ApiConfig:
    listen: ListenAddress = _f(
        ListenAddress("127.0.0.1", 8080), "listen1", "Admin HTTP address (/metrics, /health)"
    )
    enable_profiling: bool = _f(False, "bool", "Serve /debug/pprof/heap (tracemalloc)")
    token_file: str = _f(
        "", "str", "File holding the bearer token every path but /health then requires "
        "(required when listen is not loopback)"
    )


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _f(
        "info", "choice", "Least severe level logged", choices=("debug", "info", "warning", "error")
    )
    format: str = _f(
        "auto", "choice", "Log output format", choices=("auto", "journal", "json", "text")
    )


@dataclass(frozen=True)
class TlsConfig:
    certificate: str = _f("", "str", "PEM certificate chain for STARTTLS (empty: no STARTTLS)")
    key: str = _f("", "str", "PEM private key for the certificate")
    required: bool = _f(False, "bool", "Refuse MAIL before STARTTLS (530 5.7.0)")


@dataclass(frozen=True)
class Config:
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    source: str = field(default="<built-in defaults>", compare=False)


SECTIONS: dict[str, type[Any]] = {
    "memory": MemoryConfig,
    "server": ServerConfig,
    "delivery": DeliveryConfig,
    "api": ApiConfig,
    "logging": LoggingConfig,
    "tls": TlsConfig,
}


def iter_keys() -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every accepted key as ("section", field), in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


def _check_number(value: float, meta: Mapping[str, Any]) -> None:
    lo, hi = meta["min"], meta["max"]
    if isinstance(value, int) and value > INT64_MAX:  # TOML integers are 64-bit
        raise ValueError(f"must be at most {INT64_MAX}, got {value}")
    if lo is not None and value < lo:
        why = f": {meta['why']}" if meta.get("why") else ""
        raise ValueError(f"must be at least {lo}, got {value}{why}")
    if hi is not None and value > hi:
        raise ValueError(f"must be at most {hi}, got {value}")


def _domain_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of domain names, got {value!r}")
    out = []
    for v in value:
        d = v.strip().lower().rstrip(".")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", d):
            raise ValueError(f"{v!r} is not a domain name")
        out.append(d)
    return tuple(out)


NOTICE_CLASSES = ("bounce", "delay")  # [delivery] notify_postmaster


def _notice_classes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of notice classes ({', '.join(NOTICE_CLASSES)}), "
                         f"got {value!r}")
    for i, v in enumerate(value):
        if v not in NOTICE_CLASSES:
            raise ValueError(f"{v!r} is not a notice class (known: {', '.join(NOTICE_CLASSES)})")
        if v in value[:i]:
            raise ValueError(f"{v!r} twice")
    return tuple(value)


def _listen_list(value: object) -> tuple[ListenAddress, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected \"host:port\" or a non-empty list of them, got {value!r}")
    return tuple(parse_listen(v) for v in items)


def _strict(kind: type | tuple[type, ...], name: str) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ValueError(f"expected {name}, got {type(value).__name__} {value!r}")
        return value

    return parse


def _workers(value: object) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer 1-64 or \"auto\", got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
    if "\x00" in value:  # reaches file names and headers, where NUL cannot be
        raise ValueError(f"{value!r} holds a NUL character")
    return value


def _hostname(value: object) -> str:
    name = _text(value)
    return check_hostname(name) if name else ""


def uvloop_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


_PARSERS: dict[str, Callable[[object], Any]] = {
    "workers": _workers,
    "size": parse_size,
    "duration": parse_duration,
    "int": _strict(int, "an integer"),
    "fraction": lambda v: float(_strict((int, float), "a number between 0.0 and 1.0")(v)),
    "bool": _strict(bool, "true or false"),
    "str": _text,
    "hostname": _hostname,
    "choice": _strict(str, "a string"),
    "listen": _listen_list,
    "listen1": parse_listen,
    "domains": _domain_list,
    "notice_classes": _notice_classes,
    "recipients": recipients.parse_mode,
    "transport": routing.parse_spec,
    "routes": routing.parse_routes,
    "relay_transport": routing.parse_relay_spec,
    "relay_recipients": recipients.parse_relay_mode,
}


def _parse_value(meta: Mapping[str, Any], raw: object) -> Any:
    value = _PARSERS[meta["kind"]](raw)
    if meta["kind"] == "fraction" and not 0.0 < value <= 1.0:
        raise ValueError(f"must be between 0.0 and 1.0, got {value}")
    if meta["kind"] in ("size", "duration", "int") or (
        meta["kind"] == "workers" and isinstance(value, int)
    ):
        _check_number(value, meta)
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(meta['choices'])}, got {value!r}")
    return value


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Best-effort line number of `[section]` or `key` inside it (tomllib gives none)."""
    current = None
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"\[\s*([A-Za-z0-9_.-]+)\s*\]", s)
        if m:
            current = m.group(1)
            if key is None and current == section:
                return no
            continue
        if key is not None and current == section and re.match(rf"{re.escape(key)}\s*=", s):
            return no
    return None


def _where(source: str, text: str, section: str, key: str | None = None) -> str:
    # A key left at its default has no line: point at its section, where it would go.
    line = (_line_of(text, section, key) or _line_of(text, section, None)) if text else None
    loc = f"{source}:{line}" if line else source
    return f"{loc}: [{section}]" + (f" {key}" if key else "")


def locate(cfg: Config, section: str, key: str | None = None) -> str:
    """"FILE:LINE: [section] key" for a problem found after loading (runtime.problems)."""
    try:
        text = Path(cfg.source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        text = ""
    return _where(cfg.source, text, section, key)


def build(data: Mapping[str, Any], source: str = "<built-in defaults>", text: str = "") -> Config:
    """Config from parsed TOML; raises ConfigError with every problem found."""
    problems: list[str] = []

    def where(section: str, key: str | None = None) -> str:
        return _where(source, text, section, key)

    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in SECTIONS:
            problems.append(
                f"{where(name)}: unknown section (known: {', '.join(SECTIONS)})"
            )
            continue
        if not isinstance(raw, dict):
            problems.append(f"{source}: {name}: expected a [{name}] table")
            continue
        cls = SECTIONS[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            f = fields.get(key)
            if f is None:
                hint = _closest(key, fields)
                problems.append(
                    f"{where(name, key)}: unknown key" + (f" (did you mean {hint}?)" if hint else "")
                )
                continue
            try:
                values[key] = _parse_value(f.metadata, value)
            except ValueError as exc:
                problems.append(f"{where(name, key)}: {exc}")
        try:
            sections[name] = cls(**values)
        except TypeError as exc:  # pragma: no cover - fields are validated above
            problems.append(f"{where(name)}: {exc}")

    cfg = Config(**sections, source=source) if not problems else None
    if cfg is not None:
        m = cfg.memory
        if not m.memory_warning_threshold <= m.gc_threshold <= m.memory_critical_threshold:
            problems.append(
                f"{where('memory')}: thresholds out of order: memory_warning_threshold "
                f"({m.memory_warning_threshold}) <= gc_threshold ({m.gc_threshold}) <= "
                f"memory_critical_threshold ({m.memory_critical_threshold}) must hold"
            )
        if m.per_connection_memory_limit > m.max_memory_usage:
            problems.append(
                f"{where('memory', 'per_connection_memory_limit')}: larger than max_memory_usage"
            )
        problems.extend(_tls_problems(cfg.tls, where))
        d = cfg.delivery
        problems.extend(f"{where('delivery', key)}: {problem}"
                        for key, problem in recipients.problems(
                            d.recipients, d.aliases, d.domains,
                            getattr(d, "transport", "maildir"), d.relay_recipients,
                            d.relay_domains))
        if not is_loopback(cfg.api.listen) and not cfg.api.token_file:
            problems.append(
                f"{where('api', 'listen')}: {cfg.api.listen} is not a loopback address: set "
                "[api] token_file (a file holding a bearer token) so that /metrics and "
                "/api/stats are not open to the network"
            )
        problems.extend(f"{where('delivery', 'route')}: {problem}"
                        for problem in routing.problems(d.route, d.domains + d.relay_domains))
        problems.extend(f"{where('delivery', key)}: {problem}"
                        for key, problem in routing.relay_problems(
                            d.relay_domains, d.relay_transport, d.route, d.domains))
        if d.relay_auth_file and d.smtp_tls == "none":
            problems.append(f"{where('delivery', 'smtp_tls')}: \"none\", but relay_auth_file "
                            "is set: credentials are sent only inside TLS (use \"may\" or "
                            "\"encrypt\")")
        if d.notify_postmaster and not d.domains:
            problems.append(f"{where('delivery', 'notify_postmaster')}: the notices go to "
                            "postmaster@ the first of [delivery] domains, which is empty")
        if d.maximal_backoff_time < d.minimal_backoff_time:
            problems.append(f"{where('delivery', 'maximal_backoff_time')}: "
                            f"{d.maximal_backoff_time:g}s is below minimal_backoff_time "
                            f"({d.minimal_backoff_time:g}s)")
        if cfg.server.event_loop == "uvloop" and not uvloop_available():
            problems.append(f"{where('server', 'event_loop')}: \"uvloop\" but the uvloop module "
                            "is not installed (apt install python3-uvloop, or use \"auto\")")
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def _tls_problems(tls: TlsConfig, where: Callable[[str, str | None], str]) -> list[str]:
    if not tls.certificate and not tls.key:
        if tls.required:
            return [f"{where('tls', 'required')}: STARTTLS required but no certificate configured"]
        return []
    if not tls.certificate:
        return [f"{where('tls', 'certificate')}: a key is set but no certificate"]
    return []  # whether the files load is runtime.problems' question


def _closest(key: str, known: Mapping[str, Any]) -> str | None:
    import difflib

    hits = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return hits[0] if hits else None


def load(path: str | os.PathLike[str] | None) -> Config:
    """The effective config: `path`, else /etc/elemta/elemta.toml if present, else defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not valid UTF-8"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: TOML syntax error: {exc}"]) from None
    return build(data, str(p), text)


def warnings(cfg: Config) -> list[str]:
    """Valid but doubtful combinations: printed by check-config and logged at start."""
    out = []
    m, s = cfg.memory, cfg.server
    # All sessions at their limit at once (per_connection_memory_limit x max_connections) may
    # exceed the budget: the governor refuses new work at the critical threshold, so that worst
    # case is information for `check-config --explain`. Wrong is one session that can carry
    # the daemon from the critical threshold past its whole budget on its own.
    room = (1 - m.memory_critical_threshold) * m.max_memory_usage
    if m.per_connection_memory_limit > room:
        out.append(
            f"{cfg.source}: [memory] per_connection_memory_limit ({m.per_connection_memory_limit})"
            f" exceeds the room between memory_critical_threshold ({m.memory_critical_threshold})"
            f" and max_memory_usage ({m.max_memory_usage}): {int(room)} bytes; one session at "
            "its limit can exhaust the budget after the governor stopped admitting work"
        )
    if m.max_goroutines < 2 * s.max_connections:
        out.append(
            f"{cfg.source}: [memory] max_goroutines ({m.max_goroutines}) is below 2 x "
            f"[server] max_connections ({2 * s.max_connections}): the task cap will refuse "
            "connections before max_connections is reached"
        )
    if cfg.delivery.recipients == "any":
        out.append(
            f"{cfg.source}: [delivery] recipients = \"any\": every local part of "
            f"{', '.join(cfg.delivery.domains)} is accepted and its mailbox created on delivery; "
            "anyone can create mailboxes without bound"
        )
    d = cfg.delivery
    if routing.queued(d.transport) and d.recipients == "maildir":
        out.append(
            f"{cfg.source}: [delivery] transport = {d.transport!r} with recipients = \"maildir\": "
            "only users with a mailbox under maildir_root are accepted, not the LMTP server's "
            "users (recipients = \"lmtp\" asks the server)"
        )
    if not is_loopback(cfg.api.listen):
        out.append(
            f"{cfg.source}: [api] listen ({cfg.api.listen}) is not a loopback address: the "
            "admin endpoint is reachable from the network; every path but /health requires "
            "the bearer token of [api] token_file"
        )
    return out


def toml_string(value: str) -> str:
    """A TOML basic string: backslash, quote and every control character but tab escaped.

    Escaped as \\uXXXX (TOML 1.0 has no \\e or \\xHH); every other character, non-ASCII
    included, is written as itself, which TOML allows in UTF-8 documents.
    """
    return '"' + "".join(
        "\\" + c if c in '"\\' else f"\\u{ord(c):04X}" if _is_control(c) else c for c in value
    ) + '"'


def _is_control(c: str) -> bool:
    return (c < " " and c != "\t") or c == "\x7f"


def _toml_value(kind: str, value: Any) -> str:
    if kind == "duration":
        return toml_string(format_duration(value))
    if kind in ("listen", "domains", "notice_classes"):
        return "[" + ", ".join(toml_string(str(v)) for v in value) + "]"
    if kind == "listen1":
        return toml_string(str(value))
    if kind == "routes":
        return "[" + ", ".join(f"{{ domain = {toml_string(r.domain)}, transport = "
                               f"{toml_string(r.transport)} }}" for r in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    return repr(value)  # int, or a float in (0, 1]: Python's repr is a TOML number


def to_toml(cfg: Config) -> str:
    """The effective configuration as TOML that `load` reads back to an equal Config."""
    # A comment may hold no control character either: the source is shown as a TOML string.
    lines = [f"# effective configuration (source: {toml_string(cfg.source)})"]
    for section in SECTIONS:
        obj = getattr(cfg, section)
        lines.append(f"\n[{section}]")
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(f.metadata['kind'], getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"
