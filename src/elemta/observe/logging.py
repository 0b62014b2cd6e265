"""Logging setup: one logger tree `elemta.*`, written to the journal, as JSON lines or as text.

Which output (`[logging] format`):
- "journal", or "auto" when stderr is the journal (JOURNAL_STREAM names stderr's device and
  inode, as systemd sets it): systemd.journal.JournalHandler with SYSLOG_IDENTIFIER=elemta.
  Events from events.py carry ELEMTA_EVENT, their MESSAGE_ID, their PRIORITY and their fields
  upper-cased (CURRENT_USAGE=...), so `journalctl ELEMTA_EVENT=memory_critical` finds them.
- "json", or "auto" when stderr is not a TTY: one JSON object per line on stderr, the guide's
  shape: {"level": "WARN", "msg": ..., "current_usage": ..., ...}.
- "text", or "auto" on a TTY: readable lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from systemd import journal

from ..config import LoggingConfig
from ..events import Event
from ..persecond import PerSecond

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# The guide's JSON spells WARN; journald's PRIORITY numbers for records that are no event.
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
                logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}
_JOURNAL_FIELD = re.compile(r"[A-Z][A-Z0-9_]*")
# LogRecord attributes that are not the caller's extra= fields.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "elemta_event", "elemta_fields"}


def journal_is_stderr(environ: Mapping[str, str], stderr: IO[str]) -> bool:
    """True when systemd connected stderr to the journal (JOURNAL_STREAM=<dev>:<ino>)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def choose_format(configured: str, environ: Mapping[str, str], stderr: IO[str]) -> str:
    if configured != "auto":
        return configured
    if journal_is_stderr(environ, stderr):
        return "journal"
    return "text" if stderr.isatty() else "json"


def record_fields(record: logging.LogRecord) -> tuple[Event | None, dict[str, Any]]:
    """The event (if any) and its fields, lower-case; plus UPPERCASE extra= keys, lower-cased."""
    event: Event | None = getattr(record, "elemta_event", None)
    fields: dict[str, Any] = dict(getattr(record, "elemta_fields", {}) or {})
    if event is not None:  # emit() passes no other extra=: nothing more to look for
        return event, fields
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and _JOURNAL_FIELD.fullmatch(key):
            fields.setdefault(key.lower(), value)
    return event, fields


def _journal_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


class ElemtaJournalHandler(journal.JournalHandler):  # type: ignore[misc]
    """JournalHandler that sends only journal-valid fields, with each event's own priority.

    The stock emit() forwards every LogRecord attribute (msg, args, ... which journald drops)
    and maps levels to priorities coarsely (no NOTICE); events know their exact priority.
    """

    def __init__(self, sender_function: Callable[..., Any] = journal.send) -> None:
        super().__init__(sender_function=sender_function, SYSLOG_IDENTIFIER="elemta")

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        event, extra = record_fields(record)
        out: dict[str, Any] = dict(self._extra)
        out["PRIORITY"] = str(event.priority if event else self.map_priority(record.levelno))
        out["LOGGER"] = record.name
        out["THREAD_NAME"] = record.threadName
        out["CODE_FILE"] = record.pathname
        out["CODE_LINE"] = record.lineno
        out["CODE_FUNC"] = record.funcName
        if event is not None:
            out["MESSAGE_ID"] = event.message_id
            out["ELEMTA_EVENT"] = event.name
        for key, value in extra.items():
            out[key.upper()] = _journal_value(value)
        if record.exc_text:
            out["EXCEPTION_TEXT"] = record.exc_text
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = self.fields(record)
            self.send(message, **fields)
        except Exception:
            self.handleError(record)


class JsonFormatter(logging.Formatter):
    """The guide's JSON lines. A line per message accepted or delivered makes this a hot
    path: the seconds are formatted once per second, the encoder made once."""

    _encoder = json.JSONEncoder(default=str)

    def __init__(self) -> None:
        super().__init__()
        self._utc = PerSecond(lambda second: time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.gmtime(second)))

    def format(self, record: logging.LogRecord) -> str:
        event, fields = record_fields(record)
        out: dict[str, Any] = {
            "time": f"{self._utc.text(record.created)}.{int(record.msecs):03d}Z",
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if event is not None:
            out["event"] = event.name
            out["message_id"] = event.message_id
        for key, value in fields.items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(out)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        event, fields = record_fields(record)
        if event is not None:
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            text = f"{text} [{event.name}{' ' + pairs if pairs else ''}]"
        return text


def make_handler(fmt: str, stderr: IO[str]) -> logging.Handler:
    if fmt == "journal":
        return ElemtaJournalHandler()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def setup(cfg: LoggingConfig, stderr: IO[str] | None = None,
          environ: Mapping[str, str] | None = None) -> str:
    """Route the `elemta` logger tree to the chosen output; returns the format chosen."""
    stream = sys.stderr if stderr is None else stderr
    fmt = choose_format(cfg.format, os.environ if environ is None else environ, stream)
    root = logging.getLogger("elemta")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt, stream))
    root.setLevel(_LEVELS[cfg.level])
    root.propagate = False
    return fmt
