"""Reading ahead: the consumer fetches the next batch while a quick one is handled, and still
loses nothing, holds at most two batches, and leaves the group empty-handed at shutdown."""

from __future__ import annotations

import signal

import redis

from support.accounting import STREAM, all_acked, group_info, ledger
from support.processes import wait_for


def _add(r: redis.Redis, count: int) -> None:
    with r.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.xadd(STREAM, {"producer": "1", "serial": str(n)})
        pipe.execute()


def _most_held(r: redis.Redis) -> int:
    return max(int(n) for n in r.lrange("held", 0, -1))


def _consumers(r: redis.Redis) -> set[str]:
    return {c["name"] for c in r.xinfo_consumers(STREAM, "messageGroup")}


def test_a_quick_consumer_holds_the_next_batch_while_handling_one(services, r) -> None:
    _add(r, 400)
    services.start("consumer", name="quick", HANDLER="support.handlers:record_held", BATCH_SIZE=20)
    wait_for(lambda: all_acked(r, 400), timeout=60, what="all handled")
    book = ledger(r)
    assert len(book.done) == 400 and book.duplicates == 0
    assert 20 < _most_held(r) <= 40, "one batch in the handler, the next one read ahead"


def test_without_read_ahead_a_consumer_holds_one_batch(services, r) -> None:
    _add(r, 400)
    services.start("consumer", name="one-at-a-time", HANDLER="support.handlers:record_held", BATCH_SIZE=20,
                   READ_AHEAD="false")  # fmt: skip
    wait_for(lambda: all_acked(r, 400), timeout=60, what="all handled")
    assert len(ledger(r).done) == 400
    assert _most_held(r) == 20


def test_slow_batches_are_not_read_ahead(services, r) -> None:
    # CLAIM_MIN_IDLE_MS=600 renews leases every 0.2 s; reading ahead needs batches under 0.1 s.
    _add(r, 15)
    services.start("consumer", name="slow", HANDLER="support.handlers:record_held", BATCH_SIZE=5,
                   TESTHANDLER_SLEEP_S=0.05, CLAIM_MIN_IDLE_MS=600)  # fmt: skip
    wait_for(lambda: all_acked(r, 15), timeout=30, what="all handled")
    assert len(ledger(r).done) == 15
    assert _most_held(r) == 5, "no entry waits unleased behind a slow batch"


def test_sigterm_while_reading_ahead_handles_the_batch_read_and_leaves_empty_handed(services, r) -> None:
    _add(r, 3000)
    consumer = services.start("consumer", name="stopping", HANDLER="support.handlers:record_held", BATCH_SIZE=50,
                              TESTHANDLER_SLEEP_S=0.001)  # fmt: skip
    wait_for(lambda: _most_held(r) > 50 if r.exists("held") else False, timeout=30, what="reading ahead")
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(20) == 0, consumer.output
    book, info = ledger(r), group_info(r)
    assert info["pending"] == 0, "the batch read ahead was handled and acknowledged, not left behind"
    assert info["entries-read"] == len(book.done) < 3000, "stopped part-way, every entry read was handled"
    assert book.duplicates == 0
    assert "stopping" not in _consumers(r), "held nothing, so it left the group"
    assert "left the group; held nothing" in consumer.output
