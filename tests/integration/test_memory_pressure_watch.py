"""systemd's memory-pressure protocol against a real daemon: $MEMORY_PRESSURE_WATCH pointing at
a real FIFO (what an administrator may configure; the PSI file itself is tested in the VM)."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from daemon import running

# A long interval: any sample the test sees after the write was taken because of the wake-up.
EXTRA = """
[memory]
monitoring_interval = "60s"
"""


def test_fifo_watch_wakes_the_governor(tmp_path: Path) -> None:
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    env = {"MEMORY_PRESSURE_WATCH": str(fifo),
           "MEMORY_PRESSURE_WRITE": base64.b64encode(b"some 200000 2000000\0").decode()}
    with running(tmp_path / "d", EXTRA, env=env) as d:
        d.wait_for_log(f"memory pressure: watching {fifo} from systemd")
        assert "memory pressure trigger armed" not in d.log  # systemd's watch, not ours
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            started = time.monotonic()
            os.write(writer, b"\n")
            d.wait_for_log("Woken by systemd's memory pressure watch (1 since the last line)")
            assert time.monotonic() - started < 30  # not the 60 s tick
        finally:
            os.close(writer)


def test_dev_null_disables_every_trigger(tmp_path: Path) -> None:
    with running(tmp_path / "d", EXTRA, env={"MEMORY_PRESSURE_WATCH": "/dev/null"}) as d:
        d.wait_for_log("memory pressure watch disabled by systemd")
        assert "memory pressure trigger armed" not in d.log


def test_unusable_watch_falls_back_to_our_own_trigger(tmp_path: Path) -> None:
    with running(tmp_path / "d", EXTRA,
                 env={"MEMORY_PRESSURE_WATCH": str(tmp_path / "absent")}) as d:
        d.wait_for_log(f"cannot watch memory pressure at {tmp_path / 'absent'}")
        assert "Woken by systemd" not in d.log
