"""The replies elemta itself words, and how the SMTP layer words the governor's refusals."""

from __future__ import annotations

from ..memory.refusal import Refusal

REPLY_STORAGE = "452 4.3.1 Insufficient system storage"
REPLY_TOO_BIG = "552 5.3.4 Message exceeds fixed maximum message size"
REPLY_LINE_TOO_LONG = "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"


def refusal_reply(reason: Refusal, in_data: bool = False) -> str:
    """The memory guide's codes: 452 4.3.1 for memory and the task cap (at connection, MAIL,
    RCPT); 552 5.3.4 when a session holds more than its budget during DATA."""
    if in_data and reason is Refusal.SESSION_MEMORY:
        return REPLY_TOO_BIG
    return REPLY_STORAGE
