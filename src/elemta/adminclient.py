"""The command line's side of the admin endpoint: one request, a JSON object back, or one line
saying what went wrong (`elemta stats`, `elemta queue`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class AdminError(Exception):
    """`status` is the HTTP status when the daemon answered; `detail` what its answer said."""

    def __init__(self, message: str, status: int | None = None, detail: str = "",
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.unreachable = unreachable


def request_json(url: str, timeout: float, method: str = "GET",
                 token: bytes | None = None) -> dict[str, Any]:
    """`Authorization: Bearer` when a token is given ([api] token_file)."""
    headers = {"Authorization": "Bearer " + token.decode("ascii")} if token else {}
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            detail = str(json.loads(text).get("error", exc.reason))
        except (ValueError, AttributeError):  # plain text (401, no queue): its first line
            detail = text.decode("utf-8", "replace").strip().split("\n", 1)[0] or exc.reason
        raise AdminError(f"{url}: HTTP {exc.code} {exc.reason}", exc.code, detail) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach {url}: {reason}", unreachable=True) from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise AdminError(f"{url}: answer is not JSON") from None
    if not isinstance(doc, dict):
        raise AdminError(f"{url}: answer is not a JSON object")
    return doc
