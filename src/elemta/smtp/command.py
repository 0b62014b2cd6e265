"""SMTP command lines taken apart, and the replies to syntax errors. Pure functions.

The wording and the checks are those of aiosmtpd (the SMTP library elemta was first built on),
so a client sees the same replies it always did; the session (server.py) adds enhanced status
codes once EHLO has been said.
"""

from __future__ import annotations

from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from .address import simple_path

# RFC 5321 4.5.3.1.4: 512 octets a command line; MAIL gets the SIZE parameter's 26 more once
# EHLO has offered it (RFC 1870). A line over dataparse.LINE_LIMIT is not even buffered.
COMMAND_LIMIT = 512
MAIL_EXTRA = 26
# Unrecognised commands a session may send before it is told 421 and closed.
BOGUS_LIMIT = 5
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})

REPLY_BAD_SYNTAX = "500 Error: bad syntax"
REPLY_STRICT_ASCII = "500 Error: strict ASCII mode"
REPLY_LINE_TOO_LONG = "500 Command line too long"
REPLY_SEND_HELO = "503 Error: send HELO first"
REPLY_NEED_MAIL = "503 Error: need MAIL command"
REPLY_NEED_RCPT = "503 5.5.1 Error: need RCPT command"
REPLY_NESTED_MAIL = "503 Error: nested MAIL command"
REPLY_MALFORMED = "553 5.1.3 Error: malformed address"
REPLY_TOO_MANY_BOGUS = "421 4.7.0 Too many unrecognized commands, closing connection"
REPLY_STARTTLS_FIRST = "530 Must issue a STARTTLS command first"

# HELP's texts: every command the session knows, with its syntax.
SYNTAX = {
    "DATA": "DATA",
    "EHLO": "EHLO hostname",
    "EXPN": "EXPN <address>",
    "HELO": "HELO hostname",
    "HELP": "HELP [command]",
    "MAIL": "MAIL FROM: <address>",
    "NOOP": "NOOP [string]",
    "QUIT": "QUIT",
    "RCPT": "RCPT TO: <address>",
    "RSET": "RSET",
    "STARTTLS": "STARTTLS",
    "VRFY": "VRFY <address>",
}
_EXTENDED = " [SP <mail-parameters>]"


@dataclass(frozen=True, slots=True)
class Line:
    """One command line: its verb in upper case and its argument (None: nothing after the verb)."""

    verb: str
    arg: str | None
    length: int  # octets without the line ending, what the length limits count


def split_line(raw: bytes) -> Line | str:
    """The command in `raw` (its line ending included), or the reply refusing it."""
    line = raw.rstrip(b"\r\n")
    if not line:
        return REPLY_BAD_SYNTAX
    verb_bytes, _, arg_bytes = line.partition(b" ")
    try:
        verb = verb_bytes.upper().decode("ascii")
    except UnicodeDecodeError:
        return REPLY_BAD_SYNTAX
    arg = None
    if arg_bytes:
        try:
            arg = arg_bytes.strip().decode("ascii")
        except UnicodeDecodeError:
            # SMTPUTF8 is not offered: an 8-bit argument is refused, never guessed at.
            return REPLY_STRICT_ASCII
    return Line(verb, arg, len(line))


def too_long(line: Line, extended: bool) -> bool:
    limit = COMMAND_LIMIT + (MAIL_EXTRA if extended and line.verb == "MAIL" else 0)
    return line.length > limit


def syntax_error(verb: str, extended: bool) -> str:
    return f"501 Syntax: {SYNTAX[verb]}{_EXTENDED if extended else ''}"


def help_reply(arg: str | None, extended: bool, starttls: bool) -> str:
    known = sorted(v for v in SYNTAX if starttls or v != "STARTTLS")
    if arg:
        verb = arg.upper()
        if verb in known:
            more = _EXTENDED if extended and verb in ("MAIL", "RCPT") else ""
            return f"250 Syntax: {SYNTAX[verb]}{more}"
        return f"501 Supported commands: {' '.join(known)}"
    return f"250 Supported commands: {' '.join(known)}"


def strip_keyword(keyword: str, arg: str) -> str | None:
    """`arg` after `keyword` ("FROM:", "TO:"; any case), or None if it does not start so."""
    if arg[:len(keyword)].upper() == keyword:
        return arg[len(keyword):].strip()
    return None


def parse_path(arg: str) -> tuple[str | None, str]:
    """(address, the rest) of a MAIL/RCPT argument after its keyword; address None when it
    cannot be parsed, "" when there is none. The common `<local@domain> PARAMS` takes the fast
    path; anything else goes through the email package's RFC 5322 parser."""
    if not arg:
        return "", ""
    fast = simple_path(arg)
    if fast is not None:
        return fast
    return parse_path_fully(arg)


def parse_path_fully(arg: str) -> tuple[str | None, str]:
    """`parse_path` by the email package's parser alone (what aiosmtpd did for every path)."""
    parsed: Any
    try:
        if arg.lstrip().startswith("<"):
            parsed, rest = get_angle_addr(arg)
        else:
            parsed, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, ""
    return str(parsed.addr_spec), str(rest)


def parse_params(options: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters as a dict (a keyword alone: True); None if one is malformed (RFC 1869)."""
    result: dict[str, str | bool] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not key.isalnum() or (eq and not value):
            return None
        result[key] = value if eq else True
    return result


def parse_mail_rcpt(keyword: str, arg: str | None, extended: bool
                    ) -> tuple[str, list[str], dict[str, str | bool]] | str:
    """(address, its parameters as given but upper-cased, the same as a dict) of a MAIL or RCPT
    argument (`keyword` "FROM:" or "TO:"), or the reply refusing it."""
    syntaxerr = syntax_error("MAIL" if keyword == "FROM:" else "RCPT", extended)
    path = strip_keyword(keyword, arg) if arg is not None else None
    if path is None:
        return syntaxerr
    address, rest = parse_path(path)
    if address is None:
        return REPLY_MALFORMED
    if not address or (rest and not extended):
        return syntaxerr
    options = rest.upper().split()
    params = parse_params(options)
    if params is None:
        return syntaxerr
    return address, options, params


def check_mail_params(params: dict[str, str | bool], size_limit: int, verb_syntax: str
                      ) -> str | None:
    """The reply refusing MAIL's parameters, or None when they are all acceptable."""
    body = params.pop("BODY", "7BIT")
    if body not in ("7BIT", "8BITMIME"):
        return "501 Error: BODY can only be one of 7BIT, 8BITMIME"
    smtputf8 = params.pop("SMTPUTF8", False)
    if not isinstance(smtputf8, bool):
        return "501 Error: SMTPUTF8 takes no arguments"
    if smtputf8:
        return "501 Error: SMTPUTF8 disabled"
    size = params.pop("SIZE", None)
    if size:
        if isinstance(size, bool) or not size.isdigit():
            return verb_syntax
        if size_limit and int(size) > size_limit:
            return "552 Error: message size exceeds fixed maximum message size"
    if params:
        return "555 MAIL FROM parameters not recognized or not implemented"
    return None
