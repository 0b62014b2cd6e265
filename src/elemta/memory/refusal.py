"""Why the governor refuses: reasons, not replies. The SMTP layer words them (smtp/replies.py)."""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    BREAKER_OPEN = "breaker-open"
    BREAKER_HALF_OPEN = "breaker-half-open"  # the half-open allowance is used up
    MEMORY_CRITICAL = "memory-critical"
    TASK_CAP = "task-cap"  # SMTP sessions, asyncio tasks and threads above max_goroutines
    SESSION_MEMORY = "session-memory"  # one session holds more than per_connection_memory_limit
    # DATA: the sessions already in DATA, filling their buffers, would reach the critical threshold
    DATA_BUFFERS = "data-buffers"
