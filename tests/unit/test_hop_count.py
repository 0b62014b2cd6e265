"""Received: headers counted while streaming, whatever the chunking (smtp/loop.py)."""

from __future__ import annotations

import random

import pytest

from elemta.smtp.loop import MAX_HOPS, HopCounter


def count(data: bytes, cuts: list[int]) -> int:
    c = HopCounter()
    prev = 0
    for cut in [*cuts, len(data)]:
        c.feed(data[prev:cut])
        prev = cut
    return c.hops


def reference(data: bytes) -> int:
    """The header section split into lines at once: what the counter must agree with."""
    header = data.split(b"\r\n\r\n", 1)[0] if not data.startswith(b"\r\n") else b""
    return sum(1 for line in header.split(b"\r\n") if line[:9].lower() == b"received:")


MESSAGES = [
    b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\nReceived: in the body\r\n",
    b"received:x\r\nRECEIVED: y\r\n\treceived: folded, not a header\r\nX-Received: no\r\n\r\n",
    b"Receive: no\r\nReceived:\r\nReceived\r\nReceived:\r\n\r\nReceived: body\r\n",
    b"\r\nReceived: all body\r\n",
    b"Subject: no end of header, no final CRLF Received: x",
    b"Received: x\r\n\r\n",
    b"A: 1\r\n\r\n\r\nReceived: body\r\n",
]


@pytest.mark.parametrize("data", MESSAGES)
def test_every_single_and_double_cut_gives_the_same_count(data: bytes) -> None:
    want = reference(data)
    assert count(data, []) == want
    for a in range(len(data) + 1):
        assert count(data, [a]) == want, (data, a)
        for b in range(a, len(data) + 1):
            assert count(data, [a, b]) == want, (data, a, b)


def test_byte_at_a_time_and_random_chunks() -> None:
    rng = random.Random(7)
    for _ in range(200):
        lines = [rng.choice([b"Received: from x", b"received:", b"Subject: s", b"\tcont",
                             b"Received", b"X: " + b"y" * rng.randrange(200)])
                 for _ in range(rng.randrange(80))]
        data = b"\r\n".join(lines) + b"\r\n\r\nReceived: body\r\n"
        cuts = sorted(rng.sample(range(len(data)), min(len(data), rng.randrange(1, 30))))
        assert count(data, cuts) == reference(data)
        assert count(data, list(range(1, len(data)))) == reference(data)


def test_limit_is_above_fifty() -> None:
    for hops, too_many in ((MAX_HOPS, False), (MAX_HOPS + 1, True)):
        c = HopCounter()
        c.feed(b"Received: x\r\n" * hops + b"\r\nbody\r\n")
        assert c.hops == hops and c.too_many is too_many and c.done
