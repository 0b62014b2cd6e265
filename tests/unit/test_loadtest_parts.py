"""The pure parts of loadtest.py: size distributions and the latency histogram."""

from __future__ import annotations

import random

import pytest

from elemta.loadtest import LINE, Histogram, LoadtestError, SizeDistribution


def test_size_distribution_parses_weights_and_picks_by_them() -> None:
    d = SizeDistribution.parse("1KiB:70, 100KiB:25,5MiB:5")
    assert d.sizes == (1024, 102400, 5 * 1024 * 1024) and d.weights == (70, 25, 5)
    rng = random.Random(7)
    picks = [d.pick(rng) for _ in range(10000)]
    assert 0.67 < picks.count(1024) / 10000 < 0.73
    assert SizeDistribution.parse("10KiB").describe() == "10.0 KiB"
    for bad in ("", "10KiB:-1", "x", "0"):
        with pytest.raises(LoadtestError):
            SizeDistribution.parse(bad)


def test_histogram_percentiles_within_five_percent() -> None:
    h = Histogram()
    values = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1 s
    for v in random.Random(3).sample(values, len(values)):
        h.add(v)
    for p in (50, 90, 99):
        exact = values[int(p / 100 * len(values)) - 1]
        got = h.percentile(p)
        assert got is not None and exact <= got <= exact * 1.05 + 1e-9, (p, exact, got)
    assert h.percentile(100) == 1.0 and Histogram().percentile(50) is None


def test_body_lines_never_need_dot_stuffing() -> None:
    assert not LINE.startswith(b".") and LINE.endswith(b"\r\n") and len(LINE) == 80
