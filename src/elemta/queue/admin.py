"""The queue's admin requests as the admin HTTP endpoint (its own threads) hands them over:
run on the event loop, where the manager lives, and answered as (HTTP status, JSON body).

    GET  /api/queue                 list (at most LIST_LIMIT records, and the total)
    GET  /api/queue/ID              one message
    POST /api/queue/flush           every deferred message: try now
    POST /api/queue/ID/VERB         VERB: flush, delete, hold, release
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any

from .manager import Manager

VERBS = ("flush", "delete", "hold", "release")
TIMEOUT = 30.0
LIST_LIMIT = 1000


class QueueAdmin:
    def __init__(self, manager: Manager, loop: asyncio.AbstractEventLoop) -> None:
        self.manager = manager
        self.loop = loop

    def __call__(self, method: str, sub: str) -> tuple[int, dict[str, Any]]:
        parts = [p for p in sub.split("/") if p]
        coro: Coroutine[Any, Any, Any]
        if method in ("GET", "HEAD"):
            if not parts:
                coro = self.manager.listing(LIST_LIMIT)
            elif len(parts) == 1:
                coro = self.manager.show(parts[0])
            else:
                return 404, {"error": f"not found: /api/queue/{sub}"}
        elif method == "POST":
            if parts == ["flush"]:
                coro = self.manager.act("flush", None)
            elif len(parts) == 2 and parts[1] in VERBS:
                coro = self.manager.act(parts[1], parts[0])
            else:
                return 404, {"error": f"not found: POST /api/queue/{sub} (verbs: "
                                      f"{', '.join(VERBS)})"}
        else:
            return 405, {"error": f"method {method} not allowed"}
        try:
            result = asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)
        except concurrent.futures.TimeoutError:
            return 503, {"error": "the queue manager did not answer in time"}
        except KeyError:
            return 404, {"error": f"no such message: {parts[0]}"}
        except ValueError as exc:
            return 409, {"error": str(exc)}
        if result is None:
            return 404, {"error": f"no such message: {parts[0]}"}
        if isinstance(result, str):
            return 200, {"result": result}
        return 200, result
