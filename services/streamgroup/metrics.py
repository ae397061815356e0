"""Prometheus metrics. Names follow redis_exporter and the Prometheus naming guide; labels stay bounded."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

PREFIX = "streamgroup"
OUTCOMES = ("acked", "failed", "dead_lettered")
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip


class BatchHistogram(Collector):
    """A histogram with one fixed label set, fed a batch at a time.

    prometheus_client's Histogram takes a lock and walks the buckets per observation; at 100k
    messages a second that costs more than the rest of the consumer's per-message work.
    """

    def __init__(self, name: str, documentation: str, labels: dict[str, str], buckets=LATENCY_BUCKETS):
        self._name, self._doc, self._labels = name, documentation, labels
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds = self._counts, self._bounds
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self._sum += total

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=list(self._labels))
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(list(self._labels.values()), buckets, self._sum)
        yield family

    @property
    def count(self) -> int:
        return sum(self._counts)


class Metrics:
    """Every metric of one process, on its own registry (tests make a fresh one each)."""

    def __init__(self, stream: str, group: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        reg, p = self.registry, PREFIX
        sg = ["stream", "group"]
        self.redis_connected = Gauge(f"{p}_redis_connected", "1 while this process is connected to Redis", registry=reg)

        # Work counters, exported by the process doing the work.
        self.produced = Counter(
            f"{p}_messages_produced",
            "Messages Redis accepted from the producer",
            ["stream"],
            registry=reg,
        ).labels(stream)
        processed = Counter(
            f"{p}_messages_processed",
            "Messages handled, by outcome",
            [*sg, "outcome"],
            registry=reg,
        )
        self.processed = {outcome: processed.labels(stream, group, outcome) for outcome in OUTCOMES}
        self.reclaimed = Counter(
            f"{p}_messages_reclaimed",
            "Pending entries taken over from idle consumers",
            sg,
            registry=reg,
        ).labels(stream, group)
        self.dead_lettered = Counter(
            f"{p}_messages_dead_lettered",
            "Entries moved to the dead-letter stream",
            sg,
            registry=reg,
        ).labels(stream, group)
        self.consumers_deleted = Counter(
            f"{p}_consumers_deleted",
            "Idle consumers holding nothing that were removed from the group",
            sg,
            registry=reg,
        ).labels(stream, group)
        labels = {"stream": stream, "group": group}
        self.processing_seconds = BatchHistogram(
            f"{p}_message_processing_seconds", "Time the handler took per message", labels
        )
        self.end_to_end_seconds = BatchHistogram(
            f"{p}_end_to_end_latency_seconds",
            "From the entry ID's timestamp to its acknowledgement",
            labels,
        )
        reg.register(self.processing_seconds)
        reg.register(self.end_to_end_seconds)

        # Group-level gauges, exported by the reclaimer from XINFO/XPENDING.
        self.stream_length = Gauge(
            f"{p}_stream_length", "Entries in the stream (XLEN)", ["stream"], registry=reg
        ).labels(stream)
        self.dead_letter_length = Gauge(
            f"{p}_dead_letter_length",
            "Entries in the dead-letter stream of this stream",
            ["stream"],
            registry=reg,
        ).labels(stream)
        self.group_lag = Gauge(
            f"{p}_group_lag",
            "Entries not yet delivered to the group (XINFO GROUPS lag)",
            sg,
            registry=reg,
        ).labels(stream, group)
        self.group_lag_known = Gauge(
            f"{p}_group_lag_known",
            "1 when Redis knows the group's lag, 0 when it reports it as unknown",
            sg,
            registry=reg,
        ).labels(stream, group)
        self.group_pending = Gauge(
            f"{p}_group_pending",
            "Entries delivered and not acknowledged (XPENDING)",
            sg,
            registry=reg,
        ).labels(stream, group)
        self.oldest_pending_age = Gauge(
            f"{p}_group_oldest_pending_age_seconds",
            "Age of the oldest pending entry, from its ID's timestamp",
            sg,
            registry=reg,
        ).labels(stream, group)
        self.group_consumers = Gauge(
            f"{p}_group_consumers", "Consumers registered in the group", sg, registry=reg
        ).labels(stream, group)
        self.group_consumers_active = Gauge(
            f"{p}_group_consumers_active",
            "Consumers that interacted with the group recently",
            sg,
            registry=reg,
        ).labels(stream, group)
        self.consumer_pending = Gauge(
            f"{p}_consumer_pending", "Pending entries per consumer", [*sg, "consumer"], registry=reg
        )
        self.consumer_idle = Gauge(
            f"{p}_consumer_idle_seconds",
            "Seconds since the consumer's last interaction",
            [*sg, "consumer"],
            registry=reg,
        )
        self._labels = (stream, group)

    def set_consumers(self, consumers: Iterable[tuple[str, int, float]]) -> None:
        """Replace the per-consumer series, so consumers that left the group stop being exported."""
        self.consumer_pending.clear()
        self.consumer_idle.clear()
        for name, pending, idle_seconds in consumers:
            self.consumer_pending.labels(*self._labels, name).set(pending)
            self.consumer_idle.labels(*self._labels, name).set(idle_seconds)
