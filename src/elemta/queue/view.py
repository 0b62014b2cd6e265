"""`elemta queue`: the running daemon's queue through its admin endpoint, printed like mailq."""

from __future__ import annotations

from typing import Any

from ..adminclient import AdminError, request_json

TIMEOUT = 35.0


class QueueError(Exception):
    pass


def request(base: str, method: str, path: str, token: bytes | None) -> dict[str, Any]:
    try:
        return request_json(base.rstrip("/") + "/api/queue" + path, TIMEOUT, method, token)
    except AdminError as exc:
        if exc.status is not None:
            raise QueueError(f"{exc.detail} (HTTP {exc.status})") from None
        if exc.unreachable:
            raise QueueError(f"the daemon is not running ({exc})") from None
        raise QueueError(str(exc)) from None


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


def render_message(m: dict[str, Any]) -> str:
    lines = [f"{m['id']}  {m['state']:<8} {_age(m['age']):>5} {m['size']:>9}  "
             f"<{m['sender']}>  attempts {m['attempts']}"]
    for r in m["recipients"]:
        reply = f"  ({r['reply']})" if r["reply"] else ""
        lines.append(f"    {r['address']}  {r['state']} via {r['transport']}{reply}")
    return "\n".join(lines) + "\n"


def render_list(doc: dict[str, Any]) -> str:
    msgs = doc["messages"]
    if not msgs:
        return "queue is empty\n"
    out = [f"{'ID':<12}  {'STATE':<8} {'AGE':>5} {'SIZE':>9}  SENDER\n"]
    out += [render_message(m) for m in msgs]
    more = doc["total"] - len(msgs)
    out.append(f"-- {doc['total']} message(s)" + (f", {more} not listed" if more > 0 else "")
               + "\n")
    return "".join(out)
