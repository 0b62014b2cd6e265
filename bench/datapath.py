"""DATA path CPU per MiB: elemta's chunked decoder beside aiosmtpd's line loop, two levels.

    .venv/bin/python bench/datapath.py [--quick] [--rounds N] [--corpus-mib N] [--messages N]

decoder  In-process, one thread, the same bytes for both. elemta: DataDecoder fed the DATA
         stream in 64 KiB chunks (the server's read size), each piece of output turned to LF
         as the spool stores it. aiosmtpd: the installed aiosmtpd's own SMTP.smtp_DATA, run
         on an asyncio.StreamReader that a stand-in transport feeds the same 64 KiB chunks
         (pausing and resuming as a socket transport would), with a handler whose handle_DATA
         keeps the content and answers "250 OK": its real readuntil / size check / unstuff /
         join loop. CPU is time.thread_time() around the DATA phase only. Both results are
         checked once per corpus against each other and the message generated (LF endings):
         any difference stops the benchmark.
server   Real processes over loopback: a plain aiosmtpd (`python -m aiosmtpd`, Sink handler:
         parses and discards) and a real elemta daemon (durable: fsync before 250), both
         started by bench/common.py. One client connection sends N 1 MiB messages of each
         corpus; the server's CPU (utime + stime of its process tree, /proc/PID/stat) minus
         N times the per-message cost measured with tiny messages, per MiB of DATA.
Corpora: text (~76-char lines), long (998-char lines), dots (every line dot-stuffed, many
just "."), base64 (76-char MIME attachment lines). Rounds alternate the order; the tables
show medians and aiosmtpd / elemta ("times less CPU").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from common import MiB, Server, aiosmtpd_sink, elemta, median, send_messages, table, tree_cpu
from elemta.smtp.dataparse import DataDecoder, DataState
from elemta.smtp.dataparse import to_lf as crlf_to_lf
from elemta.smtp.server import CHUNK
from freshfs import spool_on_fresh_fs

CRLF = b"\r\n"
# elemta's bench config elsewhere lets 200 MiB in; the same limit for both decoders here,
# so both do their size bookkeeping.
SIZE_LIMIT = 200 * MiB
WORDS = (b"the of and to in is that for it as with was on be by this are from or at an mail "
         b"server message memory limit cgroup queue delivery header body line transfer data "
         b"receive spool ceiling reply client connection session process worker").split()


# -- corpora: message content (unstuffed, CRLF lines) ------------------------------------------
def _text(size: int, rng: random.Random) -> list[bytes]:
    lines = [b"From: Sender <sender@example.org>", b"To: bench@example.test",
             b"Subject: a typical text message", b"MIME-Version: 1.0",
             b"Content-Type: text/plain; charset=us-ascii", b""]
    total = 0
    while total < size:
        for _ in range(rng.randint(3, 12)):  # a paragraph
            line = b" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 14)))[:76]
            if rng.random() < 0.01:
                line = b"..." + line[3:]  # now and then an ellipsis at a line start
            lines.append(line)
            total += len(line) + 2
        lines.append(b"")
    return lines


def _long(size: int, rng: random.Random) -> list[bytes]:
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    return [bytes(rng.choices(alphabet, k=998)) for _ in range(size // 1000 + 1)]


def _dots(size: int, rng: random.Random) -> list[bytes]:
    lines, total = [], 0
    while total < size:
        kind = rng.random()
        if kind < 0.3:
            line = b"."  # a line that would end DATA unless stuffed
        elif kind < 0.5:
            line = b"." * rng.randint(2, 5)
        else:
            line = b"." + b" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))[:75]
        lines.append(line)
        total += len(line) + 2
    return lines


def _base64(size: int, rng: random.Random) -> list[bytes]:
    encoded = base64.b64encode(rng.randbytes(size * 3 // 4))
    return [b"Content-Type: application/octet-stream; name=\"attachment.bin\"",
            b"Content-Transfer-Encoding: base64", b"",
            *(encoded[i:i + 76] for i in range(0, len(encoded), 76))]


CORPORA: dict[str, Callable[[int, random.Random], list[bytes]]] = {
    "text (~76-char lines)": _text,
    "long (998-char lines)": _long,
    "dots (dot-stuffed lines)": _dots,
    "base64 attachment": _base64,
}


@dataclass(frozen=True)
class Corpus:
    name: str
    content: bytes  # the message as the client means it (CRLF lines)
    wire: bytes  # DATA as sent: dot-stuffed, ending with CRLF "." CRLF

    @property
    def stored(self) -> bytes:
        return self.content.replace(CRLF, b"\n")

    def chunks(self) -> list[bytes]:
        return [self.wire[i:i + CHUNK] for i in range(0, len(self.wire), CHUNK)]


def corpus(name: str, size: int, seed: int = 7) -> Corpus:
    content = CRLF.join(CORPORA[name](size, random.Random(seed))) + CRLF
    stuffed = (CRLF + content).replace(b"\r\n.", b"\r\n..")[2:]
    return Corpus(name, content, stuffed + b".\r\n")


# -- decoder level --------------------------------------------------------------------------------
def elemta_decode(chunks: list[bytes], to_lf: bool) -> bytes:
    """What elemta's DATA loop does with each chunk, minus the socket and the spool file;
    to_lf: also turn the output to LF, as the spool stores it."""
    decoder = DataDecoder(SIZE_LIMIT)
    stored: list[bytes] = []
    rest: bytes | None = None
    for chunk in chunks:
        out, rest = decoder.feed(chunk)
        if out:
            stored.append(crlf_to_lf(out) if to_lf else out)
        if rest is not None:
            break
    if rest != b"" or decoder.state is not DataState.NOMINAL:
        raise SystemExit(f"elemta decoder: state {decoder.state}, rest {rest!r:.60}")
    return b"".join(stored)


class _Transport(asyncio.Transport):
    """What StreamReader and StreamWriter need of a socket transport: replies are kept, and
    reading pauses when the reader holds more than twice its limit, as a real one does."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[bytes] = []
        self.may_read = asyncio.Event()
        self.may_read.set()

    def write(self, data: Any) -> None:
        self.replies.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        self.may_read.clear()

    def resume_reading(self) -> None:
        self.may_read.set()


