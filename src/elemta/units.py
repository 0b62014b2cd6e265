"""Sizes ("512MiB", "2GB", 1048576) and durations ("5s", "250ms", "1m") as config values."""

from __future__ import annotations

import math
import re
from decimal import Decimal

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*\Z")


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "512MiB"; ValueError names what is wrong."""
    if isinstance(value, bool):
        raise ValueError("expected a size (bytes or a string like \"512MiB\"), got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(
                f"cannot parse size {value!r} (use bytes or e.g. \"512MiB\", \"2GB\")"
            )
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size (bytes or a string like \"512MiB\"), got {value!r}")


def parse_duration(value: object) -> float:
    """Seconds from a string such as "5s", "250ms", "1m" (a bare number means seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"5s\", got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"duration must be a finite number of seconds, got {value}")
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or (unit not in _DURATION_UNITS and unit != ""):
            raise ValueError(f"cannot parse duration {value!r} (use e.g. \"5s\", \"250ms\", \"1m\")")
        return float(m.group(1)) * _DURATION_UNITS.get(unit or "s", 1.0)
    raise ValueError(f"expected a duration like \"5s\", got {value!r}")


def format_size(n: int) -> str:
    """Human form for logs and status lines: 536870912 -> "512.0 MiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Inverse of parse_duration for printing effective config: parses back to `seconds` exactly."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    ms = round(seconds * 1000)
    if parse_duration(f"{ms}ms") == seconds:
        return f"{ms}ms"
    # Plain decimal digits (the parser takes no exponent), as many as the float needs.
    return f"{Decimal(repr(seconds)):f}s"
