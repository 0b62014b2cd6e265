"""Delay warnings and postmaster notices: the pure decision (queue/policy.py), which
recipients want a delay notice (RFC 3461 NOTIFY), the report dsn.py builds for them, and the
two [delivery] keys."""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
from pathlib import Path

import pytest

from elemta import config
from elemta.delivery.dsnparams import wants_delay_notice
from elemta.queue import policy
from elemta.queue.dsn import Failure, build, status_of


def test_a_delay_warning_is_due_once_the_message_is_old_enough() -> None:
    due = policy.delay_warning_due
    assert not due(created=1000.0, now=5000.0, warning_time=0.0, warned=0.0)  # 0: off
    assert not due(created=1000.0, now=1000.0 + 3599.0, warning_time=3600.0, warned=0.0)
    assert due(created=1000.0, now=1000.0 + 3600.0, warning_time=3600.0, warned=0.0)
    assert due(created=1000.0, now=1000.0 + 86400.0, warning_time=3600.0, warned=0.0)
    # Once per message: a warning already sent (time recorded in the meta record) is final.
    assert not due(created=1000.0, now=1000.0 + 86400.0, warning_time=3600.0, warned=4700.0)


def test_notify_decides_who_is_warned() -> None:
    # RFC 3461 4.1: no NOTIFY may be read as FAILURE,DELAY; elemta does (as Postfix does).
    assert wants_delay_notice("")
    assert wants_delay_notice("DELAY") and wants_delay_notice("SUCCESS,DELAY")
    assert wants_delay_notice("FAILURE,DELAY")
    assert not wants_delay_notice("FAILURE") and not wants_delay_notice("NEVER")
    assert not wants_delay_notice("SUCCESS,FAILURE")


