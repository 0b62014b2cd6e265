"""`elemta queue`: the running daemon's queue through its admin endpoint, printed like mailq."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

TIMEOUT = 35.0


class QueueError(Exception):
    pass


def request(base: str, method: str, path: str, token: bytes | None) -> dict[str, Any]:
    url = base.rstrip("/") + "/api/queue" + path
    headers = {"Authorization": "Bearer " + token.decode("ascii")} if token else {}
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            why = json.loads(text).get("error", exc.reason)
        except ValueError:  # a plain-text answer (401, or no queue configured): its first line
            why = text.decode("utf-8", "replace").strip().split("\n", 1)[0] or exc.reason
        raise QueueError(f"{why} (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QueueError(f"the daemon is not running (cannot reach {url}: {reason})") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise QueueError(f"{url}: answer is not JSON") from None
    if not isinstance(doc, dict):
        raise QueueError(f"{url}: answer is not a JSON object")
    return doc


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
