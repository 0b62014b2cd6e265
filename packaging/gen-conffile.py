#!/usr/bin/env python3
"""Prints /etc/elemta/elemta.toml as the Debian package ships it: every key the code accepts, with
its description, type, range and default, commented out; only the values the package sets differ
from the built-in defaults are active. Generated from config.py at build time, so it cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from elemta import config  # noqa: E402
from elemta.config import _toml_value  # noqa: E402

# What the package changes from the built-in defaults, and why (printed above the key).
PACKAGE_VALUES = {
    ("server", "listen"): (
        '["127.0.0.1:25"]',
        "the SMTP port; used only when elemta.socket is masked (CAP_NET_BIND_SERVICE)",
    ),
    ("delivery", "maildir_root"): (
        '"/var/lib/elemta/mail"',
        "StateDirectory=elemta in elemta.service: the only writable place",
    ),
    ("delivery", "queue_dir"): (
        '"/var/lib/elemta/queue"',
        "StateDirectory=elemta in elemta.service: the only writable place",
    ),
}

HEADER = """\
# /etc/elemta/elemta.toml: configuration of elemta(8). Every key is documented in elemta.toml(5).
#
# Lines starting with '#' show the built-in default; remove the '#' to change a value.
# Sizes: bytes or "512MiB", "2GB"; durations: "5s", "250ms", "1m".
# Check your edits with `elemta check-config`, apply them with `systemctl reload elemta`
# (listen addresses, hostname, maildir_root and [logging] format need `systemctl restart elemta`).
#
# When elemta.socket is active (the default), systemd owns the SMTP listener (127.0.0.1:25) and
# [server] listen is not used: change the socket with `systemctl edit elemta.socket`.
#
# Only mailboxes that exist receive mail ([delivery] recipients = "maildir", the default);
# postmaster@ every domain exists from the first start. Add users with
# `elemta mailbox add user@domain` (as root: the mailbox is given to the elemta user).
"""


def _num(x: object) -> str:
    return str(int(x)) if isinstance(x, int | float) and x == int(x) else str(x)


def _range(meta: dict[str, object]) -> str:
    lo, hi, choices = meta["min"], meta["max"], meta["choices"]
    if choices:
        return "one of " + ", ".join(str(c) for c in choices)  # type: ignore[union-attr]
    if meta["kind"] == "fraction":
        return "0.0 < value <= 1.0"
    if lo is not None and hi is not None:
        return f"{_num(lo)} to {_num(hi)}"
    if lo is not None:
        return f"at least {_num(lo)}"
    if hi is not None:
        return f"at most {_num(hi)}"
    return ""


def render() -> str:
    out = [HEADER]
    defaults = config.Config()
    current = None
    for section, f in config.iter_keys():
        if section != current:
            out.append(f"\n[{section}]")
            current = section
        meta = dict(f.metadata)
        rng = _range(meta)
        out.append(f"# {meta['doc']} ({meta['kind']}{'; ' + rng if rng else ''})")
        default = _toml_value(str(meta["kind"]), getattr(getattr(defaults, section), f.name))
        override = PACKAGE_VALUES.get((section, f.name))
        if override is None:
            out.append(f"#{f.name} = {default}")
        else:
            value, why = override
            out.append(f"# built-in default {default}; the package uses {value}: {why}")
            out.append(f"{f.name} = {value}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
