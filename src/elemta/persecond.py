"""A text that depends only on the second it names, formatted once per second.

A line per message (the Received: header's date, the JSON log line's time) would otherwise
format the same second hundreds of times; strftime and email.utils.formatdate cost more than
the rest of building either line.
"""

from __future__ import annotations

from collections.abc import Callable


class PerSecond:
    def __init__(self, render: Callable[[int], str]) -> None:
        """`render(second)`: the text for that second (seconds since the epoch)."""
        self._render = render
        self._last: tuple[int, str] = (-1, "")  # one tuple, swapped whole: safe across threads

    def text(self, at: float) -> str:
        """The text for the second `at` falls in."""
        second, text = self._last
        if second != int(at):
            second = int(at)
            text = self._render(second)
            self._last = (second, text)
        return text
