"""systemd's memory-pressure protocol ($MEMORY_PRESSURE_WATCH / _WRITE) on real files.

The PSI file itself only exists under a cgroup v2 systemd (the VM system test); here a FIFO, a
UNIX socket and a regular file stand in for the three kinds of path the protocol allows.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
from pathlib import Path

import pytest

from elemta.memory.pressure import PressureTrigger, SystemdWatch, systemd_watch

TRIGGER = b"some 200000 2000000\0"
ENCODED = base64.b64encode(TRIGGER).decode()


def test_no_variable_means_no_systemd_watch() -> None:
    assert systemd_watch({}) is None
    assert systemd_watch({"MEMORY_PRESSURE_WRITE": ENCODED}) is None


def test_dev_null_means_disabled() -> None:
    assert systemd_watch({"MEMORY_PRESSURE_WATCH": "/dev/null"}) == SystemdWatch(None, b"")


def test_write_is_base64_decoded() -> None:
    env = {"MEMORY_PRESSURE_WATCH": "/sys/fs/cgroup/x/memory.pressure",
           "MEMORY_PRESSURE_WRITE": ENCODED}
    assert systemd_watch(env) == SystemdWatch(Path("/sys/fs/cgroup/x/memory.pressure"), TRIGGER)
    assert systemd_watch({"MEMORY_PRESSURE_WATCH": "/p"}) == SystemdWatch(Path("/p"), b"")


def test_bad_base64_names_the_variable() -> None:
    with pytest.raises(ValueError, match=r"\$MEMORY_PRESSURE_WRITE is not base64"):
        systemd_watch({"MEMORY_PRESSURE_WATCH": "/p", "MEMORY_PRESSURE_WRITE": "no*base64"})


async def _wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 10)
    event.clear()


async def _fifo_wakes_on_pollin_and_is_not_written(tmp_path: Path) -> None:
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    woke = asyncio.Event()
    trigger = PressureTrigger.arm_systemd(SystemdWatch(fifo, TRIGGER), woke.set)
    assert trigger is not None and trigger.source == "systemd"
    try:
        # Nothing of ours sits in the FIFO: a write there would only wake ourselves.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with pytest.raises(BlockingIOError):
                os.read(reader, 100)
        finally:
            os.close(reader)
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"pressure\n")
            await _wait(woke)
            assert trigger.wakeups == 1
            os.write(writer, b"again\n")
            await _wait(woke)
            assert trigger.wakeups == 2
        finally:
            os.close(writer)
        # The writer hung up: no POLLHUP storm (we hold the FIFO read-write), no wake-up.
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"third\n")
        os.close(writer)
        await _wait(woke)
        assert trigger.wakeups == 3
    finally:
        trigger.close()


async def _socket_gets_the_trigger_and_wakes_on_pollin(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pressure.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    woke = asyncio.Event()
    trigger = PressureTrigger.arm_systemd(SystemdWatch(path, TRIGGER), woke.set)
    assert trigger is not None
    conn, _ = server.accept()
    try:
        conn.settimeout(10)
        got = b""
        while len(got) < len(TRIGGER):
            got += conn.recv(100)
        assert got == TRIGGER
        conn.sendall(b"x")
        await _wait(woke)
        assert trigger.wakeups == 1
        with caplog.at_level(logging.WARNING, logger="elemta.memory"):
            conn.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while "closed by its peer" not in caplog.text and loop.time() < deadline:
                await asyncio.sleep(0.01)
        assert "closed by its peer" in caplog.text
        assert trigger.wakeups == 1  # a hang-up is not pressure
    finally:
        trigger.close()
        server.close()


async def _regular_file_gets_the_trigger_written(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The trigger goes into the file as decoded bytes; an ordinary file cannot be polled
    (only kernfs/procfs PSI files can), so the watch says so and is not armed."""
    path = tmp_path / "memory.pressure"
    path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="elemta.memory"):
        trigger = PressureTrigger.arm_systemd(SystemdWatch(path, TRIGGER), lambda: None)
    assert path.read_bytes() == TRIGGER
    assert trigger is None
    assert f"cannot watch memory pressure at {path}" in caplog.text


async def _missing_path_and_dev_null(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="elemta.memory"):
        assert PressureTrigger.arm_systemd(SystemdWatch(tmp_path / "absent", TRIGGER),
                                           lambda: None) is None
        assert PressureTrigger.arm_systemd(SystemdWatch(None, b""), lambda: None) is None
    assert "No such file or directory" in caplog.text
    assert "disabled by systemd" in caplog.text


def test_fifo_wakes_on_pollin_and_is_not_written(tmp_path: Path) -> None:
    asyncio.run(_fifo_wakes_on_pollin_and_is_not_written(tmp_path))


def test_socket_gets_the_trigger_and_wakes_on_pollin(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_socket_gets_the_trigger_and_wakes_on_pollin(tmp_path, caplog))


def test_regular_file_gets_the_trigger_written(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_regular_file_gets_the_trigger_written(tmp_path, caplog))


def test_missing_path_and_dev_null(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_missing_path_and_dev_null(tmp_path, caplog))


@pytest.mark.parametrize("kind", ["missing", "not a PSI file"])
def test_own_trigger_not_armed_is_logged_at_info(tmp_path: Path, kind: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Without a trigger the monitor only wakes on its timer: the log must say so by default
    (Debian 12 under the shipped unit cannot open memory.pressure for writing)."""
    path = tmp_path / "memory.pressure"
    if kind == "not a PSI file":
        path.write_bytes(b"")  # takes the write, but epoll refuses a regular file
    with caplog.at_level(logging.INFO, logger="elemta.memory"):
        assert PressureTrigger.arm(path, lambda: None) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1, caplog.text
    assert lines[0].startswith(f"memory pressure trigger not armed on {path}: ")
    assert lines[0].endswith("the memory monitor wakes only every monitoring_interval")
