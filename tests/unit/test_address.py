"""The MAIL/RCPT path fast path gives exactly what aiosmtpd's parser gives, or declines.

Runs against the installed aiosmtpd (PyPI's in the venv, Debian's 1.4.3 during `make deb`).
"""

from __future__ import annotations

from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from elemta.smtp.address import simple_path

_PARSER = SMTP.__new__(SMTP)  # _getaddr uses no session state beyond class attributes


def aiosmtpd_path(arg: str) -> tuple[str | None, str | None]:
    return SMTP._getaddr(_PARSER, arg)


atom = st.text(alphabet="abcXYZ09.!#$%&'*+/=?^_`{|}~-\"\\ (),:;<>@[]\t\x00é", min_size=0, max_size=8)
paths = st.builds(lambda local, domain, sp, params: f"<{local}@{domain}>{sp}{params}",
                  atom, atom, st.sampled_from(["", " ", "  ", "\t", "x"]),
                  st.text(alphabet="SIZE=10BODY8BITMIME ()\"\\<>\té", max_size=12))


@settings(max_examples=3000, deadline=None)
@given(st.one_of(paths, st.text(max_size=30), st.builds(lambda p: "<>" + p, st.text(max_size=10))))
@example("<a@b.c>")
@example("<A.B@Example.COM>  SIZE=10 BODY=8BITMIME")
@example("<> SIZE=100")
@example("<>")
@example("<a@b.c> SIZE=10 ")
@example("<a..b@c>")
def test_fast_path_equals_aiosmtpd_or_declines(arg: str) -> None:
    fast = simple_path(arg)
    if fast is not None:
        assert fast == aiosmtpd_path(arg)


def test_fast_path_takes_the_common_forms() -> None:
    for arg in ("<user@example.com>", "<first.last+tag@mail.example.org> SIZE=1024 BODY=8BITMIME",
                "<>", "<> SIZE=5000"):
        assert simple_path(arg) == aiosmtpd_path(arg)
