"""Bounces: a message that ends with failed recipients gets one RFC 3464 DSN to its sender,
sent from <> through the same routing (the local Maildir for a local sender, the relay for a
relay domain's sender); a failed message from <> is never bounced. The DSN is read back with
Python's email package."""

from __future__ import annotations

import email
import email.message
import email.policy
from pathlib import Path

from test_smtp_relay import hub, records, relay_extra  # noqa: F401 - hub is a fixture

from daemon import Daemon, free_port, running, wait_until
from postfixhub import DOMAIN, Postfix


def dsn_of(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def report(msg: email.message.EmailMessage, returned: str = "text/rfc822-headers"
           ) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(per-message fields, per-recipient fields) of the message/delivery-status part."""
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text, status, original = msg.iter_parts()  # type: ignore[misc]
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == returned
    # The email package parses message/delivery-status into one header block per group.
    groups = [dict(g.items()) for g in status.get_payload()]
    return groups[0], groups[1:]


def local_mail(d: Daemon, address: str, timeout: float = 30) -> bytes:
    wait_until(lambda: d.delivered(address), f"a message in {address}'s Maildir", timeout)
    [f] = d.delivered(address)
    return f.read_bytes()


def test_dsn_for_the_failed_recipients_to_a_local_sender(hub: Postfix, tmp_path: Path) -> None:  # noqa: F811
    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d:
        d.send([f"alice@{DOMAIN}", f"reject@{DOMAIN}", f"nobody@{DOMAIN}"],
               b"Subject: will partly bounce\r\nMessage-ID: <orig-1@test>\r\n\r\nbody line\r\n",
               sender="Sender@example.test")
        raw = local_mail(d, "sender@example.test")
        assert raw.startswith(b"Return-Path: <>\n")  # sent with the null sender
        msg = dsn_of(raw)
        assert msg["To"].addresses[0].addr_spec == "Sender@example.test"
        assert msg["Auto-Submitted"] == "auto-replied"
        per_message, per_rcpt = report(msg)
        assert per_message["Reporting-MTA"] == "dns; mx.test"
        got = {r["Final-Recipient"]: r for r in per_rcpt}
        assert sorted(got) == [f"rfc822; nobody@{DOMAIN}", f"rfc822; reject@{DOMAIN}"]
        rej = got[f"rfc822; reject@{DOMAIN}"]
        assert rej["Action"] == "failed" and rej["Status"] == "5.7.1"
        assert rej["Remote-MTA"] == "dns; hub.test"
        assert rej["Diagnostic-Code"].startswith(
            "smtp; 550 5.7.1 <reject@relay.test>: Recipient address rejected: Not wanted here")
        nob = got[f"rfc822; nobody@{DOMAIN}"]
        assert nob["Status"] == "5.1.1" and "User unknown in virtual mailbox table" in \
            nob["Diagnostic-Code"]
        # RET=HDRS: the original header section, our Received: included, no body.
        original = list(msg.iter_parts())[2].get_payload()
        assert "Message-ID: <orig-1@test>" in original and "Subject: will partly bounce" in original
        assert "by mx.test (elemta" in original and "body line" not in original
        # The delivered recipient is not in the report; the message itself is kept in failed/.
        wait_until(lambda: any(r["sender"] == "Sender@example.test" and
                               (tmp_path / "queue" / "failed" / str(r["id"])).exists()
                               for r in records(tmp_path / "queue")), "the original in failed/")
        assert "sender non-delivery notification" in d.log


def test_dsn_to_a_relay_domain_sender_goes_through_the_relay(hub: Postfix, tmp_path: Path) -> None:  # noqa: F811
    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d:
        d.send([f"reject@{DOMAIN}"], b"Subject: bounce me\r\nMessage-ID: <orig-2@test>\r\n\r\nx\r\n",
               sender=f"carol@{DOMAIN}")
        raw = hub.wait_for("carol", b"orig-2@test")
        assert raw.startswith(b"Return-Path: <MAILER-DAEMON>") or raw.startswith(b"Return-Path: <>")
        _, [rcpt] = report(dsn_of(raw))
        assert rcpt["Final-Recipient"] == f"rfc822; reject@{DOMAIN}"
        assert rcpt["Status"] == "5.7.1"


def test_expired_recipients_are_bounced_with_5_4_7(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: every attempt is deferred
    extra = relay_extra(tmp_path, port).replace(
        'minimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"\n',
        'minimal_backoff_time = "1s"\nmaximal_backoff_time = "1s"\nmaximal_queue_lifetime = "2s"\n')
    with running(tmp_path, extra) as d:
        d.send([f"bob@{DOMAIN}"], b"Subject: too late\r\n\r\nx\r\n", sender="s@example.test")
        raw = local_mail(d, "s@example.test", timeout=60)
        _, [rcpt] = report(dsn_of(raw))
        assert rcpt["Status"] == "5.4.7"
        assert "Remote-MTA" not in rcpt  # no server ever answered
        assert rcpt["Diagnostic-Code"] == (
            f"X-Elemta; delivery time expired, last reply: 451 4.4.1 connect to "
            f"127.0.0.1:{port}: Connection refused")


def test_a_failed_message_from_the_null_sender_is_never_bounced(hub: Postfix, tmp_path: Path) -> None:  # noqa: F811
    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d:
        d.send([f"reject@{DOMAIN}"], b"Subject: a bounce itself\r\n\r\nx\r\n", sender="<>")
        wait_until(lambda: "not bounced (a bounce is never bounced); kept in failed/" in d.log,
                   "the null-sender failure logged")
        recs = records(tmp_path / "queue")
        assert [(r["sender"], [x["state"] for x in r["recipients"]])  # type: ignore[union-attr]
                for r in recs] == [("", ["failed"])]
        assert list((tmp_path / "mail").rglob("new/*")) == []


# -- the DSN extension (RFC 3461) ---------------------------------------------------------------


def test_dsn_parameters_are_honoured_in_the_bounce(hub: Postfix, tmp_path: Path) -> None:  # noqa: F811
    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d, d.smtp() as s:
        assert "DSN" in s.ehlo("client.test")[1].decode().split("\n")  # advertised
        assert s.docmd("MAIL FROM:<dsn@example.test> RET=BODY") == \
            (501, b"5.5.4 RET must be FULL or HDRS, once")
        assert s.docmd("MAIL FROM:<dsn@example.test> RET=FULL ENVID=Env+2BId.1")[0] == 250
        assert s.docmd("RCPT TO:<x@relay.test> NOTIFY=NEVER,FAILURE") == \
            (501, b"5.5.4 NOTIFY must be NEVER or SUCCESS, FAILURE, DELAY, once")
        assert s.docmd(f"RCPT TO:<reject@{DOMAIN}> NOTIFY=FAILURE "
                       f"ORCPT=rfc822;Orig+2Breject@relay.test")[0] == 250
        assert s.docmd(f"RCPT TO:<nobody@{DOMAIN}> NOTIFY=NEVER")[0] == 250
        assert s.docmd(f"RCPT TO:<alice@{DOMAIN}> NOTIFY=SUCCESS,DELAY")[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(b"Subject: full return\r\nMessage-ID: <full-1@test>\r\n\r\nthe body\r\n.\r\n")
        assert s.getreply()[0] == 250
        raw = local_mail(d, "dsn@example.test")
        msg = dsn_of(raw)
        per_message, per_rcpt = report(msg, returned="message/rfc822")
        assert per_message["Original-Envelope-Id"] == "Env+Id.1"
        # NOTIFY=NEVER: nobody@ is not reported; reject@ is, with its ORCPT.
        [rcpt] = per_rcpt
        assert rcpt["Final-Recipient"] == f"rfc822; reject@{DOMAIN}"
        assert rcpt["Original-Recipient"] == f"rfc822; Orig+reject@{DOMAIN}"
        # RET=FULL: the whole message, body included.
        original = list(msg.iter_parts())[2].get_payload()[0]
        assert original["Message-ID"] == "<full-1@test>"
        assert original.get_payload().strip() == "the body"
        assert b"the body" in hub.wait_for("alice", b"full-1@test")


def test_dsn_parameters_are_passed_on_to_a_hop_that_offers_dsn(tmp_path: Path) -> None:
    import threading

    from test_smtp_relay import Recorder

    rec = Recorder(dsn=True)
    threading.Thread(target=rec.serve_forever, daemon=True).start()
    try:
        with running(tmp_path, relay_extra(tmp_path, rec.port)) as d, d.smtp() as s:
            s.ehlo("client.test")
            assert s.docmd("MAIL FROM:<s@example.org> RET=HDRS ENVID=QQ+2B1")[0] == 250
            assert s.docmd(f"RCPT TO:<a@{DOMAIN}> NOTIFY=SUCCESS,FAILURE "
                           f"ORCPT=rfc822;A@{DOMAIN}")[0] == 250
            assert s.docmd(f"RCPT TO:<b@{DOMAIN}>")[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(b"Subject: on\r\n\r\nx\r\n.\r\n")
            assert s.getreply()[0] == 250
            wait_until(lambda: d.log.count("status=sent") == 2, "relayed")
        assert [x for x in rec.lines if x.startswith((b"MAIL", b"RCPT"))] == [
            b"MAIL FROM:<s@example.org> SIZE=" + str(rec.sizes[0]).encode() +
            b" RET=HDRS ENVID=QQ+2B1",
            f"RCPT TO:<a@{DOMAIN}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A@{DOMAIN}".encode(),
            f"RCPT TO:<b@{DOMAIN}>".encode()]
    finally:
        rec.shutdown()
        rec.server_close()


def test_a_bounce_with_no_route_waits_in_hold_and_release_defers_it(
        hub: Postfix, tmp_path: Path) -> None:  # noqa: F811
    import subprocess
    import sys

    with running(tmp_path, relay_extra(tmp_path, hub.port)) as d:
        d.send([f"reject@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n", sender="someone@elsewhere.org")

        def held() -> list[dict[str, object]]:
            return [r for r in records(tmp_path / "queue")
                    if (tmp_path / "queue" / "hold" / str(r["id"])).exists()]
        wait_until(held, "the bounce held")
        [bounce] = held()
        [rcpt] = bounce["recipients"]  # type: ignore[misc]
        assert bounce["sender"] == "" and rcpt["address"] == "someone@elsewhere.org"
        assert rcpt["reply"].startswith("451 4.3.0 no route for a bounce")
        assert "(held: no route to <someone@elsewhere.org>)" in d.log
        out = subprocess.run([sys.executable, "-m", "elemta.cli", "queue", "release",
                              str(bounce["id"]), "--config", str(d.config_path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out
        wait_until(lambda: "status=deferred (451 4.3.0 no route for this recipient's domain" in
                   d.log, "the released bounce deferred, not stuck")
