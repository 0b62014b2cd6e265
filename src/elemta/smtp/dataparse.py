"""Incremental DATA decoder over large chunks: end marker, dot-unstuffing, line and size limits.

Semantics are aiosmtpd 1.4.5+'s line parser (the CVE-2024-27305 fix): a line ends only at
CRLF, so DATA ends only at CRLF "." CRLF; a bare LF or bare CR is ordinary data (it can
neither end the message nor start a stuffed line). A line may hold at most 1001 octets with
its CRLF (RFC 5321 4.5.3.1.6 plus the transparent dot). The difference is cost: the work is
done with bytes.find/replace/split over whole chunks instead of one Python step per line.
"""

from __future__ import annotations

import enum
import re

END = b"\r\n.\r\n"
CRLF = b"\r\n"
DOT_LINE = b"\r\n."  # a line starting with a dot: stuffed, or the end marker
LINE_LIMIT = 1001  # octets, CRLF included
_MAX_CONTENT = LINE_LIMIT - 2


_BARE_CR = re.compile(rb"\r(?!\n)")
# The regex engine scans for a literal's first byte with memchr, which beats bytes.find's
# search for these short needles (bench/datapath.py shows the decoder's total).
_DOT_LINE = re.compile(re.escape(DOT_LINE))
_END = re.compile(re.escape(END))


def to_lf(data: bytes) -> bytes:
    """`data` with every CRLF turned into LF (bare CRs kept), as the Maildir files store it.

    Deleting every CR is cheaper than replacing CRLF pairs one by one (no pair matching), and
    is the same thing when no CR stands alone, which one regex scan checks. (A one-byte
    replace deletes at memchr speed: a third of bytes.translate's time on 64 KiB of text.)
    """
    if _BARE_CR.search(data) is None:
        return data.replace(b"\r", b"")
    return data.replace(CRLF, b"\n")


class DataState(enum.Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too_long"  # a line over LINE_LIMIT: 500 5.5.2 at the end
    TOO_MUCH = "too_much"  # over the size limit: 552 5.3.4 at the end


def _lines_fit(portion: bytes) -> bool:
    """True when no CRLF-delimited line of `portion` (which starts with CRLF) is too long.

    Hops from CRLF to the last CRLF within reach of a full-length line, so a chunk of short
    lines costs one rfind per ~1000 bytes instead of one Python step per line.
    """
    pos, end = 0, len(portion)
    while end - pos - 2 > _MAX_CONTENT:
        pos = portion.rfind(CRLF, pos + 2, pos + 2 + _MAX_CONTENT + 2)
        if pos < 0:
            return False
    return True


class DataDecoder:
    """Feed raw DATA chunks; get unstuffed message bytes and, at the end, the bytes after it.

    Bytes kept between calls (`held`) are at most one partial line (<= LINE_LIMIT + 2), so
    memory per session is bounded whatever the client sends.
    """

    __slots__ = ("_carry", "_first", "size", "size_limit", "state")

    def __init__(self, size_limit: int | None) -> None:
        # The CRLF that ended the DATA command line starts the first line: it lets ".\r\n"
        # right away end an empty message and lets a leading dot be unstuffed.
        self._carry = CRLF
        self._first = True
        self.size = 0
        self.size_limit = size_limit
        self.state = DataState.NOMINAL

    @property
    def held(self) -> int:
        return len(self._carry)

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """Returns (message bytes to store, None) or, once the end is seen, (bytes, rest)."""
        buf = self._carry + chunk if self._carry else chunk
        # One scan finds the first CRLF "." : where there is none (most chunks of most mail),
        # there is neither an end marker nor a stuffed dot to look for.
        found = _DOT_LINE.search(buf)
        dot = found.start() if found is not None else -1
        marker = _END.search(buf, dot) if dot >= 0 else None
        end = marker.start() if marker is not None else -1
        if end >= 0:
            portion, rest = buf[: end + 2], buf[end + len(END) :]
            self._carry = b""
        elif self.state is not DataState.NOMINAL:
            # Draining after an error: only the end marker matters, and it may straddle
            # the next chunk by at most len(END) - 1 bytes.
            self._carry = buf[-(len(END) - 1) :]
            return b"", None
        else:
            rest = None
            cut = buf.rfind(CRLF)
            portion, self._carry = (b"", buf) if cut <= 0 else (buf[:cut], buf[cut:])
        stuffed = dot >= 0 and dot + len(DOT_LINE) <= len(portion)
        out = self._take(portion, stuffed) if portion and self.state is DataState.NOMINAL else b""
        if rest is None:
            # The line in progress is already too long: its octets after the CRLF that ends
            # the previous line, less a last CR, which the next chunk may pair with its LF
            # (TCP may split a line between CR and LF; the verdict may not depend on it).
            started = len(self._carry) - len(CRLF) - self._carry.endswith(b"\r")
            if self.state is DataState.NOMINAL and started > _MAX_CONTENT:
                # The CRLF in front of it ends the previous line, which a line parser has
                # counted by now.
                ended = 0 if self._first else 2
                over = self.size_limit is not None and self.size + ended > self.size_limit
                self._fail(DataState.TOO_MUCH if over else DataState.TOO_LONG)
            if self.state is not DataState.NOMINAL:
                self._carry = buf[-(len(END) - 1) :]
        return (out, rest) if self.state is DataState.NOMINAL else (b"", rest)

    def _take(self, portion: bytes, stuffed: bool) -> bytes:
        """Unstuffed bytes of complete lines; `portion` starts with the CRLF ending the last.
        `stuffed` False: the caller knows `portion` holds no CRLF "." to unstuff."""
        if not _lines_fit(portion):
            offset = 0
            for line in portion.split(CRLF):
                if len(line) > _MAX_CONTENT:
                    # Rare path: decide as a line parser would, in order: were the lines
                    # before this one already over the size limit?
                    before = self._unstuff(portion[:offset])
                    over = self.size_limit is not None and self.size + len(before) > self.size_limit
                    self._fail(DataState.TOO_MUCH if over else DataState.TOO_LONG)
                    return b""
                offset += len(line) + 2
        out = self._unstuff(portion, stuffed)
        self._first = False
        self.size += len(out)
        if self.size_limit is not None and self.size > self.size_limit:
            self._fail(DataState.TOO_MUCH)
        return out

    def _unstuff(self, portion: bytes, stuffed: bool = True) -> bytes:
        out = portion.replace(DOT_LINE, CRLF) if stuffed else portion
        return out[2:] if self._first else out

    def _fail(self, state: DataState) -> None:
        if self.state is DataState.NOMINAL:
            self.state = state