class _KeepContent:
    content: bytes | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.content = envelope.original_content
        return "250 OK"


async def _aiosmtpd_data(chunks: list[bytes]) -> tuple[bytes, float]:
    """aiosmtpd's smtp_DATA over `chunks`; returns (content, CPU seconds of the DATA phase)."""
    loop = asyncio.get_running_loop()
    handler = _KeepContent()
    smtp = SMTP(handler, hostname="bench.test", data_size_limit=SIZE_LIMIT, loop=loop)
    # As aiosmtpd builds its own reader: the line length limit is the stream limit.
    reader = asyncio.StreamReader(limit=smtp.line_length_limit, loop=loop)
    transport = _Transport()
    reader.set_transport(transport)
    # The state a session has after EHLO, MAIL and RCPT (smtp_DATA checks these).
    smtp.transport = transport
    smtp._reader, smtp._writer = reader, asyncio.StreamWriter(transport, smtp, reader, loop)
    smtp.session = Session(loop)
    smtp.session.host_name = "bench.test"
    smtp.envelope = Envelope()
    smtp.envelope.mail_from = "sender@example.org"
    smtp.envelope.rcpt_tos = ["bench@example.test"]

    t0 = time.thread_time()
    task = loop.create_task(smtp.smtp_DATA(""))
    for chunk in chunks:
        await transport.may_read.wait()
        reader.feed_data(chunk)
    await task
    cpu = time.thread_time() - t0
    if transport.replies[-1:] != [b"250 OK\r\n"] or handler.content is None:
        raise SystemExit(f"aiosmtpd smtp_DATA: replies {transport.replies!r:.200}")
    return handler.content, cpu


