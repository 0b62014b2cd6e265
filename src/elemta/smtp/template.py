"""Cheap construction of aiosmtpd sessions: aiosmtpd's SMTP.__init__ state built once, stamped on each.

aiosmtpd's SMTP.__init__ rebuilds the same per-class tables for every connection: it runs
inspect.getmembers over the session and the handler (evaluating every attribute) and dir() over
both, the largest single cost of a one-message connection in a profile (py-spy). Those
tables depend only on the class, the handler and the constructor's arguments, which are the same
for every session of one configuration. So the first session is built by aiosmtpd's own
constructor; its state becomes the template, and later sessions get a copy in which every bound
method of the first session is re-bound to the new one and every list, dict and set is a fresh
copy. Nothing here names an aiosmtpd attribute, so it follows whatever aiosmtpd version is
installed (1.4.3 in Debian bookworm and 1.4.6 on PyPI build different tables).
"""

from __future__ import annotations

import asyncio
import collections
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

_COPIED: tuple[type, ...] = (list, dict, set, collections.deque)


def _protocol_keys(loop: asyncio.AbstractEventLoop) -> frozenset[str]:
    """The attributes asyncio's StreamReaderProtocol.__init__ sets: built fresh for each session."""
    probe = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop),
                                         client_connected_cb=lambda r, w: None, loop=loop)
    return frozenset(vars(probe))


def _refers_to(value: Any, obj: object) -> bool:
    if isinstance(value, types.MethodType):
        return value.__self__ is obj
    if isinstance(value, dict):
        return any(_refers_to(v, obj) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return any(_refers_to(v, obj) for v in value)
    return value is obj


class BoundMethods(Mapping[str, Any]):
    """A table of one session's methods, bound when looked up (aiosmtpd's command table).

    A copy of the prototype's dict would hold a bound method per command for every session:
    about 1.5 KiB of an idle session's 7 (tracemalloc). Read-only: a library that wrote to its
    table would fail loudly here instead of sharing a change between sessions."""

    __slots__ = ("_funcs", "_target")

    def __init__(self, funcs: dict[str, Callable[..., Any]], target: object) -> None:
        self._funcs = funcs
        self._target = target

    def __getitem__(self, key: str) -> Any:
        return types.MethodType(self._funcs[key], self._target)

    def __iter__(self) -> Iterator[str]:
        return iter(self._funcs)

    def __len__(self) -> int:
        return len(self._funcs)


def _copier(value: Any, proto: object) -> Callable[[object], Any]:
    """How one attribute of the prototype becomes the same attribute of a new session."""
    if isinstance(value, types.MethodType) and value.__self__ is proto:
        func = value.__func__
        return lambda target: types.MethodType(func, target)
    if value is proto:
        return lambda target: target
    if (isinstance(value, dict) and value
            and all(isinstance(v, types.MethodType) and v.__self__ is proto
                    for v in value.values())):
        funcs = {k: v.__func__ for k, v in value.items()}
        return lambda target: BoundMethods(funcs, target)
    if isinstance(value, dict):
        parts = [(k, _copier(v, proto)) for k, v in value.items()]
        return lambda target: {k: make(target) for k, make in parts}
    if isinstance(value, tuple) and _refers_to(value, proto):
        items = [_copier(v, proto) for v in value]
        kind = type(value)
        if hasattr(value, "_fields"):  # a namedtuple takes its fields as arguments
            return lambda target: kind(*(make(target) for make in items))
        return lambda target: kind(make(target) for make in items)
    if isinstance(value, _COPIED):
        seq: Any = value
        items = [_copier(v, proto) for v in seq]
        container: Any = type(value)
        return lambda target: container(make(target) for make in items)
    return lambda target: value  # immutable or shared by design (handler, loop, ssl context)


class SessionTemplate:
    """aiosmtpd's constructor state of one session, for stamping onto later sessions."""

    def __init__(self, proto: asyncio.StreamReaderProtocol, own: frozenset[str],
                 key: tuple[object, ...]) -> None:
        """`proto`: a session fully built by aiosmtpd; `own`: attributes its class set itself
        before calling aiosmtpd (per-session state, not copied); `key`: what it was built from."""
        self.key = key
        self._loop: asyncio.AbstractEventLoop = proto._loop  # type: ignore[attr-defined]
        skip = own | _protocol_keys(self._loop)
        callback = proto._client_connected_cb  # type: ignore[attr-defined]
        assert isinstance(callback, types.MethodType) and callback.__self__ is proto
        self._callback = callback.__func__
        self._items = tuple((name, _copier(value, proto)) for name, value in vars(proto).items()
                            if name not in skip)

    def fits(self, key: tuple[object, ...]) -> bool:
        """Built from these very objects? Identity, not equality: comparing configurations by
        value would walk every field on every connection after a reload that changed nothing."""
        return len(key) == len(self.key) and all(a is b for a, b in zip(key, self.key, strict=True))

    def stamp(self, target: asyncio.StreamReaderProtocol, reader_limit: int) -> None:
        """Give `target` (whose class set its own attributes already) aiosmtpd's state."""
        loop = self._loop
        asyncio.StreamReaderProtocol.__init__(
            target, asyncio.StreamReader(loop=loop, limit=reader_limit),
            client_connected_cb=types.MethodType(self._callback, target), loop=loop)
        state = target.__dict__
        for name, make in self._items:
            state[name] = make(target)
        # asyncio's FlowControlMixin keeps a deque (760 bytes, empty) for drain() waiters, of
        # which a session has at most one at a time; a list (56 bytes) does all it is used for
        # (append, remove, iterate).
        if isinstance(state.get("_drain_waiters"), collections.deque) \
                and not state["_drain_waiters"]:
            state["_drain_waiters"] = []
