"""The consumer and the reclaimer under faults that used to cost innocent messages or duplicates:
a message that kills the process, slow batches read ahead, delivery counts over a crowded pending
list, two processes under one consumer name, a group destroyed under running services, entries
deleted while pending, and how acknowledgements are counted."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis
from redis.crc import key_slot

from streamgroup import streams
from streamgroup.connection import create_client
from streamgroup.keys import StreamKeys
from streamgroup.message import decode_batch
from streamgroup.naming import NameLease
from streamgroup.settings import Settings
from support import faults
from support.accounting import GROUP, STREAM, all_acked, ledger
from support.processes import Services, wait_for

FAST_RECLAIM = {"CLAIM_MIN_IDLE_MS": 500, "RECLAIM_INTERVAL_MS": 100}
LABELS = {"stream": STREAM, "group": GROUP}
QUICK_NAME_LEASE = {"CONSUMER_NAME_LEASE_MS": 1000}


def _add(r: redis.Redis, count: int, first_serial: int = 0) -> list[str]:
    with r.pipeline(transaction=False) as pipe:
        for n in range(first_serial, first_serial + count):
            pipe.xadd(STREAM, {"producer": "1", "serial": str(n)})
        return pipe.execute()


def _pending_ids(r: redis.Redis) -> set[str]:
    return {row["message_id"] for row in r.xpending_range(STREAM, GROUP, "-", "+", 100_000)}


def _dead(r: redis.Redis) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(f"{STREAM}:dead")]


def _settled(r: redis.Redis, count: int) -> bool:
    return all_acked(r, count)


def _keep_restarting(services: Services, kind: str, name: str, done, timeout: float = 120, **settings) -> int:
    """Run one process of `kind` and start it again whenever it dies, as Kubernetes would, until
    done(); returns how many times it died."""
    deaths = 0
    process = services.start(kind, name=name, **settings)

    def check() -> bool:
        nonlocal process, deaths
        if done():
            return True
        if not process.alive():
            deaths += 1
            process = services.start(kind, name=name, **settings)
        return False

    wait_for(check, timeout=timeout, interval=0.2, what=f"{kind} {name} to settle everything")
    process.stop()
    return deaths


# Item 3: crash attribution.


def test_a_message_that_kills_the_consumer_is_the_only_one_dead_lettered(services, r) -> None:
    ids = _add(r, 100)
    killer = ids[50]
    settings = {"HANDLER": "support.fault_handlers:exit_on_killer", "TESTHANDLER_KILLER_SERIAL": 50,
                "BATCH_SIZE": 100, "MAX_DELIVERIES": 3, **QUICK_NAME_LEASE}  # fmt: skip
    deaths = _keep_restarting(services, "consumer", "c1", lambda: _settled(r, 100), **settings)
    assert deaths == 3, "killed on each of its 3 deliveries, then dead-lettered without a call"
    assert [fields["x-streamgroup-original-id"] for fields in _dead(r)] == [killer]
    book = ledger(r)
    assert set(book.done) == set(ids) - {killer}, "the other 99 were handled"
    assert _pending_ids(r) == set()
    assert r.llen("killed-by") == 3


def test_a_message_that_kills_the_reclaimer_is_the_only_one_dead_lettered(services, r) -> None:
    ids = _add(r, 100)
    killer = ids[50]
    settings = {"HANDLER": "support.fault_handlers:exit_on_killer", "TESTHANDLER_KILLER_SERIAL": 50,
                "BATCH_SIZE": 100, "MAX_DELIVERIES": 3, **FAST_RECLAIM}  # fmt: skip
    consumer = services.start("consumer", name="c1", **settings)
    assert consumer.wait(60) == 137, "the consumer died on the killer, holding the whole batch"
    assert len(_pending_ids(r)) == 100
    deaths = _keep_restarting(services, "reclaimer", "reclaimer", lambda: _settled(r, 100), **settings)
    assert deaths == 2, "deliveries 2 and 3 killed the reclaimer; the 4th went to :dead without a call"
    assert [fields["x-streamgroup-original-id"] for fields in _dead(r)] == [killer]
    assert set(ledger(r).done) == set(ids) - {killer}, "the other 99 were handled"


# Item 4: acknowledgements leave at once.


def test_acknowledgements_of_a_slow_batch_do_not_wait_for_the_next_batch(services, r) -> None:
    ids = _add(r, 40)
    services.start("consumer", name="c1", HANDLER="support.fault_handlers:slow_then_block", BATCH_SIZE=10,
                   TESTHANDLER_SLOW_SERIALS="10-20", TESTHANDLER_SLOW_S=0.15, TESTHANDLER_BLOCK_SERIAL=20)  # fmt: skip
    wait_for(lambda: r.exists(f"calls:{ids[20]}"), timeout=60, what="the batch after the slow one to start")
    slow_batch = set(ids[10:20])
    assert all(r.get(f"done:{entry_id}") for entry_id in slow_batch)
    wait_for(lambda: not (_pending_ids(r) & slow_batch), timeout=10, what="the slow batch acknowledged")
    assert r.get(f"done:{ids[20]}") is None, "while the next batch is still in the handler"
    r.set("release", 1)
    wait_for(lambda: _settled(r, 40), timeout=30, what="everything handled")
    assert ledger(r).duplicates == 0


# Item 8: delivery counts whatever else the consumer holds.


def test_delivery_counts_cover_every_entry_however_many_others_the_consumer_holds(redis_url, r) -> None:
    keys = StreamKeys(STREAM, GROUP, f"{STREAM}:dead")
    ids = _add(r, 40)
    r.xgroup_create(STREAM, GROUP, id="0")
    for _ in ids:
        r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=1)
    batch = ids[::4]  # 10 entries, with 3 others the consumer holds between each two of them
    for _ in range(9):
        r.xclaim(STREAM, GROUP, "c", 0, batch)  # each claim counts a delivery: 10 in all
    entries = [[entry_id.encode(), [b"serial", b"1"]] for entry_id in batch]

    async def counts() -> dict[str, int]:
        client = create_client(Settings(redis_url=redis_url))
        try:
            return await streams.delivery_counts(client, keys, "c", entries)
        finally:
            await client.aclose()

    deliveries = asyncio.run(counts())
    assert deliveries == dict.fromkeys(batch, 10)
    messages, rejected = decode_batch(STREAM, entries, deliveries, max_deliveries=5)
    assert messages == [], "none is handed to the handler as a first delivery"
    assert [raw.id for raw, _ in rejected] == batch


# Item 13: two processes under one consumer name.


def test_a_second_process_under_a_name_in_use_waits_not_ready_and_takes_over_when_it_is_free(services, r) -> None:
    settings = {"HANDLER": "support.fault_handlers:record_pid", "BATCH_SIZE": 10, "TESTHANDLER_SLEEP_S": 0.01,
                "CONSUMER_NAME_LEASE_MS": 2000}  # fmt: skip
    first = services.start("consumer", name="twin", metrics=True, **settings)
    ids = _add(r, 300)
    wait_for(lambda: r.llen("pids") > 20, timeout=60, what="the first one at work")
    second = services.start("consumer", name="twin", metrics=True, **settings)
    wait_for(lambda: "another process is using this consumer name" in second.output, timeout=30, what="conflict")
    assert "twin" in second.output
    wait_for(lambda: _settled(r, 300), timeout=120, what="the first one to handle everything")
    assert second.get("/readyz")[0] == 503, "not ready while the name is taken"
    assert second.alive()
    pids = {row.split(" ")[0] for row in r.lrange("pids", 0, -1)}
    assert pids == {str(first.process.pid)}, "the second one handled nothing"
    assert ledger(r).duplicates == 0

    more = _add(r, 300, first_serial=300)
    wait_for(lambda: r.llen("pids") > 320, timeout=60, what="the first one at work again")
    first.kill()
    wait_for(lambda: second.get("/readyz")[0] == 200, timeout=60, what="the second one taking over")
    wait_for(lambda: _settled(r, 600), timeout=120, what="the second one to finish, history included")
    book = ledger(r)
    assert set(book.done) == set(ids) | set(more)
    assert book.duplicates <= 20, "at most what the killed one held (a batch, and one read ahead)"
    assert str(second.process.pid) in {row.split(" ")[0] for row in r.lrange("pids", 0, -1)}

    conflict = "another process is using this consumer name"
    seen = second.output.count(conflict)  # the processes of one name share a log file
    third = services.start("consumer", name="twin", **settings)
    wait_for(lambda: third.output.count(conflict) > seen, timeout=30, what="conflict")
    assert third.stop() == 0, "stopped while waiting: a clean exit"
    assert "left the group" not in third.output and "handed pending entries" not in third.output, (
        "it touched nothing of the name's owner"
    )
    assert second.stop() == 0
    assert not r.exists(f"{{{STREAM}}}:{GROUP}:consumer:twin"), "the name was given back at a clean stop"


def test_a_process_frozen_past_its_name_lease_stops_reading_when_it_resumes(services, r) -> None:
    settings = {"HANDLER": "support.fault_handlers:record_pid", "BATCH_SIZE": 10, "TESTHANDLER_SLEEP_S": 0.01,
                "CONSUMER_NAME_LEASE_MS": 1500}  # fmt: skip
    first = services.start("consumer", name="twin", metrics=True, **settings)
    wait_for(lambda: first.get("/readyz")[0] == 200, timeout=30, what="the first one ready")
    conflict = "another process is using this consumer name"
    second = services.start("consumer", name="twin", metrics=True, **settings)
    wait_for(lambda: conflict in second.output, timeout=30, what="the second one waiting")
    first.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: second.get("/readyz")[0] == 200, timeout=30, what="the second one taking the name")
    finally:
        first.signal(signal.SIGCONT)
    wait_for(lambda: first.get("/readyz")[0] == 503, timeout=30, what="the first one noticing")
    ids = _add(r, 200)
    wait_for(lambda: set(ids) <= set(ledger(r).done), timeout=60, what="new entries handled")
    handlers = {row.split(" ")[0] for row in r.lrange("pids", 0, -1)}
    assert handlers == {str(second.process.pid)}, "only the process holding the name reads"
    assert ledger(r).duplicates == 0
    assert first.alive() and first.get("/readyz")[0] == 503, "the first one waits, not ready"


# Item 15: the group destroyed under running services.


def test_a_destroyed_group_is_recreated_where_the_consumer_last_read(services, r) -> None:
    ids = _add(r, 12_000)
    settings = {"HANDLER": "support.handlers:record", "BATCH_SIZE": 100, **FAST_RECLAIM}
    # The reclaimer runs before the group goes: one that only starts after it (the consumer can
    # handle a quarter before a slow machine has the reclaimer up) rightly creates it at 0.
    services.start("reclaimer", name="reclaimer", **settings)
    wait_for(lambda: r.xinfo_groups(STREAM), timeout=30, what="the group, made by the reclaimer")
    consumer = services.start("consumer", name="c1", **settings)
    wait_for(lambda: r.llen("done-by") > 3000, timeout=120, what="a quarter handled")
    r.xgroup_destroy(STREAM, GROUP)
    wait_for(lambda: set(ids) <= set(ledger(r).done), timeout=180, what="every message handled")
    wait_for(lambda: r.xpending(STREAM, GROUP)["pending"] == 0, timeout=30, what="nothing pending")
    assert ledger(r).duplicates <= 300, "what was in flight, a few batches, not the stream"
    assert "the consumer group vanished" in consumer.output


def test_a_destroyed_group_no_consumer_recreates_is_recreated_at_0_by_the_reclaimer(services, r) -> None:
    """Consumers scaled to zero (KEDA waits for a lag a missing group cannot show): replaying beats
    losing what the group had not delivered yet."""
    ids = _add(r, 5)
    reclaimer = services.start("reclaimer", name="reclaimer", ACTIVE_CONSUMER_IDLE_MS=1000, **FAST_RECLAIM)
    wait_for(lambda: r.xinfo_groups(STREAM), timeout=30, what="the group")
    r.xgroup_destroy(STREAM, GROUP)
    wait_for(lambda: "waiting for a consumer to recreate it" in reclaimer.output, timeout=30, what="waiting")
    wait_for(lambda: r.xinfo_groups(STREAM), timeout=30, what="the group recreated")
    assert "no consumer recreated it; recreated it at 0" in reclaimer.output
    services.start("consumer", name="c1", HANDLER="support.handlers:record")
    wait_for(lambda: set(ids) <= set(ledger(r).done), timeout=30, what="everything handled")


def test_group_start_id_dollar_skips_what_was_added_before_the_group_existed(services, r) -> None:
    before = _add(r, 5)
    consumer = services.start("consumer", name="c1", metrics=True, HANDLER="support.handlers:record",
                              GROUP_START_ID="$")  # fmt: skip
    wait_for(lambda: r.exists(STREAM) and r.xinfo_groups(STREAM), timeout=30, what="the group")
    after = _add(r, 5, first_serial=5)
    wait_for(lambda: set(after) <= set(ledger(r).done), timeout=30, what="new entries handled")
    assert not set(before) & set(ledger(r).done)
    assert consumer.stop() == 0


# Item 16: entries deleted while pending, and the acknowledged counter.


def test_entries_deleted_while_pending_are_noted_in_the_dead_letter_stream(services, r) -> None:
    ids = _add(r, 5)
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "gone", {STREAM: ">"}, count=5)
    r.xdel(STREAM, ids[1], ids[3])
    services.start("reclaimer", name="reclaimer", HANDLER="support.handlers:record", **FAST_RECLAIM)
    wait_for(lambda: r.xpending(STREAM, GROUP)["pending"] == 0, timeout=30, what="everything settled")
    dead = _dead(r)
    assert sorted(fields["x-streamgroup-original-id"] for fields in dead) == [ids[1], ids[3]]
    assert all(fields["x-streamgroup-error"] == "deleted while pending" for fields in dead)
    assert all("serial" not in fields for fields in dead), "the fields are gone; the metadata is what is left"
    assert set(ledger(r).done) == {ids[0], ids[2], ids[4]}


def test_acknowledged_counts_what_redis_acknowledged_and_does_not_wait_for_a_blocking_read(services, r) -> None:
    consumer = services.start("consumer", name="c1", metrics=True, HANDLER="support.fault_handlers:slow_then_block",
                              TESTHANDLER_BLOCK_SERIAL=1, BLOCK_MS=60_000)  # fmt: skip
    acked = ("streamgroup_messages_processed_total", {**LABELS, "outcome": "acked"})
    latencies = ("streamgroup_end_to_end_latency_seconds_count", LABELS)
    wait_for(lambda: consumer.metric(acked[0], **acked[1]) == 0, timeout=30, what="the counter")
    _add(r, 1)
    wait_for(lambda: consumer.metric(acked[0], **acked[1]) == 1, timeout=30,
             what="the acknowledgement counted while the consumer waits in a blocking read")  # fmt: skip
    [second] = _add(r, 1, first_serial=1)
    wait_for(lambda: r.exists(f"calls:{second}"), timeout=30, what="the handler on the second message")
    assert r.xack(STREAM, GROUP, second) == 1, "someone else acknowledges it meanwhile"
    r.set("release", 1)
    wait_for(lambda: consumer.metric(latencies[0], **latencies[1]) == 2, timeout=30, what="its XACK answered")
    assert consumer.metric(acked[0], **acked[1]) == 1, "Redis acknowledged nothing the second time"


# (A stream name with a `}` and no hash tag, such as `a{}b`, cannot be wrapped in a tag: see keys.slot_prefix.)
@pytest.mark.parametrize("stream", ["messageStream", "{orders}.jobs", "jobs{eu}:x", "a{b"])
def test_the_name_lease_key_hashes_to_the_stream_slot(stream: str) -> None:
    """So that a Redis Cluster can serve the stream and its consumers' leases from one node."""
    lease_key = StreamKeys(stream, "g", f"{stream}:dead").consumer_name_lease("pod-1")
    assert key_slot(lease_key.encode()) == key_slot(stream.encode())
    assert lease_key.endswith(":g:consumer:pod-1")


