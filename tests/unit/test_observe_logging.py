"""Log output: the exact fields handed to the journal per event, JSON and text on stderr."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from systemd import journal

from elemta.config import LoggingConfig
from elemta.events import EVENTS, emit
from elemta.observe import logging as elog


class Recorder:
    """Stands in for systemd.journal.send: the handler's one exit to the journal."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, message: str, **fields: Any) -> None:
        self.calls.append((message, fields))


@pytest.fixture
def journal_logger() -> Iterator[tuple[logging.Logger, Recorder]]:
    rec = Recorder()
    logger = logging.getLogger("elemta.test.journal")
    handler = elog.ElemtaJournalHandler(sender_function=rec)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, rec
    logger.removeHandler(handler)


def sample(field: str) -> Any:
    return {"utilization_percent": 91.25, "threshold": 0.9, "limit_source": "cgroup-v1",
            "top_coroutines": ["serve (3)", "read (2)"], "sender": "a@b.test",
            "queue_id": "ABC123", "smtp_code": "452 4.3.1", "reason": "memory critical",
            "command": "MAIL", "config_path": "/etc/elemta/elemta.toml", "result": "ok",
            }.get(field, 1234567)


def test_handler_is_a_journalhandler_named_elemta() -> None:
    handler = elog.ElemtaJournalHandler()
    assert isinstance(handler, journal.JournalHandler)
    assert handler._extra["SYSLOG_IDENTIFIER"] == "elemta"
    assert handler.send is journal.send


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_journal_fields_for_each_event(
    name: str, journal_logger: tuple[logging.Logger, Recorder]
) -> None:
    logger, rec = journal_logger
    event = EVENTS[name]
    fields = {f: sample(f) for f in event.fields}
    emit(logger, name, **fields)
    assert len(rec.calls) == 1
    message, sent = rec.calls[0]
    assert message == event.summary
    expected_fields = {f.upper(): (", ".join(v) if isinstance(v, list) else
                                   repr(v) if isinstance(v, float) else str(v))
                       for f, v in fields.items()}
    code = {k: sent[k] for k in ("CODE_FILE", "CODE_LINE", "CODE_FUNC")}
    assert code["CODE_FILE"].endswith("events.py") and code["CODE_FUNC"] == "emit"
    assert sent == {
        "SYSLOG_IDENTIFIER": "elemta",
        "PRIORITY": str(event.priority),
        "MESSAGE_ID": event.message_id,
        "ELEMTA_EVENT": name,
        "LOGGER": "elemta.test.journal",
        "THREAD_NAME": "MainThread",
        **code,
        **expected_fields,
    }
    assert all(k.isupper() for k in sent)


def test_memory_critical_is_err_with_guide_fields(
    journal_logger: tuple[logging.Logger, Recorder]
) -> None:
    logger, rec = journal_logger
    emit(logger, "memory_critical", current_usage=1932735283, max_usage=2147483648,
         utilization_percent=90.0, threshold=0.9, limit_source="config")
    _, sent = rec.calls[0]
    assert sent["PRIORITY"] == "3"
    assert sent["ELEMTA_EVENT"] == "memory_critical"
    assert (sent["CURRENT_USAGE"], sent["MAX_USAGE"], sent["UTILIZATION_PERCENT"],
            sent["THRESHOLD"], sent["LIMIT_SOURCE"]) == (
        "1932735283", "2147483648", "90.0", "0.9", "config")


def test_plain_record_forwards_only_uppercase_extras(
    journal_logger: tuple[logging.Logger, Recorder]
) -> None:
    logger, rec = journal_logger
    logger.info("queued %s", "Q1", extra={"QUEUE_ID": "Q1", "lowercase": "dropped"})
    message, sent = rec.calls[0]
    assert message == "queued Q1"
    assert sent["QUEUE_ID"] == "Q1"
    assert sent["PRIORITY"] == "6"
    assert "MESSAGE_ID" not in sent and "ELEMTA_EVENT" not in sent
    assert all(k.isupper() for k in sent), sorted(sent)


def test_undeclared_field_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="undeclared"):
        emit(logging.getLogger("elemta.test"), "memory_gc", smtp_code="452")


def test_json_formatter_has_the_guides_shape() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("elemta.test.json")
    handler = elog.make_handler("json", stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        emit(logger, "memory_critical", current_usage=1932735283, max_usage=2147483648,
             utilization_percent=90.0, threshold=0.9, limit_source="config")
        logger.warning("plain %d", 7)
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "ERROR"
    assert first["msg"] == "Memory critical threshold exceeded"
    assert (first["current_usage"], first["max_usage"], first["utilization_percent"],
            first["threshold"]) == (1932735283, 2147483648, 90.0, 0.9)
    assert first["event"] == "memory_critical"
    assert second["level"] == "WARN" and second["msg"] == "plain 7"


def test_json_time_follows_each_records_second() -> None:
    """The formatter keeps the text of the current second: a record in the next second (or
    an earlier one, from another thread) must not reuse it."""
    formatter = elog.JsonFormatter()
    stamps = []
    for created in (1_700_000_000.5, 1_700_000_000.999, 1_700_000_001.25, 1_700_000_000.0):
        record = logging.LogRecord("elemta.t", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        stamps.append(json.loads(formatter.format(record))["time"])
    assert stamps == ["2023-11-14T22:13:20.500Z", "2023-11-14T22:13:20.999Z",
                      "2023-11-14T22:13:21.250Z", "2023-11-14T22:13:20.000Z"]


def test_text_formatter_is_readable() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("elemta.test.text")
    handler = elog.make_handler("text", stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        emit(logger, "breaker_closed", current_usage=1, max_usage=2, utilization_percent=50.0,
             threshold=0.9, limit_source="host")
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert "NOTICE" not in line and "WARNING elemta.test.text: Circuit breaker closed" in line
    assert "[breaker_closed current_usage=1 max_usage=2" in line


def test_format_choice_follows_journal_stream_and_tty() -> None:
    with tempfile.TemporaryFile("w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert elog.choose_format("auto", env, f) == "journal"
        assert elog.choose_format("auto", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"},
                                  f) == "json"
        assert elog.choose_format("auto", {"JOURNAL_STREAM": "garbage"}, f) == "json"
        assert elog.choose_format("auto", {}, f) == "json"
        assert elog.choose_format("text", env, f) == "text"
        assert elog.choose_format("journal", {}, f) == "journal"
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert elog.choose_format("auto", {}, tty) == "text"
    finally:
        os.close(master)
        os.close(slave)


def test_setup_routes_the_elemta_tree() -> None:
    stream = io.StringIO()
    try:
        chosen = elog.setup(LoggingConfig(level="info", format="json"), stderr=stream, environ={})
        assert chosen == "json"
        logging.getLogger("elemta.smtp").info("hello")
        logging.getLogger("elemta.smtp").debug("not shown")
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x["msg"] for x in lines] == ["hello"]
        chosen = elog.setup(LoggingConfig(format="journal"), stderr=stream, environ={})
        assert chosen == "journal"
        assert isinstance(logging.getLogger("elemta").handlers[0], elog.ElemtaJournalHandler)
    finally:
        for name in ("elemta",):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
