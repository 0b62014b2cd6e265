"""The DSN extension's MAIL and RCPT parameters (RFC 3461): RET, ENVID, NOTIFY, ORCPT.

Pure functions. The session takes them out of the command line first (`split_mail`,
`split_rcpt`) and parses the rest as any other parameters, which it upper-cases, while ENVID
and ORCPT are case-sensitive xtext. Values are kept as sent (xtext) to
be passed on to a next hop that offers DSN; `xtext_decode` gives the text a report shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")  # RFC 3461 4: xchar or "+" HEXCHAR
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
ENVID_LIMIT = 100  # RFC 3461 4.4
ORCPT_LIMIT = 500


@dataclass(frozen=True)
class MailDsn:
    ret: str = ""  # "FULL", "HDRS" or "" (not given: HDRS)
    envid: str = ""  # xtext


@dataclass(frozen=True)
class RcptDsn:
    notify: str = ""  # "NEVER" or a comma list of SUCCESS, FAILURE, DELAY; "": not given
    orcpt: str = ""  # "rfc822;" + xtext, as sent


def xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _split(arg: str) -> tuple[str, list[str]]:
    """(the path, the parameters) of a MAIL/RCPT argument; the path may hold spaces only
    inside <...> (a quoted local part)."""
    end = arg.find(">")
    head, tail = (arg[:end + 1], arg[end + 1:]) if end >= 0 else ("", arg)
    return head, tail.split()


def split_mail(arg: str) -> tuple[str, MailDsn] | str:
    """(the argument without RET/ENVID, their values), or the 501/555 reply refusing them."""
    head, params = _split(arg)
    rest, ret, envid = [], "", ""
    for p in params:
        key, eq, value = p.partition("=")
        k = key.upper()
        if k == "RET":
            if ret or value.upper() not in ("FULL", "HDRS"):
                return "501 5.5.4 RET must be FULL or HDRS, once"
            ret = value.upper()
        elif k == "ENVID":
            if envid or not eq or not value or len(value) > ENVID_LIMIT \
                    or not _XTEXT.fullmatch(value):
                return "501 5.5.4 ENVID must be xtext of at most 100 characters, once"
            envid = value
        else:
            rest.append(p)
    return " ".join([head, *rest]).strip(), MailDsn(ret, envid)


def split_rcpt(arg: str) -> tuple[str, RcptDsn] | str:
    """(the argument without NOTIFY/ORCPT, their values), or the 501 reply refusing them."""
    head, params = _split(arg)
    rest, notify, orcpt = [], "", ""
    for p in params:
        key, _, value = p.partition("=")
        k = key.upper()
        if k == "NOTIFY":
            words = value.upper().split(",")
            ok = words == ["NEVER"] or (set(words) <= _NOTIFY and len(set(words)) == len(words))
            if notify or not value or not ok:
                return "501 5.5.4 NOTIFY must be NEVER or SUCCESS, FAILURE, DELAY, once"
            notify = ",".join(words)
        elif k == "ORCPT":
            kind, semi, addr = value.partition(";")
            if orcpt or not semi or not kind or not addr or len(value) > ORCPT_LIMIT \
                    or not _XTEXT.fullmatch(addr) or not kind.replace("-", "").isalnum():
                return "501 5.5.4 ORCPT must be addr-type;xtext, once"
            orcpt = value
        else:
            rest.append(p)
    return " ".join([head, *rest]).strip(), RcptDsn(notify, orcpt)


def wants_failure_notice(notify: str) -> bool:
    """RFC 3461 4.1: without NOTIFY, failures are reported; NOTIFY=NEVER or a list without
    FAILURE asks for none."""
    return not notify or "FAILURE" in notify.split(",")


def wants_delay_notice(notify: str) -> bool:
    """RFC 3461 4.1 lets an MTA read an absent NOTIFY as FAILURE or as FAILURE,DELAY; with
    delay notices turned on (delay_warning_time) elemta reads it as FAILURE,DELAY, as Postfix
    does. A NOTIFY list without DELAY (or NEVER) asks for none."""
    return not notify or "DELAY" in notify.split(",")