def test_the_name_lease_is_taken_renewed_and_given_back_while_redis_is_out_of_memory(redis_url, r) -> None:
    """A consumer can read and acknowledge under maxmemory (noeviction), so its name must not wait
    for room: the lease scripts run with the allow-oom flag (a plain EVAL that writes is refused)."""
    keys = StreamKeys(STREAM, GROUP, f"{STREAM}:dead")

    async def under_oom() -> tuple:
        client = create_client(Settings(redis_url=redis_url))
        first, second = (NameLease(client, keys, "pod-1", 60_000) for _ in range(2))
        try:
            with faults.out_of_memory(r):
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    r.set("any-write", "x")  # Redis is full indeed
                taken = await first.take()
                refused = await second.take()
                renewed = await first.take()
                released = await first.release()  # expires the key in 1 ms
                for _ in range(300):
                    if (taken_over := await second.take()) is None:
                        break
                    await asyncio.sleep(0.01)
            return taken, refused, renewed, released, taken_over, second.instance
        finally:
            await client.aclose()

    taken, refused, renewed, released, taken_over, successor = asyncio.run(under_oom())
    assert taken is None and renewed is None and released and taken_over is None
    assert refused is not None, "the twin was refused"
    assert r.get(keys.consumer_name_lease("pod-1")) == successor
