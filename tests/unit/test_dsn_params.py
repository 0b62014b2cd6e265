"""RFC 3461 MAIL/RCPT parameters taken out of the command before aiosmtpd sees it."""

from __future__ import annotations

import pytest

from elemta.delivery.dsnparams import (
    MailDsn,
    RcptDsn,
    split_mail,
    split_rcpt,
    wants_failure_notice,
    xtext_decode,
)


def test_mail_parameters_keep_case_and_leave_the_rest() -> None:
    assert split_mail("FROM:<a@b> ret=full SIZE=10 ENVID=Ab+2Bc BODY=8BITMIME") == \
        ("FROM:<a@b> SIZE=10 BODY=8BITMIME", MailDsn("FULL", "Ab+2Bc"))
    assert split_mail('FROM:<"a b"@c>') == ('FROM:<"a b"@c>', MailDsn())
    assert split_mail("FROM:<>") == ("FROM:<>", MailDsn())


@pytest.mark.parametrize("arg", ["FROM:<a@b> RET=BODY", "FROM:<a@b> RET=FULL RET=HDRS",
                                 "FROM:<a@b> ENVID=", "FROM:<a@b> ENVID=a=b",
                                 "FROM:<a@b> ENVID=" + "x" * 101, "FROM:<a@b> ENVID=a+zz"])
def test_bad_mail_parameters_are_501(arg: str) -> None:
    assert str(split_mail(arg)).startswith("501 5.5.4 ")


def test_rcpt_parameters() -> None:
    assert split_rcpt("TO:<a@b> notify=success,failure ORCPT=rfc822;A+40b") == \
        ("TO:<a@b>", RcptDsn("SUCCESS,FAILURE", "rfc822;A+40b"))
    assert split_rcpt("TO:<a@b> NOTIFY=NEVER") == ("TO:<a@b>", RcptDsn("NEVER", ""))
    assert xtext_decode("A+40b+2B") == "A@b+"


@pytest.mark.parametrize("arg", ["TO:<a@b> NOTIFY=NEVER,FAILURE", "TO:<a@b> NOTIFY=SOMETIMES",
                                 "TO:<a@b> NOTIFY=FAILURE,FAILURE", "TO:<a@b> ORCPT=rfc822",
                                 "TO:<a@b> ORCPT=;a@b", "TO:<a@b> ORCPT=rfc822;a=b",
                                 "TO:<a@b> NOTIFY=DELAY NOTIFY=DELAY"])
def test_bad_rcpt_parameters_are_501(arg: str) -> None:
    assert str(split_rcpt(arg)).startswith("501 5.5.4 ")


def test_which_notify_wants_a_failure_notice() -> None:
    assert wants_failure_notice("") and wants_failure_notice("FAILURE,DELAY")
    assert not wants_failure_notice("NEVER") and not wants_failure_notice("SUCCESS,DELAY")
