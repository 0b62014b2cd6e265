"""Generate the journal message catalog (elemta.catalog) from events.py.

    python -m elemta.observe.catalog [PATH]    # default: packaging/journal/elemta.catalog

Installed to /usr/lib/systemd/catalog/ (then `journalctl --update-catalog`), it makes
`journalctl -x -u elemta` explain each event and what to do. @FIELD@ is replaced by journalctl
with the entry's field of that name.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ..events import EVENTS, Event

DEFAULT_PATH = Path("packaging/journal/elemta.catalog")
HEADER = (
    "# elemta journal message catalog. Generated from src/elemta/events.py by\n"
    "# `python -m elemta.observe.catalog`: edit events.py, not this file.\n"
)


def entry(event: Event) -> str:
    details = " ".join(f"{f}=@{f.upper()}@" for f in event.fields)
    body = event.explanation.rstrip("\n")
    if details:
        body += f"\n\nDetails: {details}"
    return (
        f"-- {event.message_id}\n"
        f"Subject: {event.summary}\n"
        "Defined-By: elemta\n"
        "Support: man:elemta(8)\n"
        "Documentation: man:elemta.toml(5)\n"
        "\n"
        f"{body}\n"
    )


def render() -> str:
    return HEADER + "".join("\n" + entry(e) for e in EVENTS.values())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m elemta.observe.catalog [PATH]", file=sys.stderr)
        return 2
    path = Path(args[0]) if args else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    print(f"wrote {path} ({len(EVENTS)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
