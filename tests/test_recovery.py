"""A consumer that dies keeps no message: its own restart or the reclaimer finishes its work."""

from __future__ import annotations

from support.accounting import all_acked, group_info, ledger
from support.processes import wait_for


def _pending_of(r, consumer: str) -> int:
    return next(
        (c["pending"] for c in r.xinfo_consumers("messageStream", "messageGroup") if c["name"] == consumer),
        0,
    )


def _produce(services, count: int) -> None:
    producer = services.start("producer", PRODUCERS=count, PRODUCER_INTERVAL_MS=0, MAX_MESSAGES=count)
    assert producer.wait(30) == 0, producer.output


def _kill_mid_batch(services, r, name: str, count: int) -> set[str]:
    """Start a slow consumer, SIGKILL it while it holds a batch; return the ids it left pending.

    Acknowledgements go out once per batch, so entries handled just before the kill are pending
    too: they will be handled again (at-least-once), which the tests below allow for.
    """
    victim = services.start(
        "consumer",
        name=name,
        HANDLER="support.handlers:record",
        TESTHANDLER_SLEEP_S=0.1,
        BATCH_SIZE=count,
    )
    _produce(services, count)
    wait_for(lambda: len(ledger(r).done) >= 3, timeout=30, what="a few messages handled")
    victim.kill()
    held = {row["message_id"] for row in r.xpending_range("messageStream", "messageGroup", "-", "+", 100, name)}
    assert held, "the killed consumer must have died holding entries"
    assert held - set(ledger(r).done), "it died before handling some of what it held"
    return held


def test_consumer_restarted_under_same_name_finishes_its_own_pending(services, r) -> None:
    held = _kill_mid_batch(services, r, "consumer-a", 20)
    services.start("consumer", name="consumer-a", HANDLER="support.handlers:record", BATCH_SIZE=20)
    wait_for(lambda: all_acked(r, 20), timeout=30, what="the restarted consumer to finish")
    books = ledger(r)
    assert books.unprocessed() == set()
    assert held <= books.done_by["consumer-a"]
    last_run = {entry_id: int(deliveries) for _, entry_id, deliveries in map(str.split, r.lrange("done-by", 0, -1))}
    assert {last_run[entry_id] for entry_id in held} == {2}, "the handler is told it is the second delivery"


def test_reclaimer_takes_over_from_a_consumer_that_never_returns(services, r) -> None:
    held = _kill_mid_batch(services, r, "consumer-gone", 20)
    services.start(
        "reclaimer",
        name="reclaimer",
        HANDLER="support.handlers:record",
        CLAIM_MIN_IDLE_MS=500,
        RECLAIM_INTERVAL_MS=200,
    )
    wait_for(
        lambda: all_acked(r, 20),
        timeout=30,
        what="the reclaimer to finish the dead consumer's work",
    )
    books = ledger(r)
    assert books.unprocessed() == set()
    assert held <= books.done_by["reclaimer"]
    assert _pending_of(r, "consumer-gone") == 0


def test_failed_message_stays_pending_and_the_reclaimer_retries_it(services, r) -> None:
    consumer = services.start("consumer", name="consumer-f", HANDLER="support.handlers:fail_first_delivery")
    _produce(services, 5)

    def tried_once() -> bool:
        return sum(int(r.get(f"calls:{entry_id}") or 0) for entry_id, _ in r.xrange("messageStream")) == 5

    wait_for(tried_once, timeout=30, what="every message tried once")
    assert r.llen("done-by") == 0
    assert group_info(r)["pending"] == 5, "failed messages are not acknowledged"
    assert _pending_of(r, "consumer-f") == 5
    services.start(
        "reclaimer", name="reclaimer", HANDLER="support.handlers:fail_first_delivery",
        CLAIM_MIN_IDLE_MS=300, RECLAIM_INTERVAL_MS=200,
    )  # fmt: skip
    wait_for(lambda: all_acked(r, 5), timeout=30, what="the reclaimer to retry the failures")
    books = ledger(r)
    assert set(books.done_by) == {"reclaimer"}
    assert books.duplicates == 0
    rows = [row.split() for row in r.lrange("done-by", 0, -1)]
    assert {int(deliveries) for _, _, deliveries in rows} == {2}
    assert consumer.alive(), "a failing handler never kills the consumer"
