"""Exported numbers equal what the server itself reports, at a quiet point."""

from __future__ import annotations

import json
import math

from support.accounting import GROUP, STREAM, all_acked, group_info
from support.processes import wait_for

LABELS = {"stream": STREAM, "group": GROUP}


def _quiet_state(r) -> None:
    """50 entries: 20 delivered to a consumer 'stalled', 5 of those acknowledged -> lag 30, pending 15."""
    ids = [r.xadd(STREAM, {"producer": "1", "serial": str(n)}) for n in range(50)]
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "stalled", {STREAM: ">"}, count=20)
    r.xack(STREAM, GROUP, *ids[:5])


def _observing_reclaimer(services):
    """A reclaimer that refreshes its gauges often and claims nothing during a test."""
    return services.start(
        "reclaimer", name="reclaimer", metrics=True, CLAIM_MIN_IDLE_MS=3_600_000, RECLAIM_INTERVAL_MS=100
    )


def test_group_gauges_equal_xinfo_and_xpending(services, r) -> None:
    _quiet_state(r)
    reclaimer = _observing_reclaimer(services)
    wait_for(
        lambda: reclaimer.metric("streamgroup_group_pending", **LABELS) == 15,
        timeout=15,
        what="pending gauge",
    )

    info, summary = group_info(r), r.xpending(STREAM, GROUP)
    consumers = {c["name"]: c for c in r.xinfo_consumers(STREAM, GROUP)}
    assert reclaimer.metric("streamgroup_stream_length", stream=STREAM) == r.xlen(STREAM) == 50
    assert reclaimer.metric("streamgroup_group_lag", **LABELS) == info["lag"] == 30
    assert reclaimer.metric("streamgroup_group_lag_known", **LABELS) == 1
    assert reclaimer.metric("streamgroup_group_pending", **LABELS) == info["pending"] == summary["pending"] == 15
    assert reclaimer.metric("streamgroup_group_consumers", **LABELS) == info["consumers"] == len(consumers)
    assert (
        reclaimer.metric("streamgroup_consumer_pending", **LABELS, consumer="stalled")
        == consumers["stalled"]["pending"]
    )
    idle = reclaimer.metric("streamgroup_consumer_idle_seconds", **LABELS, consumer="stalled")
    assert abs(idle - consumers["stalled"]["idle"] / 1000) < 2
    oldest_ms = int(summary["min"].split("-")[0])
    age = reclaimer.metric("streamgroup_group_oldest_pending_age_seconds", **LABELS)
    assert (
        age is not None
        and 0 <= age < 60
        and math.isclose(age, r.time()[0] + r.time()[1] / 1e6 - oldest_ms / 1000, abs_tol=2)
    )
    assert reclaimer.metric("streamgroup_dead_letter_length", stream=STREAM) == 0
    assert reclaimer.metric("streamgroup_redis_connected") == 1


def test_worker_counters_equal_what_redis_saw(services, r) -> None:
    _quiet_state(r)
    consumer = services.start("consumer", name="worker", metrics=True, HANDLER="support.handlers:record")
    wait_for(lambda: group_info(r)["lag"] == 0, timeout=15, what="the consumer to read the rest")
    wait_for(
        lambda: consumer.metric("streamgroup_messages_processed_total", **LABELS, outcome="acked") == 30,
        timeout=15,
        what="acked counter",
    )
    assert group_info(r)["pending"] == 15, "only the stalled consumer's entries remain"
    assert consumer.metric("streamgroup_messages_processed_total", **LABELS, outcome="failed") == 0
    assert consumer.metric("streamgroup_message_processing_seconds_count", **LABELS) == 30
    assert consumer.metric("streamgroup_end_to_end_latency_seconds_count", **LABELS) == 30
    assert consumer.metric("streamgroup_end_to_end_latency_seconds_bucket", **LABELS, le="+Inf") == 30

    producer = services.start("producer", name="producer", metrics=True, PRODUCERS=7, PRODUCER_INTERVAL_MS=50)
    wait_for(
        lambda: (producer.metric("streamgroup_messages_produced_total", stream=STREAM) or 0) >= 21,
        timeout=15,
        what="produced counter",
    )
    assert producer.stop() == 0
    assert r.xinfo_stream(STREAM)["entries-added"] == 50 + int(_last_produced(producer))


def _last_produced(producer) -> float:
    for line in producer.output.splitlines():
        if '"producer stopped"' in line:
            return json.loads(line)["sent"]
    raise AssertionError(f"no final count in the producer log:\n{producer.output}")


def test_lag_unknown_is_reported_not_hidden(services, r) -> None:
    _quiet_state(r)
    r.xdel(STREAM, r.xrange(STREAM, count=30)[-1][0])  # a deletion beyond last-delivered-id
    r.xgroup_setid(STREAM, GROUP, id=r.xrange(STREAM, count=10)[-1][0])
    reclaimer = _observing_reclaimer(services)
    assert group_info(r)["lag"] is None
    wait_for(
        lambda: reclaimer.metric("streamgroup_group_lag_known", **LABELS) == 0,
        timeout=15,
        what="lag_known 0",
    )
    assert math.isnan(reclaimer.metric("streamgroup_group_lag", **LABELS))


def test_only_the_reclaimer_exports_group_gauges(services, r) -> None:
    consumer = services.start("consumer", name="worker", metrics=True)
    reclaimer = services.start("reclaimer", name="reclaimer", metrics=True)
    assert consumer.metric("streamgroup_group_pending", **LABELS) is None
    assert consumer.metric("streamgroup_stream_length", stream=STREAM) is None
    wait_for(lambda: reclaimer.metric("streamgroup_group_pending", **LABELS) == 0, timeout=15, what="reclaimer gauge")


def test_consumer_is_counted_active_after_reading(services, r) -> None:
    services.start("consumer", name="live", HANDLER="support.handlers:record", BLOCK_MS=200)
    reclaimer = services.start(
        "reclaimer",
        name="reclaimer",
        metrics=True,
        RECLAIM_INTERVAL_MS=100,
        ACTIVE_CONSUMER_IDLE_MS=5000,
    )

    def agrees_with_server() -> bool:
        active = [c["name"] for c in r.xinfo_consumers(STREAM, GROUP) if c["idle"] <= 5000 and c["name"] != "reclaimer"]
        return active == ["live"] and reclaimer.metric("streamgroup_group_consumers_active", **LABELS) == 1

    wait_for(agrees_with_server, timeout=15, what="the live consumer counted active, the reclaimer not")
    r.xadd(STREAM, {"producer": "1", "serial": "1"})
    wait_for(lambda: all_acked(r, 1), timeout=15, what="message handled")
