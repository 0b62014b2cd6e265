"""The common shape of a MAIL/RCPT path, parsed without the email package. A pure function.

email._header_value_parser (a full RFC 5322 tokenizer, command.parse_path_fully) took about a
tenth of the event loop's time for one small message per connection. Nearly every real path is
`<dot-atom@dot-atom>` followed by plain ESMTP parameters; for exactly those this gives the same
(address, rest) as that parser, and for anything else (quotes, comments, source routes,
literals, odd spacing) it returns None so the full parser decides.
"""

from __future__ import annotations

import re

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# The address, then either nothing or spaces and parameters made of printable ASCII other
# than the characters that start a comment or a quoted string in the email parser.
_PATH = re.compile(
    rf"<((?:{_ATOM}(?:\.{_ATOM})*@{_DOMAIN})?)>(?:[ ]+([!#-'*-\[\]-~][ !#-'*-\[\]-~]*))?"
)


def simple_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) for `<local@domain> PARAMS` or `<>`; None when it is not that simple."""
    m = _PATH.fullmatch(arg)
    if m is None:
        return None
    address, rest = m.group(1), m.group(2) or ""
    if rest.endswith(" "):
        return None  # trailing spaces: let the full parser decide what it keeps
    if not address:
        return "<>", arg[2:]  # the email parser keeps the spaces after a null path
    return address, rest
