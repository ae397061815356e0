"""No message lost: dead letters, leases, scale-down hand-off, ghost cleanup, safe retention."""

from __future__ import annotations

import time

from support.accounting import GROUP, STREAM, all_acked, group_info, ledger
from support.processes import wait_for

FAST_RECLAIM = {"CLAIM_MIN_IDLE_MS": 300, "RECLAIM_INTERVAL_MS": 100}
LABELS = {"stream": STREAM, "group": GROUP}


def _add(r, count: int, stream: str = STREAM) -> list[str]:
    return [r.xadd(stream, {"producer": "1", "serial": str(n)}) for n in range(1, count + 1)]


def _consumers(r) -> dict[str, dict]:
    return {c["name"]: c for c in r.xinfo_consumers(STREAM, GROUP)}


def test_failing_message_is_dead_lettered_after_exactly_max_deliveries(services, r) -> None:
    ids = _add(r, 20)
    settings = {"HANDLER": "support.handlers:fail_some", "TESTHANDLER_FAIL_MOD": 4, "MAX_DELIVERIES": 3}
    consumer = services.start("consumer", name="c1", **settings)
    reclaimer = services.start("reclaimer", name="reclaimer", metrics=True, **settings, **FAST_RECLAIM)
    wait_for(lambda: all_acked(r, 20), timeout=30, what="every entry settled")
    poisoned = {entry_id for n, entry_id in enumerate(ids, start=1) if n % 4 == 0}
    for entry_id in ids:
        assert int(r.get(f"calls:{entry_id}")) == (3 if entry_id in poisoned else 1), entry_id
    assert set(ledger(r).done) == set(ids) - poisoned, "the others flow normally"
    dead = r.xrange(f"{STREAM}:dead")
    assert {fields["x-streamgroup-original-id"] for _, fields in dead} == poisoned
    assert all(fields["x-streamgroup-deliveries"] == "3" for _, fields in dead)
    assert all("always fails" in fields["x-streamgroup-error"] for _, fields in dead)
    assert all(fields["serial"] and fields["producer"] == "1" for _, fields in dead), "original fields kept"
    wait_for(lambda: reclaimer.metric("streamgroup_dead_letter_length", stream=STREAM) == 5, timeout=10, what="gauge")
    assert reclaimer.metric("streamgroup_messages_dead_lettered_total", **LABELS) == 5
    assert consumer.alive()


def test_poison_exception_dead_letters_at_once(services, r) -> None:
    ids = _add(r, 6)
    services.start("consumer", name="c1", HANDLER="support.handlers:poison_some", TESTHANDLER_FAIL_MOD=3)
    wait_for(lambda: all_acked(r, 6), timeout=15, what="every entry settled")
    poisoned = {ids[2], ids[5]}
    assert {fields["x-streamgroup-original-id"] for _, fields in r.xrange(f"{STREAM}:dead")} == poisoned
    assert all(int(r.get(f"calls:{entry_id}")) == 1 for entry_id in ids)


def test_long_handler_keeps_its_lease_and_runs_exactly_once(services, r) -> None:
    """A handler running 3x CLAIM_MIN_IDLE_MS is never taken away from its live consumer."""
    claim = {"CLAIM_MIN_IDLE_MS": 1000, "RECLAIM_INTERVAL_MS": 100, "HANDLER": "support.handlers:record"}
    services.start("consumer", name="busy", TESTHANDLER_SLEEP_S=3, **claim)
    services.start("reclaimer", name="reclaimer", **claim)
    [entry_id] = _add(r, 1)
    wait_for(lambda: all_acked(r, 1), timeout=20, what="the long message finished")
    assert int(r.get(f"calls:{entry_id}")) == 1
    assert r.lrange("done-by", 0, -1) == [f"busy {entry_id} 1"]


def test_consumer_dying_mid_handler_is_taken_over_within_min_idle_plus_interval(services, r) -> None:
    claim_ms, interval_ms = 1500, 300
    victim = services.start(
        "consumer", name="doomed", HANDLER="support.handlers:record", TESTHANDLER_SLEEP_S=60, CLAIM_MIN_IDLE_MS=claim_ms
    )
    services.start(
        "reclaimer", name="reclaimer", HANDLER="support.handlers:record",
        CLAIM_MIN_IDLE_MS=claim_ms, RECLAIM_INTERVAL_MS=interval_ms,
    )  # fmt: skip
    [entry_id] = _add(r, 1)
    wait_for(lambda: r.exists(f"calls:{entry_id}"), timeout=15, what="the handler to start")
    time.sleep(claim_ms / 1000)  # the lease has been renewed at least once
    victim.kill()
    killed = time.monotonic()
    wait_for(lambda: all_acked(r, 1), timeout=15, interval=0.05, what="the reclaimer to take over")
    took = time.monotonic() - killed
    assert took <= (claim_ms + interval_ms) / 1000 + 0.5, f"takeover after {took:.2f}s"
    assert r.lrange("done-by", 0, -1) == [f"reclaimer {entry_id} 2"]


def _read_with_half_held(r, count: int) -> bool:
    """Every entry delivered; the failing handler (every 2nd serial) left half of them pending."""
    info = group_info(r) if r.exists(STREAM) and r.xinfo_groups(STREAM) else None
    return info is not None and info["entries-read"] == count and info["pending"] == count // 2


