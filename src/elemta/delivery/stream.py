"""A body file onto a socket as SMTP/LMTP DATA: dot-stuffed on the fly, in fixed-size chunks.

The queue's body files are CRLF, not dot-stuffed (delivery/base.py). Stuffing is a pure,
incremental step (`DotStuffer`): a line starts after CRLF (RFC 5321 4.5.2, and what elemta's
own DataDecoder unstuffs), so a bare LF or CR starts nothing. Only the last two bytes seen are
carried between chunks, which is all a line start split across a chunk boundary needs.

Reads go to an executor, never the event loop: the read of chunk n+1 runs while chunk n is
drained into the socket, so the executor costs a thread hop per chunk, not a wait.
`loop.sendfile` would avoid the copy, but stuffing must look at every byte anyway (a line
starting with "." changes the bytes sent), so the file is read either way.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import Executor
from pathlib import Path
from typing import BinaryIO

CHUNK = 64 * 1024
CRLF = b"\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")
# The same LFs, found from the LF: a literal first byte lets the regex engine skip to each LF
# at memchr speed where the form above tries every position (27 us against 650 us on 64 KiB).
_LF_NOT_AFTER_CR = re.compile(rb"\n(?<!\r\n)")
_DOT_LINE = re.compile(re.escape(b"\r\n."))
END = b".\r\n"


async def drain(writer: asyncio.StreamWriter, timeout: float) -> None:
    """`writer.drain()`, TimeoutError after `timeout` seconds. Not asyncio.wait_for, which
    wraps the drain in a task of its own (and a loop iteration to start it) for every command
    of every delivery, though a drain rarely has to wait. When the socket took everything
    there is nothing to wait for, and no timer is armed (a closing transport goes the long
    way, where drain raises what ended it)."""
    transport = writer.transport
    if not transport.get_write_buffer_size() and not transport.is_closing():
        return
    async with asyncio.timeout(timeout):
        await writer.drain()


def has_bare_lf(chunk: bytes, after_cr: bool) -> bool:
    """Does `chunk` hold a LF that no CR precedes (`after_cr`: the bytes before `chunk` ended
    with CR)? One scan from LF to LF (a third of the time of counting LFs and CRLFs)."""
    joined = after_cr and chunk[:1] == b"\n"  # CR | LF across chunks
    return _LF_NOT_AFTER_CR.search(chunk, 1 if joined else 0) is not None


class DotStuffer:
    """Feed the body in chunks of any size; `finish` gives the tail that closes DATA.

    `crlf`: the body is known to hold no bare LF (the queue checked it as it was written,
    store.QueueFile), so the check per chunk is skipped: a third of the stuffing's time."""

    __slots__ = ("_crlf_known", "_last2")

    def __init__(self, crlf: bool = False) -> None:
        # The CRLF that ends the DATA command line: the body's first line is a line start.
        self._last2 = CRLF
        self._crlf_known = crlf

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if not self._crlf_known:
            chunk = self._crlf(chunk)
        # Most chunks have no line starting with a dot: a regex scan finds that in half the
        # time of the replace, which then needs no copy.
        out = chunk if _DOT_LINE.search(chunk) is None else chunk.replace(b"\r\n.", b"\r\n..")
        if chunk[:1] == b"." and self._last2 == CRLF:
            out = b"." + out
        elif chunk[:2] == b"\n." and self._last2[-1:] == b"\r":
            # CR in the previous chunk, LF "." in this one: chunk.replace cannot see that pair.
            out = b"\n." + out[1:]
        self._last2 = chunk[-2:] if len(chunk) >= 2 else (self._last2 + chunk)[-2:]
        return out

    def _crlf(self, chunk: bytes) -> bytes:
        """A bare LF becomes CRLF (RFC 5321 2.3.8: line ends go out only as CRLF). Dovecot and
        Postfix end a line at a bare LF, so sent as-is "\n.\n" would end DATA early there."""
        joined = chunk[:1] == b"\n" and self._last2[-1:] == b"\r"
        if not has_bare_lf(chunk, joined):
            return chunk  # the usual case
        if joined:
            return b"\n" + _BARE_LF.sub(b"\r\n", chunk[1:])
        return _BARE_LF.sub(b"\r\n", chunk)

    def finish(self) -> bytes:
        """CRLF when the body did not end with one (the end marker must start a line), then "."."""
        return END if self._last2 == CRLF else CRLF + END


def stuff(body: bytes, chunk_size: int = CHUNK) -> bytes:
    """The whole DATA payload for `body` (for tests and small bodies)."""
    stuffer = DotStuffer()
    parts = [stuffer.feed(body[i:i + chunk_size]) for i in range(0, len(body), chunk_size)]
    return b"".join(parts) + stuffer.finish()


def _open(path: Path, chunk_size: int) -> tuple[BinaryIO | None, bytes]:
    """The file's first `chunk_size` bytes, and the open file if there may be more (None when
    that read reached the end: a regular file reads short only there). Most messages are one
    chunk: one trip to the executor instead of open, read, read, close."""
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed here or by send_body
    try:
        first = f.read(chunk_size)
    except BaseException:
        f.close()
        raise
    if len(first) < chunk_size:
        f.close()
        return None, first
    return f, first


async def send_body(writer: asyncio.StreamWriter, path: Path, executor: Executor | None,
                    timeout: float, chunk_size: int = CHUNK, crlf: bool = False) -> int:
    """Write `path` as DATA content plus the end marker; returns bytes written.

    `timeout` bounds each drain (Postfix's data_xfer timeout is per write, not per message: a
    large message on a slow link is not an error, a stalled peer is). Raises OSError,
    TimeoutError or ConnectionError; the caller turns them into per-recipient results.
    `crlf`: the body holds no bare LF (DotStuffer).
    """
    loop = asyncio.get_running_loop()
    f, first = await loop.run_in_executor(executor, _open, path, chunk_size)
    stuffer = DotStuffer(crlf)
    if f is None:
        last = stuffer.feed(first) + stuffer.finish()
        writer.write(last)
        await drain(writer, timeout)
        return len(last)
    pending: asyncio.Future[bytes] = loop.run_in_executor(executor, f.read, chunk_size)
    try:
        sent = 0
        # Each piece is written once the next read has answered, so the last one goes out
        # with the end marker in one write (one send, one segment).
        held = stuffer.feed(first)
        while True:
            chunk = await pending
            if not chunk:
                break
            pending = loop.run_in_executor(executor, f.read, chunk_size)
            writer.write(held)
            sent += len(held)
            await drain(writer, timeout)
            held = stuffer.feed(chunk)
        last = held + stuffer.finish()
        writer.write(last)
        await drain(writer, timeout)
        return sent + len(last)
    finally:
        # A read may still be in flight when the peer failed: let it finish before closing.
        # (its result or error no longer matters).
        await asyncio.wait([pending])
        await loop.run_in_executor(executor, f.close)
