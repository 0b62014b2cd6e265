"""Test-only: freeze the event loop on SIGUSR2 when ELEMTA_DEBUG_FREEZE=1 is in the environment.

This is the honest trigger for "a hung event loop gets the service restarted" (the systemd
watchdog) and "a hung loop is not reported healthy" (/health): the loop really blocks in
time.sleep(), exactly as a stuck synchronous call would. Without the variable, SIGUSR2 keeps its
default meaning and nothing is installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

ENV = "ELEMTA_DEBUG_FREEZE"
FREEZE_SECONDS = 3600.0


def install(loop: asyncio.AbstractEventLoop) -> bool:
    if os.environ.get(ENV) != "1":
        return False

    def freeze() -> None:
        logging.getLogger("elemta.debug").warning(
            "SIGUSR2 with %s=1: blocking the event loop for %.0fs (test only)", ENV, FREEZE_SECONDS
        )
        time.sleep(FREEZE_SECONDS)

    loop.add_signal_handler(signal.SIGUSR2, freeze)
    return True