def aiosmtpd_decode(chunks: list[bytes]) -> tuple[bytes, float]:
    return asyncio.run(_aiosmtpd_data(chunks))


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_same(c: Corpus) -> None:
    """Both must store the same message; stop loudly when they do not. aiosmtpd keeps CRLF,
    elemta's spool LF: compared as stored (LF), and the decoders' own output exactly too."""
    chunks = c.chunks()
    aiosmtpd_content = aiosmtpd_decode(chunks)[0]
    got = {"elemta DataDecoder": (elemta_decode(chunks, False), c.content),
           "aiosmtpd smtp_DATA": (aiosmtpd_content, c.content),
           "elemta as stored (LF)": (elemta_decode(chunks, True), c.stored),
           "aiosmtpd, LF": (aiosmtpd_content.replace(CRLF, b"\n"), c.stored)}
    for who, (a, b) in got.items():
        if a != b:
            at = _first_difference(a, b)
            raise SystemExit(f"datapath: {c.name}: {who} gave {len(a)} bytes, the message has {len(b)}; "
                             f"first difference at {at}: {a[at:at + 40]!r} vs {b[at:at + 40]!r}")


def elemta_cpu(chunks: list[bytes], wire_len: int, to_lf: bool, min_cpu: float = 0.05) -> float:
    """ms of CPU per MiB, repeating the decode until it has cost min_cpu seconds."""
    reps, spent = 0, 0.0
    while spent < min_cpu:
        t0 = time.thread_time()
        elemta_decode(chunks, to_lf)
        spent += time.thread_time() - t0
        reps += 1
    return spent / (reps * wire_len / MiB) * 1000


DECODERS = ("elemta", "elemta+LF", "aiosmtpd")


def decoder_level(corpora: list[Corpus], rounds: int) -> dict[tuple[str, str], list[float]]:
    figures: dict[tuple[str, str], list[float]] = {}
    for c in corpora:
        check_same(c)
    for rnd in range(rounds):
        for c in corpora:
            chunks = c.chunks()
            for who in DECODERS if rnd % 2 == 0 else reversed(DECODERS):
                if who == "aiosmtpd":
                    ms = aiosmtpd_decode(chunks)[1] / (len(c.wire) / MiB) * 1000
                else:
                    ms = elemta_cpu(chunks, len(c.wire), to_lf=who == "elemta+LF")
                figures.setdefault((c.name, who), []).append(ms)
    return figures


# -- server level ---------------------------------------------------------------------------------
TINY_ROW = "tiny message (ms each)"
TINY = b"Subject: tiny\r\n\r\nhello\r\n.\r\n"
# One elemta process (workers = 1), as one aiosmtpd process: the data path's cost, not the
# supervisor's.
SERVERS: dict[str, Callable[[], Server]] = {
    "aiosmtpd": aiosmtpd_sink, "elemta": lambda: elemta("[server]\nworkers = 1", "elemta")}


def server_round(server: Server, corpora: list[Corpus], messages: int, tiny: int) -> dict[str, float]:
    """ms of server CPU per MiB of DATA for each corpus (and "per message", for the tiny ones)."""
    send_messages(server.port, TINY, 10)  # warm-up: imports, first spool directories
    send_messages(server.port, corpora[0].wire, 2)
    cpu0 = tree_cpu(server.pid)
    send_messages(server.port, TINY, tiny)
    per_message = (tree_cpu(server.pid) - cpu0) / tiny
    out = {TINY_ROW: per_message * 1000}
    for c in corpora:
        cpu0 = tree_cpu(server.pid)
        send_messages(server.port, c.wire, messages)
        cpu = tree_cpu(server.pid) - cpu0 - messages * per_message
        out[c.name] = cpu / (messages * len(c.wire) / MiB) * 1000
    return out


