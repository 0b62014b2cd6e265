"""The chunked DATA decoder against a line-at-a-time reference with aiosmtpd 1.4.5+ semantics.

The reference mirrors aiosmtpd's smtp_DATA loop (readuntil(b"\\r\\n"), the lone-dot end, dot
removal, the 1001-octet line limit, the size limit); the decoder must store the same bytes and
reach the same verdict for every input and every way of cutting it into chunks.
"""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from elemta.smtp.dataparse import LINE_LIMIT, DataDecoder, DataState, to_lf


def reference(stream: bytes, size_limit: int | None) -> tuple[bytes, DataState, bytes] | None:
    """(stored bytes, state, bytes after the end) or None when the end is never seen."""
    pos, out, state, size = 0, [], DataState.NOMINAL, 0
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return None
        line = stream[pos : end + 2]
        pos = end + 2
        if line == b".\r\n":
            break
        if len(line) > LINE_LIMIT and state is DataState.NOMINAL:
            state = DataState.TOO_LONG
        if line.startswith(b"."):
            line = line[1:]
        size += len(line)
        if size_limit is not None and size > size_limit and state is DataState.NOMINAL:
            state = DataState.TOO_MUCH
        out.append(line)
    stored = b"".join(out) if state is DataState.NOMINAL else b""
    return stored, state, stream[pos:]


def decode(stream: bytes, cuts: list[int], size_limit: int | None) -> tuple[bytes, DataState, bytes] | None:
    d = DataDecoder(size_limit)
    out = []
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(bounds):
        data, rest = d.feed(stream[a:b])
        out.append(data)
        if rest is not None:
            stored = b"".join(out) if d.state is DataState.NOMINAL else b""
            return stored, d.state, rest + stream[b:]
        assert d.held <= LINE_LIMIT + 2
    return None


# Inputs built from the pieces that matter: CR, LF, dots, line ends, long runs.
pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"xyz ", b"\r\n.\r\n", b".\r\n",
                          b"\n.\n", b"\r.\r", b"\x00", b"\xff", b"b" * 600, b"c" * 1000])
streams = st.lists(pieces, max_size=40).map(b"".join)


@settings(max_examples=int(os.environ.get("ELEMTA_EXAMPLES", "600")), deadline=None)
@given(streams, st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
       st.one_of(st.none(), st.integers(min_value=0, max_value=3000)))
def test_decoder_matches_the_line_parser(stream: bytes, cuts: list[int], limit: int | None) -> None:
    stream += b"\r\n.\r\nQUIT\r\n"
    want = reference(stream, limit)
    got = decode(stream, cuts, limit)
    assert got is not None and want is not None
    # The decoder counts stored bytes; the reference counts them the same way.
    assert got == want


def test_empty_message() -> None:
    assert decode(b".\r\nNOOP\r\n", [], None) == (b"", DataState.NOMINAL, b"NOOP\r\n")


def test_marker_split_across_every_boundary() -> None:
    stream = b"line\r\n.\r\nNEXT"
    for cut in range(len(stream) + 1):
        assert decode(stream, [cut], None) == (b"line\r\n", DataState.NOMINAL, b"NEXT")


def test_leading_dot_unstuffed_at_start_and_after_chunks() -> None:
    assert decode(b"..a\r\n..b\r\n.\r\n", [3, 5], None) == (b".a\r\n.b\r\n", DataState.NOMINAL, b"")


def test_bare_lf_dot_does_not_end() -> None:
    assert decode(b"a\n.\nb\r\n.\r\n", [], None) == (b"a\n.\nb\r\n", DataState.NOMINAL, b"")


def test_long_line_memory_stays_bounded() -> None:
    d = DataDecoder(None)
    for _ in range(1000):
        d.feed(b"z" * 10_000)
        assert d.held <= LINE_LIMIT + 2
    assert d.state is DataState.TOO_LONG
    assert d.feed(b"\r\n.\r\n")[1] == b""


@settings(max_examples=int(os.environ.get("ELEMTA_EXAMPLES", "600")), deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\r\r\n", b"\n\r"]),
                max_size=40).map(b"".join))
def test_to_lf_equals_replacing_crlf_pairs(data: bytes) -> None:
    assert to_lf(data) == data.replace(b"\r\n", b"\n")
