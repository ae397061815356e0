"""The four scenarios of the original design, end to end with real processes: every id accounted for."""

from __future__ import annotations

import pytest

from support.accounting import all_acked, ledger
from support.processes import wait_for

MESSAGES = 300


@pytest.mark.parametrize(
    ("producers", "consumers"),
    [(1, 1), (1, 3), (5, 1), (5, 3)],
    ids=[
        "1-producer-1-consumer",
        "1-producer-N-consumers",
        "N-producers-1-consumer",
        "N-producers-N-consumers",
    ],
)
def test_scenario(services, r, producers: int, consumers: int) -> None:
    workers = [
        services.start("consumer", name=f"consumer-{i}", HANDLER="support.handlers:record", BATCH_SIZE=20)
        for i in range(consumers)
    ]
    producer = services.start(
        "producer",
        PRODUCERS=producers,
        PRODUCER_INTERVAL_MS=5,
        MAX_MESSAGES=MESSAGES,
        LOG_LEVEL="WARNING",
    )
    assert producer.wait(60) == 0, producer.output
    wait_for(lambda: all_acked(r, MESSAGES), timeout=60, what="every message acknowledged")
    for worker in workers:
        assert worker.stop() == 0, worker.output

    books = ledger(r)
    assert len(books.produced) == MESSAGES
    assert books.unprocessed() == set()
    assert books.duplicates == 0, "without failures every message is processed exactly once"
    pairs = {(f["producer"], f["serial"]) for f in books.produced.values()}
    assert len(pairs) == MESSAGES
    assert {f["producer"] for f in books.produced.values()} == {str(p) for p in range(1, producers + 1)}
    assert set(books.done_by) == {f"consumer-{i}" for i in range(consumers)}, "the work is split among all consumers"
    assert sum(len(ids) for ids in books.done_by.values()) == MESSAGES
