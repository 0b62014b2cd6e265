"""Hundreds of sessions reaching DATA at once under a small cgroup limit: 452, never an OOM kill.

Admission at connect, MAIL and RCPT sees a daemon at rest; each session then fills its DATA
buffers within milliseconds of its 354, faster than any sample. Measured before the DATA entry
reservation (governor.data_entry_refusal): 700 one-MiB sessions in a 160 MiB cgroup got the
daemon OOM-killed within a second, without a single 452 (and 400 did, before each session's
socket reads were cut from asyncio's 256 KiB to 64 KiB).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import running
from realcgroup import join, memory_cgroup

MiB = 1024 * 1024
SESSIONS = 700


@pytest.mark.root
@pytest.mark.slow
def test_real_cgroup_sessions_entering_data_together_are_refused_not_killed(tmp_path: Path) -> None:
    with memory_cgroup(160 * MiB) as cg, \
            running(tmp_path / "d", '[logging]\nformat = "json"\n', preexec_fn=join(cg)) as d:
        d.wait_for_log(cg.source)
        out = subprocess.run(
            [sys.executable, "-m", "elemta.cli", "loadtest", f"127.0.0.1:{d.port}", "--json",
             "-n", str(SESSIONS), "--count", str(SESSIONS), "--size", "1MiB",
             "--to", "user@example.test", "--timeout", "120s"],
            capture_output=True, text=True, timeout=300)
        alive = d.proc.poll() is None
        kills = cg.oom_kills()
        report = json.loads(out.stdout) if out.stdout.strip() else {"stderr": out.stderr}
        assert alive and kills == 0, f"daemon alive {alive}, oom_kill {kills}: {report}"
        messages, replies = report["messages"], report["replies"]
        greeted_452 = report["sessions"]["refused_at_greeting"]
        # Every message got an answer: stored, or a temporary refusal the client retries (at
        # DATA, or already at the greeting once the breaker or the critical state shows).
        assert messages["accepted"] + messages["refused"] + greeted_452 == SESSIONS, report
        assert report["sessions"]["failed"] == 0, report
        assert set(replies) <= {"220", "221", "250", "354", "452"}, report
        assert replies.get("452", 0) > 0, f"no 452: the limit was never approached? {report}"
        # Every 250 is on disk, whole.
        stored = d.delivered("user@example.test")
        assert len(stored) == messages["accepted"], (len(stored), report)
        assert all(p.stat().st_size >= 0.95 * MiB for p in stored)  # LF line ends on disk
        print(f"data flood: {SESSIONS} sessions x 1 MiB in a 160 MiB cgroup v{cg.version}: "
              f"{messages['accepted']} stored, {messages['refused']} refused, {greeted_452} "
              f"refused at the greeting (452 replies {replies.get('452', 0)}), oom_kill {kills}")
