"""exitnote: systemd's verdict on the previous run, in words for STATUS= and the journal."""

from __future__ import annotations

from pathlib import Path

from elemta import exitnote
from elemta.exitnote import ExitNote

AT = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def test_a_clean_stop_says_nothing() -> None:
    assert exitnote.describe(ExitNote("success", "exited", "0", AT)) is None


def test_each_systemd_result_in_words() -> None:
    cases = {
        ("watchdog", "dumped", "ABRT"):
            "watchdog timeout (the event loop stopped answering; killed by SIGABRT)",
        ("oom-kill", "killed", "KILL"): "killed by the kernel's OOM killer",
        ("signal", "killed", "TERM"): "killed by SIGTERM",
        ("core-dump", "dumped", "SEGV"): "crashed (SIGSEGV, core dumped)",
        ("exit-code", "exited", "1"): "exited with status 1",
        ("start-limit-hit", "", ""): "ended: start-limit-hit",
    }
    for (result, code, status), words in cases.items():
        assert exitnote.describe(ExitNote(result, code, status, AT)) == \
            f"{words} at 2023-11-14 22:13:20 UTC", result


def test_the_file_round_trips_and_garbage_is_no_news(tmp_path: Path) -> None:
    note = exitnote.from_environ({"SERVICE_RESULT": "watchdog", "EXIT_CODE": "killed",
                                  "EXIT_STATUS": "ABRT"}, AT)
    assert note == ExitNote("watchdog", "killed", "ABRT", AT)
    exitnote.record(tmp_path, note)
    assert [p.name for p in tmp_path.iterdir()] == ["last-exit"]
    assert exitnote.take(tmp_path) == note
    assert exitnote.take(tmp_path) is None  # taken: told once
    (tmp_path / "last-exit").write_text("not a note\n")
    assert exitnote.take(tmp_path) is None
    assert exitnote.from_environ({}, AT) is None
    assert exitnote.state_dir({"STATE_DIRECTORY": "/var/lib/elemta:/var/lib/other"}) == \
        Path("/var/lib/elemta")
