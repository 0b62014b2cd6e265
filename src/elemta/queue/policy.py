"""Pure decisions of the queue: when to try again, when to give up, what a reply means.

No I/O, no clock: `now` and the random source are arguments, so the tests pin them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Per-recipient states, as the meta records and `elemta queue` show them.
PENDING = "pending"  # not tried yet, or deferred (4xx): tried again later
DELIVERED = "delivered"
FAILED = "failed"  # 5xx, or still deferred at maximal_queue_lifetime

JITTER = 0.25  # a retry comes up to a quarter earlier, so a burst's retries spread out


@dataclass(frozen=True)
class Backoff:
    minimal: float  # minimal_backoff_time
    maximal: float  # maximal_backoff_time
    lifetime: float  # maximal_queue_lifetime


def backoff_delay(attempts: int, settings: Backoff, rng: random.Random) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1, 2, ...).

    Postfix's shape: minimal, doubling each time, capped at maximal; jittered downwards by up
    to JITTER (never below minimal).
    """
    base = settings.minimal * 2.0 ** min(max(attempts - 1, 0), 62)
    base = min(base, settings.maximal)
    return max(settings.minimal, base * (1.0 - JITTER * rng.random())) if base > settings.minimal \
        else base


def next_attempt(attempts: int, now: float, settings: Backoff, rng: random.Random) -> float:
    return now + backoff_delay(attempts, settings, rng)


def expired(created: float, now: float, lifetime: float) -> bool:
    return now - created >= lifetime


def delay_warning_due(created: float, now: float, warning_time: float, warned: float) -> bool:
    """Is the delay notice of a message with deferred recipients due now? Once it has been
    in the queue `warning_time` (delay_warning_time; 0: never), and only once: `warned` is
    when the notice was sent (0: not yet), kept in the message's record."""
    return warning_time > 0 and not warned and now - created >= warning_time


def outcome(code: int) -> str:
    """What the queue makes of a reply code for one recipient."""
    if 200 <= code < 300:
        return DELIVERED
    if code >= 500:
        return FAILED
    return PENDING


# Deferred messages wait in deferred/<bucket>/, a bucket per BUCKET seconds of due time: the
# scheduler lists bucket names (at most maximal_backoff_time / BUCKET of them) and opens only
# the due ones. A bucket is named after its end, so nothing is taken early; at most BUCKET late.
BUCKET = 10


def bucket_of(when: float) -> int:
    """The deferred/ bucket a message due at `when` waits in: ceil(when / BUCKET)."""
    return -int(-when // BUCKET)


def due_buckets(names: list[int], now: float) -> list[int]:
    """The buckets all of whose messages are due at `now`, oldest first."""
    return sorted(b for b in names if b * BUCKET <= now)
