"""`elemta loadtest`: the guide's "load test before production", built in.

N concurrent SMTP sessions (asyncio, one task each) send messages of a given size or size
distribution to a target until a message count or a duration is reached, optionally ramping the
sessions up. Memory stays bounded on the client: message bodies are streamed from one shared
64 KiB block, latencies go into a fixed log-scale histogram, counters are plain integers.

Pure parts (size distribution, histogram, report) are apart from the I/O (sessions, the /api/stats
poller) so tests can check them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .units import format_size, parse_size

LINE = b"x" * 78 + b"\r\n"  # 80-byte body lines; none starts with "." (no dot-stuffing)
BLOCK = LINE * 819  # 65520 bytes: the one buffer every session streams from
REPLY_LIMIT = 64 * 1024


class LoadtestError(Exception):
    """A bad option or target: one line for the user, exit status 2."""


# -- pure parts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SizeDistribution:
    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> SizeDistribution:
        """"10KiB" or "1KiB:70,100KiB:25,5MiB:5" (size:weight, weights relative)."""
        sizes, weights = [], []
        for part in text.split(","):
            size, _, weight = part.strip().partition(":")
            try:
                n = parse_size(size.strip())
                w = float(weight) if weight else 1.0
            except ValueError as exc:
                raise LoadtestError(f"--size {text!r}: {exc}") from None
            if n < 1 or w <= 0 or not math.isfinite(w):
                raise LoadtestError(f"--size {text!r}: sizes and weights must be positive")
            sizes.append(n)
            weights.append(w)
        return cls(tuple(sizes), tuple(weights))

    def pick(self, rng: random.Random) -> int:
        if len(self.sizes) == 1:
            return self.sizes[0]
        return rng.choices(self.sizes, self.weights)[0]

    def describe(self) -> str:
        if len(self.sizes) == 1:
            return format_size(self.sizes[0])
        total = sum(self.weights)
        return ", ".join(f"{format_size(s)} {w / total:.0%}"
                         for s, w in zip(self.sizes, self.weights, strict=True))


class Histogram:
    """Latencies in log-scale buckets (5% wide, 0.1 ms to ~10 min): percentiles within 5%
    in constant memory however long the run."""

    RATIO = 1.05
    FLOOR = 1e-4

    def __init__(self) -> None:
        self.counts: list[int] = [0] * 330
        self.n = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        i = 0 if seconds <= self.FLOOR else int(math.log(seconds / self.FLOOR, self.RATIO)) + 1
        self.counts[min(i, len(self.counts) - 1)] += 1
        self.n += 1
        self.max = max(self.max, seconds)

    def percentile(self, p: float) -> float | None:
        if self.n == 0:
            return None
        rank = max(1, math.ceil(p / 100 * self.n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                upper = self.FLOOR * self.RATIO ** i
                return min(upper, self.max)
        return self.max


@dataclass
class Results:
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0
    sessions_opened: int = 0
    sessions_failed: int = 0  # connect errors, resets, timeouts
    refused_at_greeting: int = 0
    messages_sent: int = 0  # DATA completed, whatever the answer
    messages_accepted: int = 0  # 250 after DATA
    messages_refused: int = 0  # a 4xx/5xx to MAIL, RCPT, DATA or the end of data
    bytes_accepted: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    errors: Counter[str] = field(default_factory=Counter)
    memory_peak: float | None = None  # utilization percent, from /api/stats
    states: list[str] = field(default_factory=list)  # memory state changes seen
    breakers: list[str] = field(default_factory=list)
    last_stats: dict[str, Any] | None = None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def progress(r: Results, now: float, active: int) -> str:
    elapsed = max(now - r.started, 1e-9)
    codes = " ".join(f"{c}:{n}" for c, n in sorted(r.replies.items()) if c[0] in "45") or "-"
    line = (f"{elapsed:6.1f}s  sessions {active:4d}  accepted {r.messages_accepted} "
            f"({r.messages_accepted / elapsed:.1f}/s)  4xx/5xx {codes}  p50 "
            f"{_ms(r.latency.percentile(50))} p99 {_ms(r.latency.percentile(99))}")
    if r.last_stats is not None:
        mem = r.last_stats.get("memory") or {}
        line += (f"  daemon {mem.get('utilization_percent', 0):.1f}% {mem.get('state', '?')}"
                 f" breaker {r.last_stats.get('breaker', '?')}")
    return line


def summary(r: Results) -> dict[str, Any]:
    elapsed = max(r.elapsed, 1e-9)
    return {
        "elapsed_seconds": round(r.elapsed, 3),
        "sessions": {"opened": r.sessions_opened, "failed": r.sessions_failed,
                     "refused_at_greeting": r.refused_at_greeting},
        "messages": {"sent": r.messages_sent, "accepted": r.messages_accepted,
                     "refused": r.messages_refused,
                     "accepted_per_second": round(r.messages_accepted / elapsed, 2),
                     "bytes_accepted": r.bytes_accepted,
                     "accepted_bytes_per_second": round(r.bytes_accepted / elapsed)},
        "replies": dict(sorted(r.replies.items())),
        "latency_seconds": {f"p{p}": r.latency.percentile(p) for p in (50, 90, 99)}
        | {"max": r.latency.max if r.latency.n else None, "count": r.latency.n},
        "errors": dict(sorted(r.errors.items())),
        "daemon": None if r.last_stats is None and r.memory_peak is None else {
            "memory_peak_percent": r.memory_peak, "states": r.states, "breaker": r.breakers},
    }


def table(r: Results, title: str) -> str:
    s = summary(r)
    m, lat = s["messages"], s["latency_seconds"]
    rows = [
        ("duration", f"{s['elapsed_seconds']:.1f} s"),
        ("sessions", f"{r.sessions_opened} opened, {r.refused_at_greeting} refused at the "
                     f"greeting, {r.sessions_failed} failed"),
        ("messages", f"{m['sent']} sent, {m['accepted']} accepted, {m['refused']} refused"),
        ("rate", f"{m['accepted_per_second']:.1f} msg/s accepted, "
                 f"{format_size(int(m['accepted_bytes_per_second']))}/s"),
        ("replies", ", ".join(f"{c}: {n}" for c, n in s["replies"].items()) or "-"),
        ("latency", f"MAIL to final reply: p50 {_ms(lat['p50'])}, p90 {_ms(lat['p90'])}, "
                    f"p99 {_ms(lat['p99'])}, max {_ms(lat['max'])}"),
    ]
    if r.errors:
        rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in s["errors"].items())))
    if s["daemon"] is not None:
        d = s["daemon"]
        peak = "-" if d["memory_peak_percent"] is None else f"{d['memory_peak_percent']:.2f}%"
        rows.append(("daemon memory", f"peak {peak}, states {' -> '.join(d['states']) or '-'}"
                                      f", breaker {' -> '.join(d['breaker']) or '-'}"))
    width = max(len(k) for k, _ in rows)
    return title + "\n" + "".join(f"  {k:<{width}}  {v}\n" for k, v in rows)


def check_target(host: str, port: int, allow_remote: bool) -> None:
    """Only loopback addresses unless allow_remote: a load test is not a flood tool."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LoadtestError(f"target {host}:{port}: {exc.strerror}") from None
    remote = sorted({str(i[4][0]) for i in infos
                     if not ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback})
    if remote and not allow_remote:
        raise LoadtestError(f"target {host}:{port} resolves to {', '.join(remote)}, not a "
                            "loopback address: pass --allow-remote to load a server you run")


