"""How the service's previous run ended, kept for the next run to tell.

systemd hands ExecStopPost= commands $SERVICE_RESULT, $EXIT_CODE and $EXIT_STATUS
(systemd.exec(5)). The shipped unit runs `elemta note-exit` there, which writes them to
$STATE_DIRECTORY/last-exit; the next start takes that file, logs `previous_run_failed` when the
run did not end cleanly, and keeps a short note of it in STATUS=. So `systemctl status elemta`
tells a watchdog restart (a frozen event loop) from a crash, an OOM kill or a failed start,
after systemd's own lines about it have scrolled out of the status view.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

NOTE_FILE = "last-exit"


@dataclass(frozen=True)
class ExitNote:
    result: str  # $SERVICE_RESULT: success, watchdog, signal, core-dump, exit-code, oom-kill, ...
    code: str  # $EXIT_CODE: exited, killed, dumped
    status: str  # $EXIT_STATUS: an exit status or a signal name (ABRT)
    at: float  # when the run ended (seconds since the epoch)


def from_environ(env: Mapping[str, str], now: float) -> ExitNote | None:
    """The note systemd's variables make; None outside ExecStopPost= (no $SERVICE_RESULT)."""
    result = env.get("SERVICE_RESULT", "")
    if not result:
        return None
    return ExitNote(result, env.get("EXIT_CODE", ""), env.get("EXIT_STATUS", ""), now)


def to_text(note: ExitNote) -> str:
    return f"result={note.result} code={note.code} status={note.status} at={note.at:.0f}\n"


def parse(text: str) -> ExitNote | None:
    """The note in `to_text`'s form; None for anything else (a damaged file is no news)."""
    fields = dict(part.partition("=")[::2] for part in text.split())
    try:
        return ExitNote(fields["result"], fields.get("code", ""), fields.get("status", ""),
                        float(fields["at"]))
    except (KeyError, ValueError):
        return None


def describe(note: ExitNote) -> str | None:
    """What happened, in a few words for STATUS= and the journal; None for a clean stop."""
    if note.result == "success":
        return None
    signal = f"SIG{note.status}" if note.status and not note.status.isdigit() else note.status
    what = {
        "watchdog": f"watchdog timeout (the event loop stopped answering; killed by {signal})",
        "oom-kill": "killed by the kernel's OOM killer",
        "signal": f"killed by {signal}",
        "core-dump": f"crashed ({signal}, core dumped)",
        "exit-code": f"exited with status {note.status}",
        "timeout": "start or stop timed out",
    }.get(note.result)
    if what is None:  # a result this table does not know: systemd's own words
        detail = " ".join(part for part in (note.code, note.status) if part)
        what = f"ended: {note.result}" + (f" ({detail})" if detail else "")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(note.at))
    return f"{what} at {stamp}"


def state_dir(env: Mapping[str, str]) -> Path | None:
    """$STATE_DIRECTORY (StateDirectory=; the first one when several), else None."""
    value = env.get("STATE_DIRECTORY", "")
    return Path(value.split(":")[0]) if value else None


def record(directory: Path, note: ExitNote) -> None:
    """Write the note (atomically: a half-written note must not be read at the next start)."""
    tmp = directory / f".{NOTE_FILE}.{os.getpid()}"
    tmp.write_text(to_text(note))
    os.replace(tmp, directory / NOTE_FILE)


def take(directory: Path) -> ExitNote | None:
    """The previous run's note, removed so that only the run right after it reports it."""
    path = directory / NOTE_FILE
    try:
        text = path.read_text()
    except OSError:
        return None
    with contextlib.suppress(OSError):  # read-only: reported again next time, no worse
        path.unlink()
    return parse(text)
