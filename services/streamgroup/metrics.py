"""Prometheus metrics. Names follow redis_exporter and the Prometheus naming guide; labels stay bounded."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from streamgroup.redis_errors import OUTAGE_KINDS

if TYPE_CHECKING:
    from streamgroup.groupstats import GroupStats

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

    def observe_counts(self, pairs: Iterable[tuple[float, int]]) -> None:
        """Observe each value `count` times (many entries of a batch share a millisecond)."""
        counts, bounds = self._counts, self._bounds
        total = 0.0
        for value, count in pairs:
            counts[bisect_left(bounds, value)] += count
            total += value * count
        self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=list(self._labels))
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(list(self._labels.values()), buckets, self._sum)
        yield family


@dataclass(frozen=True, slots=True)
class ShardWork:
    """The work counters of one shard, resolved once: a hot path only calls inc()."""

    processed: dict[str, Counter]  # by outcome
    dead_lettered: Counter
    reclaimed: Counter
    consumers_deleted: Counter
    trimmed: Counter


class Metrics:
    """Every metric of one process, on its own registry (tests make a fresh one each).

    Only the reclaimer exports the group-level gauges (group_level=True): one exporter per group,
    so a sum over pods never counts the backlog twice. Elsewhere they exist but are not registered.

    Counters of work and group gauges carry a `shard` label: the shard's index ("0" with one shard,
    see streamgroup.keys.read_shards), so there are as many series as shards, all created at start.
    """

    def __init__(
        self,
        stream: str,
        group: str,
        group_level: bool = False,
        registry: CollectorRegistry | None = None,
        shards: Sequence[str] = ("0",),
    ):
        self.registry = registry or CollectorRegistry()
        work, groups = self.registry, self.registry if group_level else None
        sg = ["stream", "group"]
        sgs = [*sg, "shard"]

        def counter(name: str, doc: str, labels: list[str], registry: CollectorRegistry | None = work) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=groups)

        self.redis_connected = Gauge(
            f"{PREFIX}_redis_connected", "1 while connected to Redis and not in an outage", registry=work
        )
        redis_errors = counter(
            "redis_errors", "Redis failures treated as an outage (retried with backoff), by kind", ["kind"]
        )
        self.redis_errors = {kind: redis_errors.labels(kind) for kind in OUTAGE_KINDS}

        # Work, exported by the process doing it.
        self.produced = counter("messages_produced", "Messages Redis accepted from the producer", ["stream"]).labels(
            stream
        )
        processed = counter("messages_processed", "Messages handled, by outcome", [*sgs, "outcome"])
        dead_lettered = counter("messages_dead_lettered", "Entries moved to the dead-letter stream", sgs)
        self.handler_timeouts = counter(
            "handler_timeouts", "Handler calls that ran past STREAMGROUP_HANDLER_TIMEOUT_MS and were given up", sg
        ).labels(stream, group)
        labels = {"stream": stream, "group": group}
        self.processing_seconds = BatchHistogram(
            f"{PREFIX}_message_processing_seconds", "Time the handler took per message", labels
        )
        self.end_to_end_seconds = BatchHistogram(
            f"{PREFIX}_end_to_end_latency_seconds", "From the entry ID's timestamp to its acknowledgement", labels
        )
        work.register(self.processing_seconds)
        work.register(self.end_to_end_seconds)

        # The reclaimer's own work.
        reclaimed = counter("messages_reclaimed", "Pending entries taken over from idle consumers", sgs, groups)
        consumers_deleted = counter(
            "consumers_deleted", "Idle consumers holding nothing that were removed from the group", sgs, groups
        )
        trimmed = counter(
            "entries_trimmed", "Entries trimmed after every group acknowledged them", ["stream", "shard"], groups
        )
        self.shards = tuple(shards)
        self.work = {
            shard: ShardWork(
                processed={outcome: processed.labels(stream, group, shard, outcome) for outcome in OUTCOMES},
                dead_lettered=dead_lettered.labels(stream, group, shard),
                reclaimed=reclaimed.labels(stream, group, shard),
                consumers_deleted=consumers_deleted.labels(stream, group, shard),
                trimmed=trimmed.labels(stream, shard),
            )
            for shard in self.shards
        }

        # Group level, from XINFO / XPENDING / XLEN. Absent (not stale) while they cannot be
        # collected: hide_group() clears them, export_group() brings them back.
        self._stream_length = gauge("stream_length", "Entries in the stream (XLEN)", ["stream", "shard"])
        self._dead_letter_length = gauge(
            "dead_letter_length", "Entries in the dead-letter stream of this stream", ["stream", "shard"]
        )
        self._group_lag = gauge(
            "group_lag", "Entries not yet delivered to the group (XINFO GROUPS lag); NaN when unknown", sgs
        )
        self._group_lag_known = gauge(
            "group_lag_known", "1 when Redis knows the group's lag, 0 when it reports it as unknown", sgs
        )
        self._group_pending = gauge("group_pending", "Entries delivered and not acknowledged (XPENDING)", sgs)
        self._oldest_pending_age = gauge(
            "group_oldest_pending_age_seconds",
            "Time since the oldest pending entry was added (from its ID), not how long it has been pending",
            sgs,
        )
        self._oldest_pending_idle = gauge(
            "group_oldest_pending_idle_seconds",
            "Largest time since last delivery among pending entries (XPENDING idle); compare with the claim window",
            sgs,
        )
        self._group_consumers = gauge("group_consumers", "Consumers registered in the group", sgs)
        self._group_consumers_active = gauge(
            "group_consumers_active", "Consumers other than the reclaimer that interacted with the group recently", sgs
        )
        self.consumer_pending = gauge("consumer_pending", "Pending entries per consumer", [*sgs, "consumer"])
        self.consumer_idle = gauge(
            "consumer_idle_seconds", "Seconds since the consumer's last interaction", [*sgs, "consumer"]
        )
        self._stream_gauges = (self._stream_length, self._dead_letter_length)
        self._group_gauges = (
            self._group_lag, self._group_lag_known, self._group_pending, self._oldest_pending_age,
            self._oldest_pending_idle, self._group_consumers, self._group_consumers_active,
        )  # fmt: skip
        self._stream = stream
        self._labels = (stream, group)

        for shard in self.shards:
            self.export_group_values(shard)

    def export_group_values(
        self,
        shard: str = "0",
        stream_length: float = 0,
        dead_letter_length: float = 0,
        lag: float | None = None,
        pending: float = 0,
        oldest_pending_age_seconds: float = 0.0,
        oldest_pending_idle_seconds: float = 0.0,
        consumers: float = 0,
        consumers_active: float = 0,
    ) -> None:
        self._stream_length.labels(self._stream, shard).set(stream_length)
        self._dead_letter_length.labels(self._stream, shard).set(dead_letter_length)
        sgs = (*self._labels, shard)
        self._group_lag_known.labels(*sgs).set(0 if lag is None else 1)
        self._group_lag.labels(*sgs).set(float("nan") if lag is None else lag)
        self._group_pending.labels(*sgs).set(pending)
        self._oldest_pending_age.labels(*sgs).set(oldest_pending_age_seconds)
        self._oldest_pending_idle.labels(*sgs).set(oldest_pending_idle_seconds)
        self._group_consumers.labels(*sgs).set(consumers)
        self._group_consumers_active.labels(*sgs).set(consumers_active)

    def export_group(self, by_shard: Mapping[str, GroupStats], active_within_seconds: float, besides: str) -> None:
        """Export a snapshot of every shard's stream and group (only the reclaimer does)."""
        for shard, stats in by_shard.items():
            self.export_group_values(
                shard,
                stream_length=stats.stream_length,
                dead_letter_length=stats.dead_letter_length,
                lag=stats.lag,
                pending=stats.pending,
                oldest_pending_age_seconds=stats.oldest_pending_age_seconds,
                oldest_pending_idle_seconds=stats.oldest_pending_idle_seconds,
                consumers=len(stats.consumers),
                consumers_active=stats.active_consumers(active_within_seconds, besides=besides),
            )
        self.set_consumers(
            (shard, c.name, c.pending, c.idle_seconds) for shard, stats in by_shard.items() for c in stats.consumers
        )

    def hide_group(self) -> None:
        """Stop exporting the stream and group gauges: a value we cannot refresh is not shown."""
        for gauge in (*self._stream_gauges, *self._group_gauges, self.consumer_pending, self.consumer_idle):
            gauge.clear()

    def set_consumers(self, consumers: Iterable[tuple[str, str, int, float]]) -> None:
        """Replace the per-consumer series (shard, name, pending, idle), so consumers that left the
        group stop being exported."""
        self.consumer_pending.clear()
        self.consumer_idle.clear()
        for shard, name, pending, idle_seconds in consumers:
            self.consumer_pending.labels(*self._labels, shard, name).set(pending)
            self.consumer_idle.labels(*self._labels, shard, name).set(idle_seconds)
