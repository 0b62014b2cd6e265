"""Mail loops: count the Received: headers of a message while it streams in (RFC 5321 6.3).

A message that has passed more than MAX_HOPS hosts is refused at the end of DATA with
REPLY_TOO_MANY_HOPS, as Postfix does at its hopcount_limit (50). Two relays that forward a
domain to each other (a routing mistake) then stop the message after 50 rounds instead of
passing it back and forth forever.

`HopCounter` is incremental and pure: it sees the unstuffed DATA in chunks of any size and
keeps at most the first 9 bytes of the current line between chunks, so the count does not
depend on how TCP split the stream, and nothing is buffered. It stops looking at the first
empty line (the end of the header section): the body is never scanned.
"""

from __future__ import annotations

MAX_HOPS = 50
REPLY_TOO_MANY_HOPS = "554 5.4.6 Too many hops: mail forwarding loop"

_NAME = b"received:"
_N = len(_NAME)


class HopCounter:
    __slots__ = ("_head", "_skip", "done", "hops")

    def __init__(self) -> None:
        self.hops = 0
        self.done = False  # the header section has ended
        self._head = b""  # the current line's first bytes, up to len("received:")
        self._skip = False  # in the rest of a line already classified

    def feed(self, chunk: bytes) -> None:
        i, n = 0, len(chunk)
        while i < n and not self.done:
            if self._skip:
                j = chunk.find(b"\n", i)
                if j < 0:
                    return
                i, self._skip, self._head = j + 1, False, b""
                continue
            need = _N - len(self._head)
            j = chunk.find(b"\n", i, i + need)
            if j >= 0:  # a line shorter than "received:" (or the empty line)
                if (self._head + chunk[i:j]).rstrip(b"\r") == b"":
                    self.done = True
                    return
                i, self._head = j + 1, b""
                continue
            self._head += chunk[i:i + need]
            i += need
            if len(self._head) == _N:
                if self._head.lower() == _NAME:
                    self.hops += 1
                self._skip = True

    @property
    def too_many(self) -> bool:
        return self.hops > MAX_HOPS
