"""HTTP requests to a test daemon's admin endpoint, and /metrics parsed into a dict."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon import Daemon

Sample = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(d: Daemon, path: str, method: str = "GET", headers: dict[str, str] | None = None,
        timeout: float = 10.0) -> Response:
    req = urllib.request.Request(f"http://127.0.0.1:{d.api_port}{path}", method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                            resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def metric_values(text: str) -> dict[Sample, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
