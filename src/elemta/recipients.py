"""Which local addresses may receive mail: [delivery] recipients, aliases, postmaster.

The decision is a pure function (`decide`) of the parsed maps and the mailbox. The one question
it cannot answer itself, whether a Maildir exists ("maildir" mode), is a stat that runs in the
store's executor, never on the event loop; its answer is remembered briefly (`MailboxCache`),
so the usual RCPT to a known user costs a dict lookup.

Maps are small text files read whole at start and on every reload (SIGHUP): one address or
`@domain` per line for `recipients = "file:PATH"`, `address: mailbox, mailbox` for aliases.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .store.maildir import Mailbox, mailbox_path

# RFC 5322 atext plus dots between atoms; anything else (quotes, slashes, NUL, non-ASCII)
# could not name a Maildir safely, so it is refused rather than mangled.
LOCALPART = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
POSTMASTER = "postmaster"

if TYPE_CHECKING:
    from .config import DeliveryConfig
MODES = ("maildir", "any", "file:PATH", "lmtp")
RELAY_MODES = ("any", "file:PATH", "smtp")  # [delivery] relay_recipients


class RecipientRefusal(enum.Enum):
    """Why a recipient is not accepted; smtp/policy.py turns each into its reply."""

    BAD_SYNTAX = "bad syntax"
    FOREIGN_DOMAIN = "not one of our domains"
    UNKNOWN_USER = "user unknown"
    LOOKUP_FAILED = "recipient lookup failed"  # "lmtp": the server could not be asked


class Lookup(enum.Enum):
    """`decide` cannot answer alone: the mailbox is accepted if its Maildir exists."""

    MAILDIR = "ask the maildir"
    LMTP = "ask the lmtp server"
    NEXT_HOP = "ask the relay domain's next hop"  # relay_recipients = "smtp"


class AddressProbe(Protocol):
    """recipients = "lmtp" (delivery/probe.py's LmtpProbe): None when it could not ask."""

    async def exists(self, address: str) -> bool | None: ...

    def forget(self) -> None: ...

    def abandon(self) -> None: ...

    async def close(self) -> None: ...


def parse_mailbox(address: str, domains: Collection[str]) -> Mailbox | RecipientRefusal:
    """The mailbox an RCPT address names (lower-cased), before asking whether it exists."""
    if address.lower() == POSTMASTER and domains:
        # RFC 5321 4.5.1: "RCPT TO:<Postmaster>" without a domain must be accepted.
        return Mailbox(next(iter(domains)), POSTMASTER)
    localpart, at, domain = address.rpartition("@")
    if not at or not localpart or not domain:
        return RecipientRefusal.BAD_SYNTAX
    domain = domain.lower().rstrip(".")
    if domain not in domains:
        return RecipientRefusal.FOREIGN_DOMAIN
    localpart = localpart.lower()
    if len(localpart) > 64 or not LOCALPART.fullmatch(localpart):
        return RecipientRefusal.BAD_SYNTAX
    return Mailbox(domain, localpart)


# -- the maps --------------------------------------------------------------------------------


class MapError(Exception):
    """A map file that does not parse; `problems` holds "path:line: problem" lines."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RecipientTable:
    """recipients = "file:PATH": listed addresses, and domains with a catch-all `@domain` line."""

    addresses: frozenset[Mailbox] = frozenset()
    catchall: frozenset[str] = frozenset()


Aliases = Mapping[Mailbox, tuple[Mailbox, ...]]


@dataclass(frozen=True)
class RecipientMap:
    mode: str  # "maildir", "any", "file" or "lmtp"
    table: RecipientTable = field(default_factory=RecipientTable)
    aliases: Aliases = field(default_factory=dict)
    description: str = ""  # for the start and reload log lines
    relay_mode: str = "any"  # relay_recipients: "any", "file" or "smtp"
    relay_table: RecipientTable = field(default_factory=RecipientTable)


def parse_mode(value: object) -> str:
    """[delivery] recipients: "maildir", "any", "file:PATH" (checked, not read, here) or "lmtp"."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
    if value in ("maildir", "any", "lmtp") or (value.startswith("file:") and value[5:].strip()):
        return value
    raise ValueError(f"must be \"maildir\", \"any\", \"file:PATH\" or \"lmtp\", got {value!r}")


def parse_relay_mode(value: object) -> str:
    """[delivery] relay_recipients: "any", "file:PATH" (checked, not read, here) or "smtp"."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
    if value in ("any", "smtp") or (value.startswith("file:") and value[5:].strip()):
        return value
    raise ValueError(f"must be \"any\", \"file:PATH\" or \"smtp\", got {value!r}")


def table_path(mode: str) -> str | None:
    return mode[5:].strip() if mode.startswith("file:") else None


def _entries(text: str, path: str) -> list[tuple[str, str]]:
    """("path:line", content) for each line that is neither blank nor a comment."""
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if content:
            out.append((f"{path}:{no}", content))
    return out


def _address(entry: str, domains: Collection[str], key: str = "domains") -> Mailbox | str:
    """A full address of one of our domains, or the problem with it."""
    localpart, at, domain = entry.lower().rpartition("@")
    if not at or not localpart or len(localpart) > 64 or not LOCALPART.fullmatch(localpart) \
            or not _DOMAIN.fullmatch(domain):
        return f"{entry!r} is not an address (local@domain)"
    if domain not in domains:
        return f"{domain} is not in [delivery] {key}"
    return Mailbox(domain, localpart)


def parse_table(text: str, path: str, domains: Collection[str],
                key: str = "domains") -> RecipientTable:
    """`key` names the config list `domains` comes from (relay_recipients: relay_domains)."""
    addresses: set[Mailbox] = set()
    catchall: set[str] = set()
    problems = []
    for where, entry in _entries(text, path):
        if entry.startswith("@"):
            domain = entry[1:].lower().rstrip(".")
            if domain not in domains:
                problems.append(f"{where}: {entry!r}: {domain} is not in [delivery] {key}")
            else:
                catchall.add(domain)
            continue
        box = _address(entry, domains, key)
        if isinstance(box, str):
            problems.append(f"{where}: {box}")
        else:
            addresses.add(box)
    if problems:
        raise MapError(problems)
    return RecipientTable(frozenset(addresses), frozenset(catchall))


def parse_aliases(text: str, path: str, domains: Collection[str]) -> dict[Mailbox, tuple[Mailbox, ...]]:
    """`alias@domain: mailbox@domain, mailbox@domain` per line.

    One level: a target is a mailbox and is never looked up again, so a target that is itself
    another alias would be silently not followed; it is refused instead. An alias may name
    itself among its targets (its own mailbox plus copies).
    """
    aliases: dict[Mailbox, tuple[Mailbox, ...]] = {}
    lines: dict[Mailbox, str] = {}
    problems = []
    for where, entry in _entries(text, path):
        key_text, colon, rest = entry.partition(":")
        key = _address(key_text.strip(), domains)
        if not colon:
            problems.append(f"{where}: expected \"address: mailbox, mailbox\"")
            continue
        if isinstance(key, str):
            problems.append(f"{where}: {key}")
            continue
        if key in aliases:
            problems.append(f"{where}: {key} is already an alias (at {lines[key]})")
            continue
        targets: list[Mailbox] = []
        for item in (t.strip() for t in rest.split(",")):
            box = _address(item, domains) if item else "an empty target"
            if isinstance(box, str):
                problems.append(f"{where}: {box}")
            elif box not in targets:
                targets.append(box)
        if not targets:
            problems.append(f"{where}: {key} has no target")
            continue
        aliases[key], lines[key] = tuple(targets), where
    for key, expanded in aliases.items():
        for target in expanded:
            if target != key and target in aliases:
                problems.append(f"{lines[key]}: target {target} is itself an alias (at "
                                f"{lines[target]}); aliases expand one level: name its mailboxes")
    if problems:
        raise MapError(problems)
    return aliases


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_map(mode: str, aliases_path: str, domains: Collection[str], relay: str = "any",
             relay_domains: Collection[str] = ()) -> RecipientMap:
    """The maps as the config names them. Raises OSError (with its filename) or MapError."""
    table = RecipientTable()
    path = table_path(mode)
    what = mode
    if path is not None:
        table = parse_table(_read(path), path, domains)
        what = (f"file {path} ({len(table.addresses)} address(es), "
                f"{len(table.catchall)} catch-all domain(s))")
    elif mode == "maildir":
        what = "maildir (existing mailboxes only)"
    elif mode == "lmtp":
        what = "lmtp (asked of the LMTP server at RCPT)"
    aliases = parse_aliases(_read(aliases_path), aliases_path, domains) if aliases_path else {}
    shown = f"{len(aliases)} alias(es) from {aliases_path}" if aliases_path else "no aliases"
    relay_table = RecipientTable()
    relay_path = table_path(relay)
    if relay_path is not None:
        relay_table = parse_table(_read(relay_path), relay_path, relay_domains, "relay_domains")
        shown += (f"; relay recipients: file {relay_path} ({len(relay_table.addresses)} "
                  f"address(es), {len(relay_table.catchall)} catch-all domain(s))")
    elif relay_domains:
        shown += f"; relay recipients: {relay}"
    return RecipientMap("file" if path is not None else mode, table, aliases, f"{what}; {shown}",
                        "file" if relay_path is not None else relay, relay_table)


def load_delivery_map(delivery: DeliveryConfig) -> RecipientMap:
    """load_map for the keys of [delivery]."""
    return load_map(delivery.recipients, delivery.aliases, delivery.domains,
                    delivery.relay_recipients, delivery.relay_domains)


def problems(mode: str, aliases_path: str, domains: Collection[str],
             transport: str = "maildir", relay: str = "any",
             relay_domains: Collection[str] = ()) -> list[tuple[str, str]]:
    """("key", problem) for each map file that cannot be read or parsed: config errors."""
    out: list[tuple[str, str]] = []
    if mode == "lmtp" and not transport.startswith("lmtp:"):
        out.append(("recipients", f"\"lmtp\" asks the LMTP server, but [delivery] transport is "
                                  f"{transport!r}: set transport = \"lmtp:HOST:PORT\" or "
                                  "\"lmtp:unix:/path\""))
    for key, path, parse, known in (
            ("recipients", table_path(mode), parse_table, domains),
            ("aliases", aliases_path or None, parse_aliases, domains),
            ("relay_recipients", table_path(relay),
             lambda t, p, d: parse_table(t, p, d, "relay_domains"), relay_domains)):
        if path is None:
            continue
        try:
            parse(_read(path), path, known)
        except OSError as exc:
            out.append((key, f"cannot read {path!r}: {exc.strerror or exc}"))
        except UnicodeDecodeError:
            out.append((key, f"{path}: not valid UTF-8"))
        except MapError as exc:
            out.extend((key, p) for p in exc.problems)
    return out


def decide(rmap: RecipientMap, box: Mailbox) -> tuple[Mailbox, ...] | RecipientRefusal | Lookup:
    """The mailboxes a recipient delivers into, its refusal, or "ask whether the Maildir exists"."""
    targets = rmap.aliases.get(box)
    if targets is not None:
        return targets
    if box.localpart == POSTMASTER or rmap.mode == "any":
        return (box,)
    if rmap.mode == "file":
        if box in rmap.table.addresses or box.domain in rmap.table.catchall:
            return (box,)
        return RecipientRefusal.UNKNOWN_USER
    if rmap.mode == "lmtp":
        return Lookup.LMTP
    return Lookup.MAILDIR


def decide_relay(rmap: RecipientMap, box: Mailbox) -> tuple[Mailbox, ...] | RecipientRefusal | \
        Lookup:
    """Whether a relay domain's recipient is taken (relay_recipients), or "ask the next hop".
    The file lists addresses lower-cased; the local part relayed keeps its case."""
    if rmap.relay_mode == "file":
        if Mailbox(box.domain, box.localpart.lower()) in rmap.relay_table.addresses or \
                box.domain in rmap.relay_table.catchall:
            return (box,)
        return RecipientRefusal.UNKNOWN_USER
    if rmap.relay_mode == "smtp":
        return Lookup.NEXT_HOP
    return (box,)


# -- the maildir question, off the loop -----------------------------------------------------

# A found mailbox is remembered longer than a missing one: a removed mailbox is rare, and a
# user just added with `elemta mailbox add` should not wait long after an earlier refusal.
FOUND_TTL = 30.0
MISSING_TTL = 2.0
CACHE_LIMIT = 4096  # entries; a flood of random names evicts the oldest, never grows it


def mailbox_exists(root: Path, box: Mailbox) -> bool:
    """Blocking (one stat): run it in an executor."""
    return os.path.isdir(mailbox_path(root, box))


class MailboxCache:
    """Whether a Maildir exists, asked in `executor` and remembered for a few seconds."""

    def __init__(self, root: Path, executor: Executor,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.executor = executor
        self.clock = clock
        self._seen: dict[Mailbox, tuple[bool, float]] = {}  # box -> (exists, valid until)
        self.lookups = 0  # stats made (tests read it)

    def cached(self, box: Mailbox) -> bool | None:
        hit = self._seen.get(box)
        if hit is None or hit[1] < self.clock():
            return None
        return hit[0]

    def forget(self) -> None:
        self._seen.clear()

    async def exists(self, box: Mailbox) -> bool:
        known = self.cached(box)
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.executor, mailbox_exists, self.root, box)
        self.lookups += 1
        self._seen.pop(box, None)
        if len(self._seen) >= CACHE_LIMIT:
            del self._seen[next(iter(self._seen))]
        self._seen[box] = (found, self.clock() + (FOUND_TTL if found else MISSING_TTL))
        return found


class Recipients:
    """What the SMTP layer asks at RCPT: the current maps plus the Maildir cache (or the
    LMTP probe for recipients = "lmtp")."""

    def __init__(self, rmap: RecipientMap, cache: MailboxCache,
                 probe: AddressProbe | None = None,
                 hop_probe: Callable[[str], AddressProbe] | None = None) -> None:
        self.map = rmap
        self.cache = cache
        self.probe = probe
        self._probe_target: str | None = None  # the transport `probe` was made for by _set_probe
        # relay_recipients = "smtp": one probe per next-hop spec, made on first use by hop_probe.
        self.hop_probe = hop_probe
        self.hop_probes: dict[str, AddressProbe] = {}
        self._hop_of: Callable[[str], str] = lambda domain: ""

    @classmethod
    def build(cls, delivery: DeliveryConfig, root: Path, executor: Executor,
              hop_probe: Callable[[str], AddressProbe] | None = None) -> Recipients:
        """Reads the map files: at start (config.load has just checked them) and nowhere else."""
        r = cls(load_delivery_map(delivery), MailboxCache(root, executor), hop_probe=hop_probe)
        r._set_probe(delivery)
        return r

    def _set_probe(self, delivery: DeliveryConfig) -> None:
        """A probe for recipients = "lmtp", asking [delivery] transport; the old one (if its
        target changed) closes its connection once its question in flight is answered."""
        self._set_hop_probes(delivery)
        target = getattr(delivery, "transport", "maildir") if delivery.recipients == "lmtp" \
            else None
        if target == self._probe_target:
            return
        if self.probe is not None:
            self.probe.abandon()
        self.probe = None
        if target is not None:
            from .delivery.probe import LmtpProbe  # only this mode needs the LMTP client
            self.probe = LmtpProbe(target)
        self._probe_target = target

    def _set_hop_probes(self, delivery: DeliveryConfig) -> None:
        """The next hop of each relay domain; a probe whose hop no domain uses any more (or
        every probe, when relay_recipients is no longer "smtp") is abandoned."""
        relay = set(delivery.relay_domains) if delivery.relay_recipients == "smtp" else set()
        hops = {r.domain: r.transport for r in delivery.all_routes() if r.domain in relay}
        for spec in [s for s in self.hop_probes if s not in hops.values()]:
            self.hop_probes.pop(spec).abandon()
        self._hop_of = lambda domain: hops.get(domain, "")

    def reload(self, delivery: DeliveryConfig) -> None:
        """Re-read the map files (SIGHUP); on OSError/MapError the current maps stay."""
        self.install(load_delivery_map(delivery), delivery)

    def install(self, rmap: RecipientMap, delivery: DeliveryConfig) -> None:
        """Put maps read elsewhere (off the event loop) in force."""
        self.map = rmap
        self._set_probe(delivery)
        self.cache.forget()  # an administrator who reloads expects new mailboxes seen at once
        if self.probe is not None:
            self.probe.forget()
        for hop in self.hop_probes.values():
            hop.forget()

    def resolve_now(self, box: Mailbox) -> tuple[Mailbox, ...] | RecipientRefusal | None:
        """`resolve`'s answer when it needs no lookup (the maps decide, or the Maildir cache
        remembers); None when only `resolve` can tell."""
        verdict = decide(self.map, box)
        if not isinstance(verdict, Lookup):
            return verdict
        if verdict is Lookup.LMTP:
            return None
        known = self.cache.cached(box)
        if known is None:
            return None
        return (box,) if known else RecipientRefusal.UNKNOWN_USER

    def resolve_relay_now(self, box: Mailbox) -> tuple[Mailbox, ...] | RecipientRefusal | None:
        """`resolve_relay`'s answer when relay_recipients decides without asking; else None."""
        verdict = decide_relay(self.map, box)
        return None if isinstance(verdict, Lookup) else verdict

    async def resolve(self, box: Mailbox) -> tuple[Mailbox, ...] | RecipientRefusal:
        known = self.resolve_now(box)
        if known is not None:
            return known
        if decide(self.map, box) is Lookup.LMTP:
            found = await self.probe.exists(str(box)) if self.probe is not None else None
            if found is None:
                return RecipientRefusal.LOOKUP_FAILED
            return (box,) if found else RecipientRefusal.UNKNOWN_USER
        return (box,) if await self.cache.exists(box) else RecipientRefusal.UNKNOWN_USER

    async def resolve_relay(self, box: Mailbox) -> tuple[Mailbox, ...] | RecipientRefusal:
        """A relay domain's recipient: relay_recipients decides, or its next hop is asked."""
        known = self.resolve_relay_now(box)
        if known is not None:
            return known
        spec = self._hop_of(box.domain)
        probe = self.hop_probes.get(spec)
        if probe is None and spec and self.hop_probe is not None:
            probe = self.hop_probes[spec] = self.hop_probe(spec)
        found = await probe.exists(str(box)) if probe is not None else None
        if found is None:
            return RecipientRefusal.LOOKUP_FAILED
        return (box,) if found else RecipientRefusal.UNKNOWN_USER

    async def close(self) -> None:
        if self.probe is not None:
            await self.probe.close()
        for hop in list(self.hop_probes.values()):
            await hop.close()
