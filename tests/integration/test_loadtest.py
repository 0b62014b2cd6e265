"""`elemta loadtest` against a real daemon: what it reports is what the daemon counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon import Daemon, running
from httpclient import get


def loadtest(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elemta.cli", "loadtest", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_count_run_matches_the_daemons_own_counters(daemon: Daemon) -> None:
    out = loadtest(f"127.0.0.1:{daemon.port}", "-n", "5", "-m", "2", "--count", "40",
                   "--size", "2KiB:3,64KiB:1", "--json", "--api",
                   f"http://127.0.0.1:{daemon.api_port}")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    stats = get(daemon, "/api/stats").json()
    assert report["messages"]["accepted"] == 40 == stats["smtp"]["messages_accepted"]
    # 2 per connection, unless the count ran out after a session's first message
    opened = report["sessions"]["opened"]
    assert 20 <= opened <= 24 and opened == stats["smtp"]["connections"]["accepted"]
    assert report["replies"]["354"] == 40 and report["replies"]["220"] == opened
    assert report["latency_seconds"]["count"] == 40 and report["latency_seconds"]["p50"] > 0
    assert report["daemon"]["states"] == ["normal"] and report["daemon"]["breaker"] == ["closed"]
    assert 0 < report["daemon"]["memory_peak_percent"] < 100
    assert "Traceback" not in out.stderr


def test_duration_run_stops_by_itself_with_progress_lines(daemon: Daemon) -> None:
    out = loadtest(f"127.0.0.1:{daemon.port}", "-n", "4", "--duration", "2.5s", "--api",
                   f"http://127.0.0.1:{daemon.api_port}")
    assert out.returncode == 0, out.stderr
    progress = [ln for ln in out.stderr.splitlines() if "sessions" in ln and "p99" in ln]
    assert len(progress) >= 2, out.stderr
    assert "daemon " in progress[-1] and "normal" in progress[-1]
    rows = dict(ln.strip().split(None, 1) for ln in out.stdout.splitlines()[1:])
    assert rows["duration"].startswith(("2.", "3."))
    accepted = get(daemon, "/api/stats").json()["smtp"]["messages_accepted"]
    assert rows["messages"].endswith(f"{accepted} accepted, 0 refused")


def test_refusals_are_counted_by_code(tmp_path: Path) -> None:
    with running(tmp_path, "[server]\nmax_connections = 2\n") as d:
        out = loadtest(f"127.0.0.1:{d.port}", "-n", "12", "--count", "60", "--json")
        stats = get(d, "/api/stats").json()
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    refused = report["sessions"]["refused_at_greeting"]
    assert refused > 0
    assert refused == stats["smtp"]["connections"]["rejected"]["max_connections"]
    assert report["messages"]["accepted"] == stats["smtp"]["messages_accepted"]
    assert report["messages"]["accepted"] + refused == 60


def test_remote_target_is_refused_without_allow_remote() -> None:
    out = loadtest("192.0.2.1:25", "--count", "1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "elemta: loadtest: target 192.0.2.1:25 resolves to 192.0.2.1, not a loopback address: "
        "pass --allow-remote to load a server you run"]
