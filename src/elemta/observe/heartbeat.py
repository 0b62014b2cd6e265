"""Event-loop heartbeat: proof that the loop still runs, readable from any thread.

The admin HTTP server runs in its own thread so it can still answer when the loop hangs; it
must then say so. A task on the loop stamps `time.monotonic()` every BEAT seconds; /health
reports 503 once the stamp is older than STALL_AFTER.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

log = logging.getLogger("elemta.heartbeat")

BEAT = 0.5
STALL_AFTER = 5.0

# Test-only: when this variable holds a number of seconds, SIGUSR2 makes the event loop
# block (time.sleep in a loop callback) that long, so tests can prove that a hung loop is
# reported unhealthy. Never set it in production.
TEST_BLOCK_ENV = "ELEMTA_TEST_BLOCK_LOOP_SECONDS"


class Heartbeat:
    def __init__(self) -> None:
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()  # a float store: atomic for readers in other threads

    def age(self) -> float:
        return max(0.0, time.monotonic() - self._last)

    def stalled(self) -> bool:
        return self.age() > STALL_AFTER

    async def run(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(BEAT)


def install_test_block(loop: asyncio.AbstractEventLoop) -> None:
    """Arm the test-only SIGUSR2 loop block when TEST_BLOCK_ENV is set (see above)."""
    value = os.environ.get(TEST_BLOCK_ENV)
    if not value:
        return
    try:
        seconds = float(value)
    except ValueError:
        log.warning("%s=%r is not a number of seconds: ignored", TEST_BLOCK_ENV, value)
        return

    def block() -> None:
        log.warning("test hook: blocking the event loop for %.1fs", seconds)
        time.sleep(seconds)

    loop.add_signal_handler(signal.SIGUSR2, block)
    log.warning("test hook armed: SIGUSR2 blocks the event loop for %.1fs (%s)", seconds,
                TEST_BLOCK_ENV)
