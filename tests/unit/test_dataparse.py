"""The chunked DATA decoder against a line-at-a-time reference with aiosmtpd 1.4.5+ semantics.

The reference mirrors aiosmtpd's smtp_DATA loop as dataparse.py's docstring describes it: a
line ends only at CRLF, the lone-dot line ends DATA, a leading dot is removed, a line over
1001 octets with its CRLF is TOO_LONG, more stored octets than the size limit is TOO_MUCH
(whichever comes first wins). The decoder must store the same bytes, reach the same verdict
and hand back the same bytes after the end marker for every input, fed whole or cut into
chunks anywhere: TCP decides where segments end, the answer may not depend on it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from elemta.smtp.dataparse import LINE_LIMIT, DataDecoder, DataState, to_lf

Result = tuple[bytes, DataState, bytes]
EXAMPLES = int(os.environ.get("ELEMTA_EXAMPLES", "600"))
WIRE_MAX = LINE_LIMIT - 2  # octets of a line on the wire before its CRLF, a stuffed dot included
TAIL = b"\r\n.\r\nQUIT\r\n"


def reference(stream: bytes, size_limit: int | None) -> Result | None:
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


def decode(stream: bytes, cuts: Iterable[int], size_limit: int | None) -> Result | None:
    """Feeds `stream` cut at `cuts` (offsets modulo its length + 1) to one decoder."""
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


def agrees(stream: bytes, cut_sets: Iterable[Iterable[int]], size_limit: int | None) -> None:
    """Whole buffer == reference, and every cutting of `stream` == whole buffer."""
    whole = decode(stream, [], size_limit)
    want = reference(stream, size_limit)
    assert whole == want, f"whole buffer {brief(whole)} != reference {brief(want)}, limit {size_limit}"
    for cuts in cut_sets:
        cuts = list(cuts)
        got = decode(stream, cuts, size_limit)
        assert got == whole, f"cut at {cuts}: {brief(got)} != whole buffer {brief(whole)}, limit {size_limit}"


def brief(result: Result | None) -> str:
    """A failure message's view of a result: verdict, stored length, the bytes after the end."""
    return "no end" if result is None else f"({result[1].name}, {len(result[0])} octets stored, rest {result[2]!r})"


def crlf_splits(stream: bytes) -> list[int]:
    """Every offset between a CR and the LF after it."""
    return [i + 1 for i in range(len(stream) - 1) if stream[i : i + 2] == b"\r\n"]


def limit_line(wire: int, dot: bool, bare_cr: bool = False) -> bytes:
    """A line of `wire` octets before its CRLF, starting with a dot (stuffed) or not, ending
    with a bare CR or not (a CR that is data, right before the CR of the CRLF)."""
    lead, trail = b"." * dot, b"\r" * bare_cr
    return lead + b"L" * (wire - len(lead) - len(trail)) + trail + b"\r\n"


# Lines around the limit: 998 and 999 octets on the wire are legal (999 = a 998-octet line
# stuffed, or an unstuffed one that RFC 5321 would call long but the parser admits), 1000
# and 1001 are not.
LIMIT_LINES = [limit_line(w, dot, cr) for w in range(WIRE_MAX - 2, WIRE_MAX + 3)
               for dot in (False, True) for cr in (False, True)]

pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"xyz ", b"\r\n.\r\n", b".\r\n",
                          b"\n.\n", b"\r.\r", b"\x00", b"\xff", b"b" * 600, b"c" * 1000, *LIMIT_LINES])
streams = st.lists(pieces, max_size=16).map(b"".join)


@st.composite
def cut_sets(draw: st.DrawFn, stream: bytes) -> list[int]:
    """Cuts anywhere, and cuts biased to where a line can split badly: between CR and LF."""
    anywhere = st.integers(min_value=0, max_value=len(stream))
    splits = crlf_splits(stream)
    where = st.one_of(anywhere, st.sampled_from(splits)) if splits else anywhere
    return draw(st.lists(where, max_size=8))


@st.composite
def size_limits(draw: st.DrawFn, stream: bytes) -> int | None:
    """None, any small limit, or one within a line's length of what the stream stores."""
    nominal = reference(stream, None)
    assert nominal is not None
    stored = len(nominal[0])
    near = st.integers(min_value=max(0, stored - WIRE_MAX - 4), max_value=stored + 2)
    return draw(st.one_of(st.none(), st.integers(min_value=0, max_value=3000), near))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data(), streams)
def test_decoder_matches_the_line_parser_however_cut(data: st.DataObject, stream: bytes) -> None:
    stream += TAIL
    cuts = data.draw(cut_sets(stream), label="cuts")
    limit = data.draw(size_limits(stream), label="limit")
    agrees(stream, [cuts, crlf_splits(stream)], limit)


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(st.data(), st.lists(pieces.filter(lambda p: len(p) < 100), max_size=12).map(b"".join))
def test_short_streams_cut_at_every_offset(data: st.DataObject, stream: bytes) -> None:
    """Short inputs: every single cut, byte at a time, and every fixed chunk size."""
    stream += TAIL
    limit = data.draw(size_limits(stream), label="limit")
    n = len(stream)
    agrees(stream, itertools.chain(([c] for c in range(n + 1)),
                                   (range(0, n, size) for size in range(1, n + 1))), limit)


def test_lines_at_the_limit_cut_at_every_offset() -> None:
    """Each line around the limit, first in the message or after another, with size limits
    around it: every single cut, and every pair of cuts near its start and its CRLF."""
    for line, first in itertools.product(LIMIT_LINES, (True, False)):
        head = b"" if first else b"x\r\n"
        stream = head + line + b"next\r\n.\r\nQUIT\r\n"
        start, cr = len(head), len(head) + len(line) - 2
        near = sorted({*range(max(0, start - 2), start + 3), *range(cr - 2, cr + 4)})
        stored_before = len(head)  # where the size limit is crossed right at this line
        for limit in (None, stored_before - 1, stored_before, stored_before + 1,
                      stored_before + len(line) - 2, stored_before + len(line) - 1):
            if limit is not None and limit < 0:
                continue
            singles = ([c] for c in range(len(stream) + 1))
            agrees(stream, itertools.chain(singles, itertools.combinations(near, 2)), limit)


def test_the_legal_999_octet_stuffed_line_split_between_cr_and_lf() -> None:
    line = b"." + b"." + b"L" * 997 + b"\r\n"  # 998 octets stored, 999 on the wire
    stream = line + b".\r\n"
    want: Result = (line[1:], DataState.NOMINAL, b"")
    assert decode(stream, [], None) == want
    assert decode(stream, [len(line) - 1], None) == want


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


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\r\r\n", b"\n\r"]),
                max_size=40).map(b"".join))
def test_to_lf_equals_replacing_crlf_pairs(data: bytes) -> None:
    assert to_lf(data) == data.replace(b"\r\n", b"\n")
