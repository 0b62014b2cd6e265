"""packaging/journal/elemta.catalog: generated from events.py, and journalctl accepts it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from elemta.events import EVENTS
from elemta.observe import catalog

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "packaging" / "journal" / "elemta.catalog"


def test_committed_catalog_matches_events_py() -> None:
    assert CATALOG.read_text() == catalog.render(), (
        "regenerate: python -m elemta.observe.catalog")


def parse(text: str) -> dict[str, dict[str, str]]:
    """The catalog grammar journalctl uses: '-- <32 hex>' starts an entry, then headers,
    a blank line, the body."""
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    in_body = False
    for line in text.splitlines():
        m = re.fullmatch(r"-- ([0-9a-f]{32})", line)
        if m:
            assert m.group(1) not in entries, f"duplicate id {m.group(1)}"
            current = entries[m.group(1)] = {"body": ""}
            in_body = False
            continue
        if current is None:
            assert line == "" or line.startswith("#"), line
            continue
        if not in_body:
            if line == "":
                in_body = True
                continue
            key, sep, value = line.partition(": ")
            assert sep and re.fullmatch(r"[A-Z][A-Za-z-]*", key), line
            current[key] = value
        else:
            current["body"] += line + "\n"
    return entries


def test_catalog_parses_with_one_entry_per_event() -> None:
    entries = parse(CATALOG.read_text())
    assert set(entries) == {e.message_id for e in EVENTS.values()}
    for event in EVENTS.values():
        entry = entries[event.message_id]
        assert entry["Subject"] == event.summary
        assert entry["Defined-By"] == "elemta"
        assert event.explanation.splitlines()[0] in entry["body"]
        for field in event.fields:
            assert f"@{field.upper()}@" in entry["body"]


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="journalctl not installed")
def test_journalctl_update_catalog_accepts_it(tmp_path: Path) -> None:
    target = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    target.mkdir(parents=True)
    shutil.copy(CATALOG, target / "elemta.catalog")
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True,
                   capture_output=True, timeout=60)
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    for event in EVENTS.values():
        assert f"{event.message_id} elemta: {event.summary}" in listed
    critical = EVENTS["memory_critical"].message_id
    dumped = subprocess.run(["journalctl", f"--root={tmp_path}", "--dump-catalog", critical],
                            check=True, capture_output=True, text=True, timeout=60).stdout
    assert "452 4.3.1" in dumped


def test_generator_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "elemta.catalog"
    r = subprocess.run([sys.executable, "-m", "elemta.observe.catalog", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == CATALOG.read_text()
