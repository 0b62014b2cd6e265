"""Test-only: SIGUSR2 blocks the event loop when ELEMTA_TEST_BLOCK_LOOP_SECONDS is set.

This is the honest trigger for "a hung event loop gets the service restarted" (the systemd
watchdog): the loop really blocks in time.sleep(), exactly as a stuck synchronous call would.
Without the variable, SIGUSR2 keeps its default action and nothing is installed.

Same variable, meaning and log line as observe/heartbeat.py's install_test_block (the
observability branch), so the two are interchangeable: keep one when both are merged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

ENV = "ELEMTA_TEST_BLOCK_LOOP_SECONDS"
log = logging.getLogger("elemta.heartbeat")


def install(loop: asyncio.AbstractEventLoop) -> bool:
    value = os.environ.get(ENV)
    if not value:
        return False
    try:
        seconds = float(value)
    except ValueError:
        log.warning("%s=%r is not a number of seconds: ignored", ENV, value)
        return False

    def block() -> None:
        log.warning("test hook: blocking the event loop for %.1fs", seconds)
        time.sleep(seconds)

    loop.add_signal_handler(signal.SIGUSR2, block)
    log.warning("test hook armed: SIGUSR2 blocks the event loop for %.1fs (%s)", seconds, ENV)
    return True
