"""Task/thread leak detection: real tasks, real churn; one warning per leak, none under steady load."""

from __future__ import annotations

import asyncio
import random

import pytest

from elemta.memory.governor import count_tasks
from elemta.memory.leaks import MIN_GROWTH, WINDOW, LeakDetector, Point, describe_tasks, suspect


@pytest.mark.parametrize("series, expected", [
    # (tasks, sessions) per interval
    ([(100, 90)] * WINDOW, False),  # flat
    ([(100 + 10 * i, 90) for i in range(WINDOW)], True),  # +50 with sessions flat
    ([(100 + 3 * i, 90) for i in range(WINDOW)], False),  # +15: below MIN_GROWTH
    ([(100 + 10 * i, 90 + 10 * i) for i in range(WINDOW)], False),  # follows sessions
    ([(100 + 10 * i, 90 + 5 * i) for i in range(WINDOW)], False),  # sessions ramping up
    ([(100, 90), (130, 90), (120, 90), (140, 90), (150, 90), (160, 90)], False),  # fell once
    ([(100 + 10 * i, 90) for i in range(WINDOW - 1)], False),  # window not full yet
])
def test_suspect(series: list[tuple[int, int]], expected: bool) -> None:
    assert suspect([Point(t, s) for t, s in series], floor=0) is expected


def test_warns_once_per_leak_and_again_on_further_growth() -> None:
    d = LeakDetector()
    alarms = [d.observe(100 + 10 * i, 50) for i in range(WINDOW + 4)]
    assert alarms.count(True) == 1
    # keeps leaking: warns again after a whole new window of growth, not before
    more = [d.observe(100 + 10 * (WINDOW + 4 + i), 50) for i in range(WINDOW)]
    assert more.count(True) == 1


async def _session(hold: float) -> None:
    await asyncio.sleep(hold)


async def _leaked() -> None:
    await asyncio.Event().wait()


def test_real_tasks_steady_churn_no_alarm_then_leak_alarm() -> None:
    async def scenario() -> tuple[list[bool], list[bool], str]:
        rng = random.Random(7)
        detector = LeakDetector()
        sessions: set[asyncio.Task[None]] = set()
        steady = []
        # steady load: sessions come and go around 40 concurrent, tasks follow them exactly
        for _ in range(WINDOW * 3):
            for _ in range(rng.randint(5, 25)):
                t = asyncio.create_task(_session(rng.uniform(0.001, 0.03)))
                sessions.add(t)
                t.add_done_callback(sessions.discard)
            await asyncio.sleep(0.01)
            steady.append(detector.observe(count_tasks(), len(sessions)))
        await asyncio.gather(*sessions)
        detector = LeakDetector()  # the leak phase on its own window
        leaking, leaked = [], []
        for _ in range(WINDOW + 1):
            leaked += [asyncio.create_task(_leaked()) for _ in range(MIN_GROWTH)]
            await asyncio.sleep(0)
            leaking.append(detector.observe(count_tasks(), 0))
        top = describe_tasks()
        for t in leaked:
            t.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        return steady, leaking, top

    steady, leaking, top = asyncio.run(scenario())
    assert not any(steady)
    assert leaking.count(True) == 1
    assert top.startswith("task _leaked x")
