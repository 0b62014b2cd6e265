"""The MAIL/RCPT path fast path gives exactly what the email package's parser gives (the one
aiosmtpd used, which elemta's replies follow), or declines."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from elemta.smtp.address import simple_path
from elemta.smtp.command import parse_path_fully

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
def test_fast_path_equals_the_full_parser_or_declines(arg: str) -> None:
    fast = simple_path(arg)
    if fast is not None:
        assert fast == parse_path_fully(arg)


def test_fast_path_takes_the_common_forms() -> None:
    for arg in ("<user@example.com>", "<first.last+tag@mail.example.org> SIZE=1024 BODY=8BITMIME",
                "<>", "<> SIZE=5000"):
        assert simple_path(arg) == parse_path_fully(arg)