# -- I/O ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    host: str
    port: int
    sessions: int
    sizes: SizeDistribution
    per_connection: int
    count: int | None  # messages in total
    duration: float | None  # seconds
    ramp: float  # seconds to reach `sessions`
    sender: str
    recipient: str
    timeout: float
    seed: int = 1


class _Budget:
    def __init__(self, plan: Plan) -> None:
        self.left = plan.count
        self.deadline = None if plan.duration is None else time.monotonic() + plan.duration

    def take(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
        return True


class _SmtpError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader, r: Results, timeout: float) -> str:
    """The code of one (possibly multi-line) reply, counted."""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise _SmtpError("closed")
        if len(line) < 4 or line[3:4] != b"-":
            code = line[:3].decode("ascii", "replace")
            r.replies[code] += 1
            return code


async def _send_body(writer: asyncio.StreamWriter, size: int, n: int) -> None:
    head = (f"Subject: elemta loadtest {n}\r\nMessage-ID: <loadtest.{n}.{time.time_ns()}@localhost>"
            "\r\n\r\n").encode()
    writer.write(head)
    left = max(0, size - len(head))
    while left >= len(BLOCK):
        writer.write(BLOCK)
        await writer.drain()
        left -= len(BLOCK)
    full, rest = divmod(left, len(LINE))
    writer.write(BLOCK[: full * len(LINE)])
    if rest:
        writer.write(b"x" * max(0, rest - 2) + b"\r\n")
    writer.write(b".\r\n")
    await writer.drain()


