"""smtp/command.py: command lines taken apart and the replies to their syntax errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elemta.smtp.command import (
    COMMAND_LIMIT,
    MAIL_EXTRA,
    REPLY_BAD_SYNTAX,
    REPLY_STRICT_ASCII,
    Line,
    check_mail_params,
    help_reply,
    parse_params,
    parse_path,
    split_line,
    strip_keyword,
    syntax_error,
    too_long,
)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"EHLO c.test\r\n", Line("EHLO", "c.test", 11)),
    (b"ehlo c.test\n", Line("EHLO", "c.test", 11)),  # a bare LF ends a command line too
    (b"NOOP\r\n", Line("NOOP", None, 4)),
    (b"MAIL  FROM:<a@b>\r\n", Line("MAIL", "FROM:<a@b>", 16)),  # extra spaces stripped
    (b"RSET \r\n", Line("RSET", None, 5)),  # a space and nothing: no argument
    (b"\r\n", REPLY_BAD_SYNTAX),
    (b"\xff\xfe\r\n", REPLY_BAD_SYNTAX),
    ("MAIL FROM:<\u00e9@b.test>\r\n".encode(), REPLY_STRICT_ASCII),
])
def test_split_line(raw: bytes, expected: Line | str) -> None:
    assert split_line(raw) == expected


@given(st.binary(max_size=80).filter(lambda b: b"\n" not in b))
def test_split_line_never_raises_and_keeps_the_verb(raw: bytes) -> None:
    line = split_line(raw + b"\r\n")
    if isinstance(line, Line):
        assert raw.rstrip(b"\r").split(b" ", 1)[0].upper() == line.verb.encode("ascii")
    else:
        assert line in (REPLY_BAD_SYNTAX, REPLY_STRICT_ASCII)


def test_length_limits_give_mail_the_size_parameter_after_ehlo() -> None:
    mail = Line("MAIL", "x", COMMAND_LIMIT + MAIL_EXTRA)
    assert too_long(mail, extended=False)
    assert not too_long(mail, extended=True)
    assert too_long(Line("MAIL", "x", COMMAND_LIMIT + MAIL_EXTRA + 1), extended=True)
    assert too_long(Line("RCPT", "x", COMMAND_LIMIT + 1), extended=True)
    assert not too_long(Line("RCPT", "x", COMMAND_LIMIT), extended=True)


def test_syntax_errors_name_the_parameters_only_under_esmtp() -> None:
    assert syntax_error("MAIL", False) == "501 Syntax: MAIL FROM: <address>"
    assert syntax_error("RCPT", True) == "501 Syntax: RCPT TO: <address> [SP <mail-parameters>]"


def test_help_lists_every_command_and_explains_each() -> None:
    listed = help_reply(None, False, starttls=False)
    assert listed.startswith("250 Supported commands: DATA EHLO")
    assert "STARTTLS" not in listed and "STARTTLS" in help_reply(None, False, starttls=True)
    for verb in listed.split(": ", 1)[1].split():
        assert help_reply(verb.lower(), True, False).startswith(f"250 Syntax: {verb}")
    assert help_reply("MAIL", True, False).endswith("[SP <mail-parameters>]")
    assert help_reply("FOO", False, False).startswith("501 Supported commands:")


def test_keyword_and_path() -> None:
    assert strip_keyword("FROM:", "from: <a@b.test>") == "<a@b.test>"
    assert strip_keyword("FROM:", "TO:<a@b.test>") is None
    assert parse_path("<a@b.test> SIZE=10") == ("a@b.test", "SIZE=10")
    assert parse_path("<>") == ("<>", "")
    assert parse_path("") == ("", "")
    # Not the simple shape: the email package's parser decides.
    assert parse_path('<"a b"@c.test>') == ('"a b"@c.test', "")
    assert parse_path("<a@b.test") == ("a@b.test", "")
    assert parse_path("<@>")[0] is None


def test_params() -> None:
    assert parse_params(["SIZE=10", "BODY=8BITMIME", "SMTPUTF8"]) == {
        "SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": True}
    assert parse_params(["SIZE="]) is None
    assert parse_params(["A-B=1"]) is None
    syntax = syntax_error("MAIL", True)
    assert check_mail_params({"SIZE": "10", "BODY": "7BIT"}, 100, syntax) is None
    assert check_mail_params({"SIZE": "101"}, 100, syntax).startswith("552 ")  # type: ignore[union-attr]
    assert check_mail_params({"SIZE": "x"}, 100, syntax) == syntax
    assert check_mail_params({"BODY": "BINARYMIME"}, 100, syntax).startswith("501 ")  # type: ignore[union-attr]
    assert check_mail_params({"SMTPUTF8": True}, 100, syntax) == "501 Error: SMTPUTF8 disabled"
    assert check_mail_params({"FOO": "1"}, 100, syntax).startswith("555 ")  # type: ignore[union-attr]


@given(st.text(max_size=300))
def test_header_text_is_printable_ascii_of_the_same_length(value: str) -> None:
    from elemta.smtp.server import _header_text

    expected = "".join(c if " " <= c <= "~" else "?" for c in value)[:200]
    assert _header_text(value) == expected
