"""The reclaimer's group gauges: collected apart from reclaim passes, absent while it cannot reach
Redis, and an honest "stuck" signal (idle time, not entry age)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from streamgroup.devserver import DevServer
from support.accounting import GROUP, STREAM
from support.processes import Services, wait_for

LABELS = {"stream": STREAM, "group": GROUP}


def test_gauges_keep_moving_while_a_reclaim_pass_hangs(services: Services, r: redis.Redis) -> None:
    ids = [r.xadd(STREAM, {"n": str(n)}) for n in range(5)]
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "ghost", {STREAM: ">"})  # a consumer that died holding them
    reclaimer = services.start(
        "reclaimer",
        metrics=True,
        HANDLER="support.handlers:record",
        TESTHANDLER_SLEEP_S=600,  # the handler hangs: so does the reclaim pass
        CLAIM_MIN_IDLE_MS=200,
        RECLAIM_INTERVAL_MS=100,  # the group metrics' interval too, by default
    )
    wait_for(lambda: r.exists(f"calls:{ids[0]}"), timeout=30, what="the reclaimer stuck in a handler")
    for n in range(50):
        r.xadd(STREAM, {"n": str(n)})
    wait_for(
        lambda: reclaimer.metric("streamgroup_stream_length", stream=STREAM) == 55,
        timeout=30,
        what="stream length exported while the pass hangs",
    )
    assert reclaimer.metric("streamgroup_group_lag", **LABELS) == 50


def test_oldest_pending_idle_is_time_since_delivery_not_entry_age(services: Services, r: redis.Redis) -> None:
    r.xadd(STREAM, {"n": "old"}, id="1000-0")  # added in 1970: a huge age, whatever happens now
    r.xgroup_create(STREAM, GROUP, id="0")
    reclaimer = services.start(
        "reclaimer", metrics=True, CLAIM_MIN_IDLE_MS=1000, RECLAIM_INTERVAL_MS=3_600_000, GROUP_METRICS_INTERVAL_MS=100
    )
    wait_for(lambda: reclaimer.metric("streamgroup_stream_length", stream=STREAM) == 1, timeout=30, what="gauges")
    assert reclaimer.metric("streamgroup_group_oldest_pending_idle_seconds", **LABELS) == 0
    r.xreadgroup(GROUP, "slow", {STREAM: ">"})  # delivered now, never acknowledged

    def idle_past_the_window() -> float | None:
        idle = reclaimer.metric("streamgroup_group_oldest_pending_idle_seconds", **LABELS)
        return idle if idle and idle >= 1.0 else None

    idle = wait_for(idle_past_the_window, timeout=30, what="idle past the claim window")
    (row,) = r.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert idle <= row["time_since_delivered"] / 1000.0
    age = reclaimer.metric("streamgroup_group_oldest_pending_age_seconds", **LABELS)
    assert age > 1e9 > 100 * idle, "the age counts from the entry's ID, the idle time from its delivery"


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_group_gauges_are_absent_while_disconnected(kind: str, tmp_path: Path) -> None:
    server = DevServer(kind).start()
    try:
        r = redis.Redis(port=server.port, decode_responses=True)
        for n in range(7):
            r.xadd(STREAM, {"n": str(n)})
        services = Services(server.url, tmp_path)
        reclaimer = services.start("reclaimer", metrics=True, RECLAIM_INTERVAL_MS=100, REDIS_TIMEOUT_MS=1000)
        wait_for(lambda: reclaimer.metric("streamgroup_stream_length", stream=STREAM) == 7, timeout=30, what="gauges")

        server.kill()
        wait_for(lambda: reclaimer.metric("streamgroup_redis_connected") == 0, timeout=30, what="disconnected")
        for name, labels in [
            ("streamgroup_stream_length", {"stream": STREAM}),
            ("streamgroup_group_lag", LABELS),
            ("streamgroup_group_lag_known", LABELS),
            ("streamgroup_group_pending", LABELS),
            ("streamgroup_group_oldest_pending_idle_seconds", LABELS),
            ("streamgroup_group_consumers", LABELS),
        ]:
            assert reclaimer.metric(name, **labels) is None, f"{name} exported while disconnected"

        server = DevServer(kind, port=server.port, directory=server.directory).start()
        r = redis.Redis(port=server.port, decode_responses=True)
        r.xadd(STREAM, {"n": "after"})
        wait_for(
            lambda: reclaimer.metric("streamgroup_stream_length", stream=STREAM) == 1,
            timeout=60,
            what="gauges back after reconnecting",
        )
        # Ready again once the worker kept going for a moment after reconnecting (no flicker).
        wait_for(lambda: reclaimer.metric("streamgroup_redis_connected") == 1, timeout=30, what="connected again")
        assert reclaimer.alive()
        services.stop_all()
    finally:
        server.close()
