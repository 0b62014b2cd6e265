"""Reply syntax (RFC 5321 4.2): multi-line replies, and what is not a reply."""

from __future__ import annotations

import asyncio

import pytest

from elemta.delivery.client import ProtocolError, ServerReply, read_reply


def read(data: bytes) -> ServerReply:
    async def main() -> ServerReply:
        reader = asyncio.StreamReader(limit=2048)
        reader.feed_data(data)
        reader.feed_eof()
        return await read_reply(reader, 5, "in reply to X")
    return asyncio.run(main())


def test_multi_line_and_bare_code() -> None:
    r = read(b"250-lmtp.test\r\n250-PIPELINING\r\n250 8BITMIME\r\nextra")
    assert r == ServerReply(250, ("lmtp.test", "PIPELINING", "8BITMIME"))
    assert str(r.reply()) == "250 8BITMIME"
    assert read(b"250\r\n") == ServerReply(250, ("",))
    assert read(b"354 go ahead\n").code == 354  # a bare LF ending is tolerated


@pytest.mark.parametrize(("data", "problem"), [
    (b"HTTP/1.1 400 Bad Request\r\n", "garbage reply"),
    (b"25 short\r\n", "garbage reply"),
    (b"250x\r\n", "garbage reply"),
    (b"650 no such class\r\n", "garbage reply"),
    (b"250-a\r\n451 b\r\n", "reply codes 250 and 451 mixed"),
    (b"250-a\r\n", "lost connection in reply to X"),
    (b"", "lost connection in reply to X"),
    (b"250 " + b"x" * 5000 + b"\r\n", "reply line too long"),
    (b"250-x\r\n" * 200, "reply of more than 100 lines"),
])
def test_not_a_reply(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        read(data)


def test_silence_times_out_naming_the_phase() -> None:
    async def main() -> None:
        await read_reply(asyncio.StreamReader(), 0.05, "in reply to RCPT")
    with pytest.raises(TimeoutError, match="timed out in reply to RCPT"):
        asyncio.run(main())
