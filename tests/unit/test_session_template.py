"""Sessions stamped from the template carry the same state aiosmtpd's own constructor builds.

Runs against whichever aiosmtpd is installed: the venv's PyPI release in `make test`, Debian
bookworm's 1.4.3 when pybuild runs tests/unit during `make deb`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import types
from pathlib import Path
from typing import Any

import pytest

from elemta.config import build
from elemta.runtime import hostname
from elemta.smtp.server import ElemtaSMTP, SmtpContext
from elemta.smtp.template import BoundMethods
from elemta.store.maildir import Maildir


def context(tmp: Path, **server: Any) -> SmtpContext:
    cfg = build({"server": server, "delivery": {"maildir_root": str(tmp)}})
    return SmtpContext(cfg, Maildir(tmp, hostname(cfg.server)))


def same_state(a: Any, b: Any, a_owner: object, b_owner: object, where: str) -> None:
    """a (owned by a_owner) and b (owned by b_owner) are the same state, each bound to its owner."""
    if isinstance(a, types.MethodType):
        assert isinstance(b, types.MethodType), where
        assert a.__func__ is b.__func__, where
        if a.__self__ is a_owner:
            assert b.__self__ is b_owner, f"{where}: bound to the wrong session"
        else:
            assert a.__self__ is b.__self__, where
        return
    if a is a_owner:
        assert b is b_owner, where
        return
    if isinstance(b, BoundMethods):  # a method table, bound on lookup: same commands, same methods
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for k in a:
            same_state(a[k], b[k], a_owner, b_owner, f"{where}[{k!r}]")
        with pytest.raises(TypeError):
            b["DATA"] = None  # type: ignore[index]
        return
    if where == "_drain_waiters":  # asyncio's empty deque, kept as an empty list
        assert isinstance(a, collections.deque) and b == [] and not a, where
        return
    assert type(a) is type(b), where
    if isinstance(a, (list, dict, set, collections.deque)):
        assert a is not b, f"{where}: a mutable container shared between sessions"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_state(a[k], b[k], a_owner, b_owner, f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple, collections.deque)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_state(x, y, a_owner, b_owner, f"{where}[{i}]")
    elif isinstance(a, (asyncio.StreamReader, asyncio.Future)):
        assert a is not b, f"{where}: per-session stream object shared"
    elif not isinstance(a, set):
        assert a is b or a == b, f"{where}: {a!r} != {b!r}"


def test_stamped_session_equals_a_constructed_one(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = context(tmp_path)
        first = ElemtaSMTP(ctx)  # built by aiosmtpd's constructor; becomes the template
        assert ctx.template is not None
        stamped = ElemtaSMTP(ctx)
        reference = first
        assert vars(stamped).keys() == vars(reference).keys()
        for name, value in vars(reference).items():
            if name in ("ctx", "_stream_reader_wr"):
                continue
            same_state(value, vars(stamped)[name], reference, stamped, name)
        # The per-session readers and callbacks are the stamped session's own.
        assert stamped._stream_reader is not first._stream_reader
        assert stamped._client_connected_cb.__self__ is stamped
        assert stamped._smtp_methods["DATA"].__self__ is stamped

    asyncio.run(main())


def test_a_new_configuration_builds_a_new_template(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = context(tmp_path, max_message_size=4096)
        assert ElemtaSMTP(ctx).data_size_limit == 4096
        assert ElemtaSMTP(ctx).data_size_limit == 4096
        old = ctx.template
        ctx.config = dataclasses.replace(
            ctx.config, server=dataclasses.replace(ctx.config.server, max_message_size=8192))
        assert ElemtaSMTP(ctx).data_size_limit == 8192  # SIGHUP: the reloaded config applies
        assert ctx.template is not old
        assert ElemtaSMTP(ctx).data_size_limit == 8192
        # A reload that changed nothing still gives a new object: matched by identity, so the
        # template is rebuilt once instead of the configurations being compared per connection.
        built = ctx.template
        ctx.config = dataclasses.replace(ctx.config)
        ElemtaSMTP(ctx)
        assert ctx.template is not built and ctx.template is not None
        assert ctx.template.fits((ctx.config, ctx.tls, ctx.handler))

    asyncio.run(main())