def parse(head: bytes, tail: bytes, original: bytes = b"Subject: s\r\n"
          ) -> email.message.EmailMessage:
    msg = email.message_from_bytes(head + original + tail, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_the_delay_report_says_delayed_with_4xx_status_and_retry_until() -> None:
    created, now, lifetime = 1_700_000_000.0, 1_700_003_600.0, 432000.0
    pending = [Failure("a@x.test", "451 4.7.1 <a@x.test>: try later", "hub.test[10.0.0.1]:25",
                       delayed=True),
               Failure("b@x.test", "451 4.4.1 connect to 10.0.0.1:25: Connection refused",
                       "10.0.0.1:25", delayed=True, orcpt="rfc822;B+2B1@x.test"),
               Failure("c@x.test", "421 service not available", "hub.test[10.0.0.1]:25",
                       delayed=True)]
    head, tail = build(queue_id="Q1", sender="s@y.test", reporting_mta="mx.test",
                       arrival=created, now=now, failures=pending, message_id="m@mx.test",
                       retry_until=created + lifetime)
    msg = parse(head, tail)
    assert "delayed" in msg["Subject"].lower()
    assert msg["To"].addresses[0].addr_spec == "s@y.test"
    text, status, original = msg.iter_parts()  # type: ignore[misc]
    assert "warning only" in text.get_content().lower()
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Delayed Message Headers"
    groups = [dict(g.items()) for g in status.get_payload()]
    assert groups[0]["Reporting-MTA"] == "dns; mx.test"
    per = {g["Final-Recipient"]: g for g in groups[1:]}
    assert [g["Action"] for g in per.values()] == ["delayed"] * 3
    assert per["rfc822; a@x.test"]["Status"] == "4.7.1"
    assert per["rfc822; a@x.test"]["Remote-MTA"] == "dns; hub.test"
    assert per["rfc822; a@x.test"]["Diagnostic-Code"] == "smtp; 451 4.7.1 <a@x.test>: try later"
    assert per["rfc822; b@x.test"]["Status"] == "4.4.1" and "Remote-MTA" not in per[
        "rfc822; b@x.test"]
    assert per["rfc822; b@x.test"]["Original-Recipient"] == "rfc822; B+1@x.test"
    assert per["rfc822; c@x.test"]["Status"] == "4.0.0"  # no enhanced code in the reply
    for g in per.values():
        until = email.utils.parsedate_to_datetime(g["Will-Retry-Until"]).timestamp()
        assert until == created + lifetime
    assert status_of(pending[0]) == "4.7.1"


def test_a_failure_report_is_unchanged_by_the_delay_option() -> None:
    head, tail = build(queue_id="Q2", sender="s@y.test", reporting_mta="mx.test", arrival=0.0,
                       now=0.0, failures=[Failure("a@x.test", "550 5.1.1 no", "h[1.1.1.1]:25")],
                       message_id="m@mx.test")
    msg = parse(head, tail)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    [group] = list(msg.iter_parts())[1].get_payload()[1:]
    assert group["Action"] == "failed" and "Will-Retry-Until" not in group


def test_the_postmaster_copy_is_addressed_to_the_postmaster_and_names_the_sender() -> None:
    head, tail = build(queue_id="Q3", sender="s@y.test", reporting_mta="mx.test", arrival=0.0,
                       now=0.0, failures=[Failure("a@x.test", "550 5.1.1 no", "h[1.1.1.1]:25")],
                       message_id="m@mx.test", copy_to="postmaster@mx.test")
    msg = parse(head, tail)
    assert msg["To"].addresses[0].addr_spec == "postmaster@mx.test"
    assert msg["Subject"].startswith("Postmaster Copy: ")
    text, _, original = msg.iter_parts()  # type: ignore[misc]
    assert "<s@y.test>" in text.get_content()
    assert original.get_content_type() == "text/rfc822-headers"


def load(tmp_path: Path, toml: str) -> config.Config:
    path = tmp_path / "e.toml"
    path.write_text(toml)
    return config.load(path)


def test_the_keys_default_off_and_parse_like_the_other_durations(tmp_path: Path) -> None:
    d = config.Config().delivery
    assert d.delay_warning_time == 0.0 and d.notify_postmaster == ()
    d = load(tmp_path, '[delivery]\ndelay_warning_time = "4h"\n'
                       'notify_postmaster = ["bounce", "delay"]\n').delivery
    assert d.delay_warning_time == 4 * 3600.0 and d.notify_postmaster == ("bounce", "delay")
    assert load(tmp_path, "[delivery]\ndelay_warning_time = 90\n").delivery \
        .delay_warning_time == 90.0
    text = config.to_toml(load(tmp_path, '[delivery]\ndelay_warning_time = "1d"\n'
                                         'notify_postmaster = ["bounce"]\n'))
    assert 'delay_warning_time = "86400s"' in text and 'notify_postmaster = ["bounce"]' in text


@pytest.mark.parametrize(("toml", "problem"), [
    ('delay_warning_time = "soon"', "delay_warning_time: cannot parse duration 'soon'"),
    ("delay_warning_time = -5", "delay_warning_time: duration must not be negative"),
    ('notify_postmaster = ["bounce", "resource"]',
     "notify_postmaster: 'resource' is not a notice class (known: bounce, delay)"),
    ('notify_postmaster = "bounce"', "notify_postmaster: expected a list"),
    ('notify_postmaster = ["bounce", "bounce"]', "notify_postmaster: 'bounce' twice"),
    ('domains = []\nnotify_postmaster = ["bounce"]',
     "notify_postmaster: the notices go to postmaster@ the first of [delivery] domains, "
     "which is empty"),
])
def test_a_bad_value_is_one_line_naming_file_and_key(tmp_path: Path, toml: str,
                                                     problem: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        load(tmp_path, f"[delivery]\n{toml}\n")
    [line] = exc.value.problems
    assert line.startswith(f"{tmp_path / 'e.toml'}:") and "[delivery] " + problem in line, line


def test_the_manager_warns_once_and_retries_a_notice_it_could_not_queue(tmp_path: Path) -> None:
    """The manager with an in-test transport (always 451) and an in-test `warn` that fails
    with OSError once (a full disk): the message is deferred all the same, unmarked, and the
    notice is queued at the next attempt; then never again."""
    import asyncio
    import dataclasses
    import random
    from concurrent.futures import ThreadPoolExecutor

    from test_queue import Scripted, make_store, meta, put, settle

    from elemta.delivery.base import Reply
    from elemta.queue.manager import Manager
    from elemta.queue.store import Meta

    t = Scripted({"a@x.test": Reply(451, "4.4.1 try later")})
    now = [1000.5]
    warned: list[tuple[float, list[str]]] = []
    fail = [True]

    def warn(m: Meta) -> None:
        if fail.pop() if fail else False:
            raise OSError(28, "No space left on device")
        warned.append((now[0], [r.address for r in m.pending()]))

    store = make_store(tmp_path)
    cfg = config.Config()
    cfg = dataclasses.replace(cfg, delivery=dataclasses.replace(cfg.delivery,
                                                                delay_warning_time=3600.0))
    with ThreadPoolExecutor(2) as pool:
        mgr = Manager(cfg, store, lambda spec: t, lambda: 20, pool, rng=random.Random(0),
                      clock=lambda: now[0], warn=warn)
        assert mgr.lock.try_acquire()
        m = meta(created=1000.0)
        put(store, m)

        def attempt(at: float) -> Meta:
            now[0] = at
            asyncio.run(settle(mgr))
            state, path = store.locate(m.id) or ("", Path())
            assert state == "deferred"
            return store.read(path)

        assert attempt(1000.5).delay_warned == 0.0 and warned == []  # not old enough
        rec = attempt(4700.0)  # due, but the notice cannot be queued: deferred, unmarked
        assert rec.delay_warned == 0.0 and warned == [] and rec.attempts == 2
        rec = attempt(rec.next_attempt + policy.BUCKET)
        assert warned == [(rec.delay_warned, ["a@x.test"])]  # queued, and marked
        attempt(rec.next_attempt + policy.BUCKET)
        attempt(rec.next_attempt + 10 * 4000.0)
        assert len(warned) == 1 and len(t.calls) == 5