def server_level(corpora: list[Corpus], rounds: int, messages: int, tiny: int) -> dict[tuple[str, str], list[float]]:
    figures: dict[tuple[str, str], list[float]] = {}
    for rnd in range(rounds):
        order = list(SERVERS) if rnd % 2 == 0 else list(reversed(SERVERS))
        for who in order:
            t0 = time.monotonic()
            with spool_on_fresh_fs():
                server = SERVERS[who]()
                try:
                    got = server_round(server, corpora, messages, tiny)
                finally:
                    server.stop()
            for key, value in got.items():
                figures.setdefault((key, who), []).append(value)
            print(f"datapath server round {rnd + 1}/{rounds} {who} ({time.monotonic() - t0:.0f} s): "
                  + ", ".join(f"{k.split()[0]} {v:.2f}" for k, v in got.items()) + " (ms)", flush=True)
    return figures


# -- report -----------------------------------------------------------------------------------------
def _ratio(a: float, e: float) -> str:
    return f"{a / e:.1f}x" if e > 0 else "-"


def _rows(figures: dict[tuple[str, str], list[float]], keys: list[str], columns: tuple[str, ...],
          unit: str) -> list[list[str]]:
    """One row per key: each column's median, then aiosmtpd / column for every elemta column."""
    elemtas = [c for c in columns if c != "aiosmtpd"]
    rows = [[f"median ({unit})", *columns, *(f"aiosmtpd / {e}" for e in elemtas)]]
    for key in keys:
        med = {c: median(figures.get((key, c), [])) for c in columns}
        rows.append([key, *(f"{med[c]:.2f}" for c in columns),
                     *(_ratio(med["aiosmtpd"], med[e]) for e in elemtas)])
    return rows


def run(quick: bool = False, rounds: int | None = None, corpus_mib: int | None = None,
        messages: int | None = None, servers: bool = True) -> None:
    """Both levels, printing their tables (what bench/run_all.py calls)."""
    rounds = rounds or (2 if quick else 5)
    size = (corpus_mib or (2 if quick else 4)) * MiB
    t_start = time.monotonic()
    corpora = [corpus(name, size) for name in CORPORA]
    dec = decoder_level(corpora, rounds * 2 - 1)  # cheap: more rounds, an odd count
    print(f"\nDATA decoder, in-process: CPU per MiB of DATA (thread_time), {rounds * 2 - 1} alternating "
          f"rounds over {size // MiB} MiB per corpus fed in {CHUNK // 1024} KiB chunks; elemta "
          f"DataDecoder (elemta+LF: and CRLF->LF as the spool stores it) vs aiosmtpd {version('aiosmtpd')} SMTP.smtp_DATA; "
          "stored bytes checked identical")
    print(table(_rows(dec, [c.name for c in corpora], DECODERS, "ms/MiB")))
    if not servers:
        return
    messages = messages or (8 if quick else 48)
    tiny = 100 if quick else 400
    one_mib = [corpus(name, MiB) for name in CORPORA]
    srv = server_level(one_mib, rounds, messages, tiny)
    print(f"\nDATA, real servers over loopback: server process tree CPU (/proc utime+stime) per MiB, "
          f"{messages} x 1 MiB per corpus on one connection, minus the per-message cost of {tiny} "
          f"tiny messages; {rounds} alternating rounds; elemta durable (fsync), aiosmtpd Sink "
          f"(discards); {time.monotonic() - t_start:.0f} s in all")
    rows = _rows(srv, [c.name for c in one_mib], ("elemta", "aiosmtpd"), "ms/MiB")
    rows += _rows(srv, [TINY_ROW], ("elemta", "aiosmtpd"), "ms")[1:]
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and bytes: a rough figure in about 40 s")
    ap.add_argument("--rounds", type=int, help="server rounds (default 5, --quick 2); the decoder gets 2n-1")
    ap.add_argument("--corpus-mib", type=int, help="MiB per corpus at decoder level (default 4, --quick 2)")
    ap.add_argument("--messages", type=int, help="1 MiB messages per corpus and server round (default 48, --quick 8)")
    ap.add_argument("--decoder-only", action="store_true", help="skip the real servers")
    args = ap.parse_args()
    run(args.quick, args.rounds, args.corpus_mib, args.messages, servers=not args.decoder_only)


if __name__ == "__main__":
    main()