async def _session(plan: Plan, budget: _Budget, r: Results, rng: random.Random,
                   serial: Callable[[], int]) -> bool:
    """One connection: greeting, EHLO, up to per_connection messages, QUIT. False when the
    budget is spent before a message was even started."""
    if not budget.take():
        return False
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(plan.host, plan.port, limit=REPLY_LIMIT), plan.timeout)
        r.sessions_opened += 1
        if await _reply(reader, r, plan.timeout) != "220":
            r.refused_at_greeting += 1  # counts as one of the messages: the count is attempts
            return True
        writer.write(b"EHLO loadtest.localhost\r\n")
        if (await _reply(reader, r, plan.timeout))[0] != "2":
            return True
        for i in range(plan.per_connection):
            if i > 0 and not budget.take():
                break
            t0 = time.monotonic()
            size = plan.sizes.pick(rng)
            ok = True
            for cmd in (f"MAIL FROM:<{plan.sender}> SIZE={size}", f"RCPT TO:<{plan.recipient}>"):
                writer.write(cmd.encode() + b"\r\n")
                if (await _reply(reader, r, plan.timeout))[0] != "2":
                    ok = False
                    break
            if ok:
                writer.write(b"DATA\r\n")
                if await _reply(reader, r, plan.timeout) == "354":
                    await _send_body(writer, size, serial())
                    r.messages_sent += 1
                    if await _reply(reader, r, plan.timeout) == "250":
                        r.messages_accepted += 1
                        r.bytes_accepted += size
                    else:
                        ok = False
                else:
                    ok = False
            r.latency.add(time.monotonic() - t0)
            if not ok:
                r.messages_refused += 1
                writer.write(b"RSET\r\n")
                await _reply(reader, r, plan.timeout)
        writer.write(b"QUIT\r\n")
        await _reply(reader, r, plan.timeout)
    except (TimeoutError, OSError, _SmtpError) as exc:
        r.sessions_failed += 1
        kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else \
            type(exc).__name__ if not isinstance(exc, _SmtpError) else str(exc)
        r.errors[kind] += 1
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(TimeoutError, OSError):
                await writer.wait_closed()
    return True


async def _poll_stats(fetch: Callable[[], dict[str, Any]], r: Results, every: float) -> None:
    while True:
        try:
            doc = await asyncio.to_thread(fetch)
        except Exception as exc:
            r.errors[f"api: {type(exc).__name__}"] += 1
        else:
            r.last_stats = doc
            mem = doc.get("memory") or {}
            util = mem.get("utilization_percent")
            if isinstance(util, int | float):
                r.memory_peak = util if r.memory_peak is None else max(r.memory_peak, util)
            for seen, value in ((r.states, mem.get("state")), (r.breakers, doc.get("breaker"))):
                if isinstance(value, str) and (not seen or seen[-1] != value):
                    seen.append(value)
        await asyncio.sleep(every)


async def run(plan: Plan, fetch: Callable[[], dict[str, Any]] | None,
              show: Callable[[str], None] | None, every: float = 1.0) -> Results:
    """Run the plan to its end (count or duration); `show` gets a progress line every `every`."""
    r = Results()
    budget = _Budget(plan)
    rng = random.Random(plan.seed)
    counter = iter(range(1, 1 << 62))
    active = 0

    async def worker(delay: float) -> None:
        nonlocal active
        await asyncio.sleep(delay)
        active += 1
        try:
            while await _session(plan, budget, r, rng, lambda: next(counter)):
                pass
        finally:
            active -= 1

    side: list[asyncio.Task[None]] = []
    if fetch is not None:
        side.append(asyncio.create_task(_poll_stats(fetch, r, every)))
    if show is not None:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(every)
                show(progress(r, time.monotonic(), active))
        side.append(asyncio.create_task(ticker()))
    try:
        await asyncio.gather(*(worker(plan.ramp * i / plan.sessions)
                               for i in range(plan.sessions)))
    finally:
        r.elapsed = time.monotonic() - r.started
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
    if fetch is not None:  # the daemon after the load
        with contextlib.suppress(Exception):
            r.last_stats = await asyncio.to_thread(fetch)
    return r
