"""Dot-stuffing on the fly: what the stream sends decodes, with elemta's own DATA decoder, to
exactly the body, except that a bare LF goes out as CRLF (RFC 5321 2.3.8) and a body that does
not end with CRLF gets one."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from elemta.delivery.stream import DotStuffer, stuff
from elemta.smtp.dataparse import DataDecoder, DataState

# Pieces that make every dot/CR/LF arrangement likely; at most 200 of them keep every line
# under the 1000-octet limit, which the decoder (rightly) enforces.
PIECES = [b"\r\n", b".", b"\r", b"\n", b"a", b"\r\n.", b"..", b".\r\n", b"\r\n.\r\n"]
bodies = st.lists(st.sampled_from(PIECES), max_size=200).map(b"".join)


def decode(wire: bytes, step: int) -> bytes:
    decoder = DataDecoder(None)
    out = []
    for i in range(0, len(wire), step):
        got, rest = decoder.feed(wire[i:i + step])
        out.append(got)
        if rest is not None:
            assert rest == b"" and i + step >= len(wire), "end marker before the end"
            assert decoder.state is DataState.NOMINAL
            return b"".join(out)
    raise AssertionError("no end marker")


def expected(body: bytes) -> bytes:
    """The body with each bare LF made CRLF, ending with CRLF (unless empty)."""
    body = re.sub(rb"(?<!\r)\n", b"\r\n", body)
    return body if body == b"" or body.endswith(b"\r\n") else body + b"\r\n"


@settings(max_examples=2000)
@given(bodies, st.integers(1, 70), st.integers(1, 70))
def test_stuffed_stream_decodes_to_the_body(body: bytes, chunk: int, wire_step: int) -> None:
    assert decode(stuff(body, chunk), wire_step) == expected(body)


@given(bodies, st.integers(1, 70))
def test_chunk_size_does_not_change_the_bytes(body: bytes, chunk: int) -> None:
    assert stuff(body, chunk) == stuff(body, len(body) + 1)


def test_first_line_and_boundary_dots() -> None:
    assert stuff(b".a\r\n") == b"..a\r\n.\r\n"
    assert stuff(b"a\r\n.b\r\n", 3) == b"a\r\n..b\r\n.\r\n"  # "." starts chunk 2
    assert stuff(b"a\r\n.b\r\n", 2) == b"a\r\n..b\r\n.\r\n"  # CR | LF "." across chunks
    assert stuff(b"a\n.b") == b"a\r\n..b\r\n.\r\n"  # a bare LF goes out as CRLF
    assert stuff(b"a\r\n\n.b", 3) == b"a\r\n\r\n..b\r\n.\r\n"  # CRLF split, then bare LF
    assert stuff(b"a\r.b\r") == b"a\r.b\r\r\n.\r\n"  # a bare CR is data
    assert stuff(b"") == b".\r\n"
    assert stuff(b"x") == b"x\r\n.\r\n"


def test_a_lone_dot_line_cannot_end_the_message_early() -> None:
    s = DotStuffer()
    wire = s.feed(b"a\r\n") + s.feed(b".") + s.feed(b"\r\nb\r\n") + s.finish()
    assert wire == b"a\r\n..\r\nb\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(bodies, st.integers(1, 70))
def test_send_body_from_a_file_sends_what_stuff_makes(body: bytes, chunk: int) -> None:
    # Through a real socket: one chunk (read whole at open), exactly one chunk, several.
    import asyncio
    import socket
    import tempfile
    from pathlib import Path

    from elemta.delivery.stream import send_body

    async def go(path: Path) -> bytes:
        a, b = socket.socketpair()
        with a, b:
            _, writer = await asyncio.open_connection(sock=a)
            reader, _w2 = await asyncio.open_connection(sock=b)
            sent = await send_body(writer, path, None, 10.0, chunk_size=chunk)
            writer.close()
            got = await reader.read()
            _w2.close()
            assert sent == len(got)
            return got

    with tempfile.NamedTemporaryFile() as f:
        f.write(body)
        f.flush()
        assert asyncio.run(go(Path(f.name))) == stuff(body, chunk)


@given(bodies, st.integers(1, 70))
def test_a_body_known_crlf_clean_is_stuffed_alike_without_the_check(body: bytes, chunk: int) -> None:
    from elemta.delivery.stream import has_bare_lf

    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    after_cr, bare = False, False
    for piece in pieces:  # as store.QueueFile checks what it writes
        bare = bare or has_bare_lf(piece, after_cr)
        after_cr = piece[-1:] == b"\r"
    assert bare == (re.search(rb"(?<!\r)\n", body) is not None)
    if not bare:
        known = DotStuffer(crlf=True)
        assert b"".join(known.feed(p) for p in pieces) + known.finish() == stuff(body, chunk)


def test_send_body_to_a_peer_that_stops_reading_times_out() -> None:
    # Postfix's smtp_data_xfer_timeout: each wait for the socket to drain is bounded, so a
    # peer that takes the connection and reads nothing ends the delivery with TimeoutError
    # (a 4xx for every recipient), and the file is closed.
    import asyncio
    import socket
    import tempfile
    import time
    from pathlib import Path

    from elemta.delivery.stream import send_body

    async def go(path: Path) -> float:
        a, b = socket.socketpair()
        with a, b:
            _, writer = await asyncio.open_connection(sock=a)
            started = time.monotonic()
            try:
                await send_body(writer, path, None, 0.3)
            except TimeoutError:
                return time.monotonic() - started
            finally:
                writer.transport.abort()
            raise AssertionError("send_body returned though nothing was read")

    with tempfile.NamedTemporaryFile() as f:
        f.write((b"x" * 998 + b"\r\n") * 16_384)  # 16 MiB: more than the socket buffers hold
        f.flush()
        waited = asyncio.run(go(Path(f.name)))
    assert 0.3 <= waited < 5
