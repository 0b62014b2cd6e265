"""Queue and delivery metrics. The queue's figures come from the queue manager's `stats()`
(one fact, one place); delivery counters are recorded here as deliveries end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0)
RESULTS = ("delivered", "deferred", "failed")

QueueStats = Callable[[], dict[str, Any] | None]


class DeliveryStats:
    """The queue manager's DeliveryObserver: one count per recipient, one duration per attempt
    (a delivery to several recipients is timed once per recipient it answers for)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._total = Counter("elemta_deliveries", "Recipient deliveries by transport and result",
                              ["transport", "result"], registry=registry)
        self._duration = Histogram("elemta_delivery_duration_seconds",
                                   "Time one delivery attempt took", buckets=DURATION_BUCKETS,
                                   registry=registry)

    def delivery(self, transport: str, result: str, seconds: float) -> None:
        self._total.labels(transport, result).inc()
        self._duration.observe(seconds)


class QueueCollector:
    def __init__(self, stats: QueueStats) -> None:
        self._stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        if s is None:
            return
        messages = GaugeMetricFamily("elemta_queue_messages",
                                     "Queued messages by state (active: being delivered, also "
                                     "counted in the state of its record)", labels=["state"])
        for state, n in sorted(s["messages"].items()):
            messages.add_metric([state], n)
        yield messages
        yield GaugeMetricFamily("elemta_queue_bytes", "Bytes of queued message bodies",
                                value=s["bytes"])
        yield GaugeMetricFamily("elemta_queue_oldest_message_age_seconds",
                                "Age of the oldest queued message (0: queue empty)",
                                value=s["oldest_age_seconds"] or 0.0)
        # The configured age the alert compares against, so a changed config needs no rule edit.
        yield GaugeMetricFamily("elemta_queue_stuck_age_seconds",
                                "[delivery] stuck_queue_age: an older message makes /health warn",
                                value=s["stuck_age_seconds"])
        conc = GaugeMetricFamily("elemta_delivery_concurrency",
                                 "Deliveries allowed by the memory governor (limit) and running",
                                 labels=["state"])
        for state, n in sorted(s["concurrency"].items()):
            conc.add_metric([state], n)
        yield conc