def test_scale_down_hands_off_what_it_holds_and_leaves_only_when_empty(services, r) -> None:
    failing = {"HANDLER": "support.handlers:fail_some", "TESTHANDLER_FAIL_MOD": 2, "CLAIM_MIN_IDLE_MS": 60_000}
    holder = services.start("consumer", name="holder", **failing)
    _add(r, 4)
    wait_for(lambda: _read_with_half_held(r, 4), timeout=15, what="all tried once")
    empty = services.start("consumer", name="empty", HANDLER="support.handlers:record", BLOCK_MS=200)
    wait_for(lambda: "empty" in _consumers(r), timeout=15, what="the second consumer registered")
    assert empty.stop() == 0
    assert "empty" not in _consumers(r), "a consumer holding nothing leaves the group"

    held = {row["message_id"] for row in r.xpending_range(STREAM, GROUP, "-", "+", 10, "holder")}
    assert held, "the failing handler left entries pending with 'holder'"
    assert holder.stop() == 0
    assert "holder" in _consumers(r), "never DELCONSUMER a consumer with pending entries"
    idle = {row["message_id"]: row["time_since_delivered"] for row in r.xpending_range(STREAM, GROUP, "-", "+", 10)}
    assert all(idle[i] >= 60_000 for i in held), "marked claimable at once"

    # The reclaimer need not wait the 60 s claim window, and then removes the empty ghost.
    services.start(
        "reclaimer", name="reclaimer", HANDLER="support.handlers:record", CLAIM_MIN_IDLE_MS=60_000,
        RECLAIM_INTERVAL_MS=100, CONSUMER_DELETE_IDLE_MS=1,
    )  # fmt: skip
    wait_for(lambda: group_info(r)["pending"] == 0, timeout=10, what="hand-off taken over")
    assert held <= ledger(r).done_by["reclaimer"]
    wait_for(lambda: "holder" not in _consumers(r), timeout=10, what="ghost removed once empty")


def test_idle_consumers_holding_nothing_are_removed_and_holders_are_kept(services, r) -> None:
    _add(r, 3)
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "ghost-empty", {STREAM: ">"}, count=1)
    r.xack(STREAM, GROUP, r.xrange(STREAM, count=1)[0][0])
    r.xreadgroup(GROUP, "ghost-holding", {STREAM: ">"}, count=1)
    reclaimer = services.start(
        "reclaimer", name="reclaimer", metrics=True, CLAIM_MIN_IDLE_MS=3_600_000, RECLAIM_INTERVAL_MS=100,
        CONSUMER_DELETE_IDLE_MS=500,
    )  # fmt: skip
    wait_for(lambda: "ghost-empty" not in _consumers(r), timeout=10, what="empty ghost removed")
    time.sleep(1)
    assert "ghost-holding" in _consumers(r), "its entry would be lost from the pending list"
    assert _consumers(r)["ghost-holding"]["pending"] == 1
    assert reclaimer.metric("streamgroup_consumers_deleted_total", **LABELS) == 1


def test_retention_trims_only_what_every_group_acknowledged(services, r) -> None:
    ids = _add(r, 50)
    r.xgroup_create(STREAM, "laggard", id="0")
    r.xreadgroup("laggard", "slow", {STREAM: ">"}, count=10)
    r.xack(STREAM, "laggard", *ids[:3], ids[5])  # oldest still pending in 'laggard': ids[3]
    services.start("consumer", name="fast", HANDLER="support.handlers:record")
    reclaimer = services.start(
        "reclaimer", name="reclaimer", metrics=True, RETENTION_ENABLED="true", RECLAIM_INTERVAL_MS=100,
        CLAIM_MIN_IDLE_MS=3_600_000,
    )  # fmt: skip
    wait_for(lambda: all_acked(r, 50), timeout=15, what="the fast group done")
    wait_for(lambda: r.xlen(STREAM) == 47, timeout=10, what="trim below the laggard's oldest pending entry")
    assert r.xrange(STREAM, count=1)[0][0] == ids[3]
    assert reclaimer.metric("streamgroup_entries_trimmed_total", stream=STREAM) == 3

    # Everything the laggard still needs is there: its pending entries and all it has not read.
    pending = [row["message_id"] for row in r.xpending_range(STREAM, "laggard", "-", "+", 100)]
    assert pending == [ids[3], ids[4], *ids[6:10]]
    rest = r.xreadgroup("laggard", "slow", {STREAM: ">"}, count=100)[0][1]
    assert [entry_id for entry_id, _ in rest] == ids[10:]
    r.xack(STREAM, "laggard", *pending, *ids[10:])
    wait_for(lambda: r.xlen(STREAM) == 0, timeout=10, what="all trimmed once both groups are done")
    assert group_info(r)["lag"] == 0, "trimming only acknowledged entries keeps the lag known"


def test_retention_keeps_a_minimum_of_entries(services, r) -> None:
    _add(r, 30)
    services.start("consumer", name="fast", HANDLER="support.handlers:record")
    services.start(
        "reclaimer", name="reclaimer", RETENTION_ENABLED="true", RETENTION_MIN_ENTRIES=10, RECLAIM_INTERVAL_MS=100
    )
    wait_for(lambda: all_acked(r, 30), timeout=15, what="all done")
    wait_for(lambda: r.xlen(STREAM) == 10, timeout=10, what="trimmed down to the minimum")
    time.sleep(0.5)
    assert r.xlen(STREAM) == 10


def test_retention_is_off_by_default(services, r) -> None:
    _add(r, 10)
    services.start("consumer", name="fast", HANDLER="support.handlers:record")
    reclaimer = services.start("reclaimer", name="reclaimer", metrics=True, RECLAIM_INTERVAL_MS=100)
    wait_for(lambda: all_acked(r, 10), timeout=15, what="all done")
    wait_for(lambda: reclaimer.metric("streamgroup_group_pending", **LABELS) == 0, timeout=10, what="a pass")
    time.sleep(0.5)
    assert r.xlen(STREAM) == 10
