"""Sharded streams end to end (STREAMGROUP_SHARDS): producer, three consumers and the reclaimer on
real processes; every message handled or dead-lettered exactly as on one stream, poison messages
in their own shard's dead-letter stream, each partition value's messages in order in one shard,
and the reclaimer's shard-labelled gauges equal to what XINFO says of each shard.

`run_end_to_end` takes the URL the services use and a client for the data, so the same check runs
on one server (N shards are N keys there) and on a Redis Cluster (tests/cluster)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

import pytest
import redis

from streamgroup import acl
from streamgroup.keys import read_shards, shard_keys, shard_of, written_shards
from streamgroup.message import Message
from streamgroup.processing import HandlerRunner, Results
from streamgroup.settings import Settings
from support.processes import Services, service_env, wait_for

STREAM, GROUP = "messageStream", "messageGroup"
PRODUCERS = 5
MESSAGES = 300  # 60 serials per producer
POISON_EVERY = 7  # serials 7, 14, ... of every producer are poison


def _books(books: redis.Redis) -> list[tuple[str, str, str, int, int]]:
    rows = []
    for row in books.lrange("done-sharded", 0, -1):
        consumer, stream, entry_id, producer, serial = row.split(" ")
        rows.append((consumer, stream, entry_id, int(producer), int(serial)))
    return rows


def _settled(data: redis.Redis, shards: int) -> bool:
    """Every message delivered and none pending, in every shard."""
    read = 0
    for keys in shard_keys(STREAM, GROUP, shards):
        if not data.exists(keys.stream):
            return False
        groups = [g for g in data.xinfo_groups(keys.stream) if g["name"] == GROUP]
        if not groups or groups[0]["pending"] or groups[0]["lag"]:
            return False
        read += groups[0]["entries-read"] or 0
    return read == MESSAGES


def _gauges_match(reclaimer, data: redis.Redis, shards: int) -> bool:
    for keys in shard_keys(STREAM, GROUP, shards):
        info = next(g for g in data.xinfo_groups(keys.stream) if g["name"] == GROUP)
        labels = {"stream": STREAM, "shard": keys.shard}
        expected = {
            "streamgroup_stream_length": data.xlen(keys.stream),
            "streamgroup_dead_letter_length": data.xlen(keys.dead_letter),
            "streamgroup_group_lag": info["lag"],
            "streamgroup_group_pending": data.xpending(keys.stream, GROUP)["pending"],
        }
        for name, value in expected.items():
            if reclaimer.metric(name, **labels) != value:
                return False
    return True


def run_end_to_end(services: Services, data: redis.Redis, books: redis.Redis, shards: int, **extra: object) -> None:
    settings = {"SHARDS": shards, **extra}
    reclaimer = services.start(
        "reclaimer", name="reclaimer", metrics=True, HANDLER="support.handlers:record_sharded",
        TESTHANDLER_FAIL_MOD=POISON_EVERY, CLAIM_MIN_IDLE_MS=2000, RECLAIM_INTERVAL_MS=300, **settings,
    )  # fmt: skip
    consumers = [
        services.start(
            "consumer",
            name=f"consumer-{i}",
            metrics=True,
            HANDLER="support.handlers:record_sharded",
            TESTHANDLER_FAIL_MOD=POISON_EVERY,
            BATCH_SIZE=10,
            MAX_DELIVERIES=1,
            **settings,
        )  # fmt: skip
        for i in range(3)
    ]
    producer = services.start(
        "producer", PRODUCERS=PRODUCERS, PRODUCER_INTERVAL_MS=5, MAX_MESSAGES=MESSAGES,
        PARTITION_FIELD="producer", LOG_LEVEL="WARNING", **settings,
    )  # fmt: skip
    assert producer.wait(60) == 0, producer.output
    wait_for(lambda: _settled(data, shards), timeout=90, what="every message delivered and settled")

    layout = shard_keys(STREAM, GROUP, shards)
    if shards == 1:
        assert layout[0].stream == STREAM and layout[0].dead_letter == f"{STREAM}:dead", "one shard: today's keys"
    produced: dict[tuple[str, str], tuple[int, int]] = {}
    for keys in layout:
        serials_by_producer: dict[int, list[int]] = defaultdict(list)
        for entry_id, fields in data.xrange(keys.stream):
            producer_no, serial = int(fields["producer"]), int(fields["serial"])
            produced[(keys.stream, entry_id)] = (producer_no, serial)
            serials_by_producer[producer_no].append(serial)
            assert shard_of(str(producer_no), shards) == int(keys.shard), "the partition value picks the shard"
        for producer_no, serials in serials_by_producer.items():
            assert serials == sorted(serials), f"producer {producer_no}'s messages out of order in {keys.stream}"
    assert len(produced) == MESSAGES
    assert sorted(produced.values()) == [(p, s) for p in range(1, PRODUCERS + 1) for s in range(1, 61)]
    if shards > 1:
        assert sum(1 for keys in layout if data.xlen(keys.stream)) == len(
            {shard_of(str(p), shards) for p in range(1, 6)}
        )

    done = Counter((stream, entry_id) for _, stream, entry_id, _, _ in _books(books))
    assert all(count == 1 for count in done.values()), "without failures nothing is handled twice"
    poison = {key for key, (_, serial) in produced.items() if serial % POISON_EVERY == 0}
    assert set(done) == set(produced) - poison, "every message but the poison ones handled"
    dead: set[tuple[str, str]] = set()
    for keys in layout:
        for _, fields in data.xrange(keys.dead_letter):
            source = fields["x-streamgroup-stream"]
            assert source == keys.stream, "dead-lettered in its own shard's dead-letter stream"
            dead.add((source, fields["x-streamgroup-original-id"]))
    assert dead == poison
    assert {consumer for consumer, *_ in _books(books)} == {"consumer-0", "consumer-1", "consumer-2"}

    # A backlog the stopped consumers leave: the reclaimer's gauges show each shard as XINFO does.
    for consumer in consumers:
        assert consumer.stop() == 0, consumer.output
    for keys in layout:  # holding nothing, each left every shard's group at its stop
        members = {c["name"] for c in data.xinfo_consumers(keys.stream, GROUP)}
        assert not members & {"consumer-0", "consumer-1", "consumer-2"}, (keys.stream, members)
    more = services.start(
        "producer", PRODUCERS=PRODUCERS, PRODUCER_INTERVAL_MS=5, MAX_MESSAGES=40, LOG_LEVEL="WARNING", **settings
    )
    assert more.wait(60) == 0, more.output
    wait_for(lambda: _gauges_match(reclaimer, data, shards), timeout=30, what="gauges equal to XINFO per shard")
    if shards > 1:  # round-robin without a partition field: every shard got some
        assert all(reclaimer.metric("streamgroup_group_lag", shard=keys.shard) > 0 for keys in layout)
    assert reclaimer.stop() == 0, reclaimer.output


@pytest.mark.parametrize("shards", [1, 6])
def test_end_to_end(services: Services, r: redis.Redis, shards: int) -> None:
    run_end_to_end(services, r, r, shards)


def test_every_shard_series_exists_from_the_start(services: Services) -> None:
    reclaimer = services.start("reclaimer", name="reclaimer", metrics=True, SHARDS=4)
    wait_for(
        lambda: all(reclaimer.metric("streamgroup_group_pending", shard=str(i)) == 0 for i in range(4)),
        timeout=15,
        what="a pending gauge per shard",
    )
    consumer = services.start("consumer", name="c", metrics=True, SHARDS=4)
    for i in range(4):
        assert consumer.metric("streamgroup_messages_processed_total", shard=str(i), outcome="acked") == 0
    assert consumer.metric("streamgroup_messages_processed_total", shard="4", outcome="acked") is None


def test_a_partition_field_the_producer_does_not_write_is_refused(services: Services) -> None:
    producer = services.start("producer", SHARDS=2, PARTITION_FIELD="customer")
    assert producer.wait(30) == 2
    assert "STREAMGROUP_PARTITION_FIELD" in producer.output


def _cli(redis_url: str, *args: str, **settings: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgroup", *args],
        env=service_env(redis_url, **settings), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _dead_letter(r: redis.Redis, keys, entry_id: str, original_id: str, **fields: str) -> None:
    bookkeeping = {"x-streamgroup-original-id": original_id, "x-streamgroup-stream": keys.stream,
                   "x-streamgroup-error": "PoisonMessage: no"}  # fmt: skip
    r.xadd(keys.dead_letter, {**fields, **bookkeeping}, id=entry_id)


def test_status_shows_every_shard_and_the_whole(redis_url: str, r: redis.Redis) -> None:
    layout = shard_keys(STREAM, GROUP, 3)
    for i, keys in enumerate(layout):
        for n in range(4 + i):
            r.xadd(keys.stream, {"n": str(n)})
        r.xgroup_create(keys.stream, GROUP, id="0")
    r.xreadgroup(GROUP, "alpha", {layout[0].stream: ">"}, count=2)
    r.xreadgroup(GROUP, "alpha", {layout[2].stream: ">"}, count=3)
    r.xreadgroup(GROUP, "beta", {layout[2].stream: ">"}, count=1)
    _dead_letter(r, layout[1], "1-1", "1-0", order="7")

    result = _cli(redis_url, "status", "--json", SHARDS=3)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert [s["stream"] for s in status["shards"]] == [keys.stream for keys in layout]
    for shard, keys in zip(status["shards"], layout, strict=True):
        info = next(g for g in r.xinfo_groups(keys.stream) if g["name"] == GROUP)
        assert (shard["lag"], shard["pending"], shard["stream_length"]) == (
            info["lag"],
            info["pending"],
            r.xlen(keys.stream),
        )
    assert status["stream"] == STREAM
    assert (status["stream_length"], status["lag"], status["pending"]) == (4 + 5 + 6, 2 + 5 + 2, 6)
    assert status["dead_letter_length"] == 1
    assert status["oldest_pending_age_seconds"] == max(s["oldest_pending_age_seconds"] or 0 for s in status["shards"])
    assert {c["name"]: c["pending"] for c in status["consumers"]} == {"alpha": 5, "beta": 1}

    table = _cli(redis_url, "status", SHARDS=3)
    assert table.returncode == 0, table.stderr
    assert f"stream            {STREAM} (3 shards)" in table.stdout
    assert "pending           6" in table.stdout
    for keys in layout:
        assert any(line.split()[:2] == [keys.shard, keys.stream] for line in table.stdout.splitlines()), table.stdout

    r.delete(layout[1].stream)
    missing = _cli(redis_url, "status", SHARDS=3)
    assert missing.returncode == 5
    assert f"stream '{layout[1].stream}' does not exist" in missing.stderr


def test_dead_letters_of_every_shard_replayed_each_into_its_own_shard(redis_url: str, r: redis.Redis) -> None:
    layout = shard_keys(STREAM, GROUP, 3)
    _dead_letter(r, layout[0], "5-0", "1-0", order="a")
    _dead_letter(r, layout[2], "5-0", "1-0", order="c")  # the same id in another shard's dead-letter stream
    _dead_letter(r, layout[2], "6-0", "2-0", order="d")

    listing = _cli(redis_url, "dead-letters", "list", "--json", SHARDS=3)
    assert listing.returncode == 0, listing.stderr
    assert sorted((e["shard"], e["id"]) for e in json.loads(listing.stdout)) == [
        ("0", "5-0"),
        ("2", "5-0"),
        ("2", "6-0"),
    ]

    ambiguous = _cli(redis_url, "dead-letters", "show", "5-0", SHARDS=3)
    assert ambiguous.returncode == 2 and "--shard" in ambiguous.stderr
    shown = _cli(redis_url, "dead-letters", "show", "5-0", "--shard", "2", SHARDS=3)
    assert shown.returncode == 0, shown.stderr
    assert "order             c" in shown.stdout
    assert _cli(redis_url, "dead-letters", "purge", "5-0", "--yes", SHARDS=3).returncode == 2, "ambiguous: nothing done"
    assert r.xlen(layout[0].dead_letter) == 1

    replay = _cli(redis_url, "dead-letters", "replay", "--all", "--yes", SHARDS=3)
    assert replay.returncode == 0, replay.stderr
    assert [fields["order"] for _, fields in r.xrange(layout[0].stream)] == ["a"]
    assert not r.exists(layout[1].stream)
    assert [fields["order"] for _, fields in r.xrange(layout[2].stream)] == ["c", "d"]
    assert all(r.xlen(keys.dead_letter) == 0 for keys in layout)

    _dead_letter(r, layout[1], "7-0", "3-0", order="b")
    purge = _cli(redis_url, "dead-letters", "purge", "--all", "--yes", SHARDS=3)
    assert purge.returncode == 0, purge.stderr
    assert r.xlen(layout[1].dead_letter) == 0


def _all_keys(*layouts: int) -> list:
    seen: dict[str, object] = {}
    for shards in layouts:
        for keys in shard_keys(STREAM, GROUP, shards):
            seen.setdefault(keys.stream, keys)
    return list(seen.values())


def _drained(data: redis.Redis, layout: list) -> bool:
    for keys in layout:
        if not data.exists(keys.stream):
            continue
        groups = [g for g in data.xinfo_groups(keys.stream) if g["name"] == GROUP]
        if not groups or groups[0]["pending"] or groups[0]["lag"]:
            return False
    return True


@pytest.mark.parametrize(("old", "new"), [(2, 3), (2, 1)], ids=["2-to-3", "2-to-1"])
def test_changing_the_number_of_shards_while_messages_flow_loses_nothing(
    services: Services, r: redis.Redis, old: int, new: int
) -> None:
    """The procedure of docs/reliability.md: consumers and the reclaimer first (new SHARDS, and
    PREVIOUS_SHARDS=old so the old layout is drained), then the producer; every message of both
    layouts handled exactly once."""
    handler = {"HANDLER": "support.handlers:record_sharded", "BATCH_SIZE": 10}
    reclaimer = services.start("reclaimer", name="reclaimer-old", SHARDS=old, CLAIM_MIN_IDLE_MS=2000, **handler)
    before = services.start("consumer", name="consumer-old", SHARDS=old, **handler)
    producing = {"PRODUCERS": 3, "PRODUCER_INTERVAL_MS": 20, "PARTITION_FIELD": "producer", "LOG_LEVEL": "WARNING"}
    first = services.start("producer", SHARDS=old, MAX_MESSAGES=100_000, **producing)
    wait_for(lambda: len(_books(r)) >= 60, timeout=60, what="work under the old layout")

    during = {"SHARDS": new, "PREVIOUS_SHARDS": old, "CLAIM_MIN_IDLE_MS": 2000, **handler}
    after = services.start("consumer", name="consumer-new", **during)
    assert before.stop() == 0, before.output
    assert reclaimer.stop() == 0, reclaimer.output
    reclaimer = services.start("reclaimer", name="reclaimer-new", **during)
    wait_for(lambda: len(_books(r)) >= 120, timeout=60, what="the old layout read by the new consumer")
    assert first.stop() == 0, first.output
    second = services.start("producer", SHARDS=new, MAX_MESSAGES=150, **producing)
    assert second.wait(60) == 0, second.output

    layout = _all_keys(old, new)
    wait_for(lambda: _drained(r, layout), timeout=60, what="both layouts drained")
    produced = {(keys.stream, entry_id) for keys in layout for entry_id, _ in r.xrange(keys.stream)}
    done = Counter((stream, entry_id) for _, stream, entry_id, _, _ in _books(r))
    assert set(done) == produced, "every message of both layouts handled"
    assert all(count == 1 for count in done.values()), "and none twice"
    new_keys = {keys.stream for keys in shard_keys(STREAM, GROUP, new)}
    assert any(stream in new_keys and stream not in {k.stream for k in shard_keys(STREAM, GROUP, old)}
               for stream, _ in produced) or new < old, "the new layout was written to"  # fmt: skip
    old_only = [keys for keys in shard_keys(STREAM, GROUP, old) if keys.stream not in new_keys]
    assert all(r.xlen(keys.stream) for keys in old_only), "old-only shards held messages, all handled"
    assert {consumer for consumer, stream, *_ in _books(r) if stream in {k.stream for k in old_only}} >= {
        "consumer-new"
    } or not old_only, "the new consumer drained the old layout"
    assert after.stop() == 0, after.output
    assert reclaimer.stop() == 0, reclaimer.output


def test_a_failing_shard_stops_the_others_reads_and_all_carry_on(services: Services, r: redis.Redis) -> None:
    """One shard's group destroyed under a running consumer: that shard's reader fails (NOGROUP),
    the others finish their batch and stop, the service reconnects and runs every shard again (the
    lost group recreated after the last entry read there). Nothing is lost, the process stays up."""
    layout = shard_keys(STREAM, GROUP, 3)
    consumer = services.start(
        "consumer", name="consumer-0", HANDLER="support.handlers:record_sharded", BATCH_SIZE=5, SHARDS=3
    )
    producer = services.start(
        "producer", PRODUCERS=3, PRODUCER_INTERVAL_MS=20, MAX_MESSAGES=450, SHARDS=3, LOG_LEVEL="WARNING"
    )
    wait_for(lambda: len(_books(r)) >= 100, timeout=60, what="work on every shard")
    r.xgroup_destroy(layout[1].stream, GROUP)
    assert producer.wait(60) == 0, producer.output

    def everything_handled() -> bool:
        produced = {(keys.stream, entry_id) for keys in layout for entry_id, _ in r.xrange(keys.stream)}
        return len(produced) == 450 and produced <= {(stream, entry_id) for _, stream, entry_id, _, _ in _books(r)}

    wait_for(everything_handled, timeout=90, what="every message of every shard handled")
    assert consumer.alive(), consumer.output
    assert "the consumer group vanished" in consumer.output
    assert '"kind": "nogroup"' in consumer.output, "the failure was waited out as an outage"
    assert consumer.stop() == 0, consumer.output


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_concurrency_bounds_the_process_over_every_shards_batches(kind: str) -> None:
    """A consumer handles one batch per shard at once through one runner: the handler calls in
    flight stay within STREAMGROUP_CONCURRENCY over all of them."""
    in_flight, most = 0, 0
    lock = threading.Lock()

    def enter() -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)

    def leave() -> None:
        nonlocal in_flight
        with lock:
            in_flight -= 1

    async def async_handler(message: Message) -> None:
        enter()
        await asyncio.sleep(0.01)
        leave()

    def sync_handler(message: Message) -> None:
        enter()
        time.sleep(0.01)
        leave()

    runner = HandlerRunner(async_handler if kind == "async" else sync_handler, concurrency=2)

    async def main() -> list[Results]:
        batches = [[Message(f"{i}-{n}", {"n": str(n)}, f"{{s:{i}}}") for n in range(10)] for i in range(4)]
        results = [Results() for _ in batches]
        await asyncio.gather(*(runner.run(batch, result) for batch, result in zip(batches, results, strict=True)))
        return results

    results = asyncio.run(main())
    runner.close()
    assert [len(result.succeeded) for result in results] == [10] * 4
    assert most == 2, f"{most} handler calls at once with CONCURRENCY=2"


@pytest.mark.parametrize(("shards", "previous"), [(1, 0), (4, 0), (2, 1), (1, 3), (3, 2)])
def test_every_rule_names_exactly_the_keys_its_service_uses(shards: int, previous: int) -> None:
    """The ACL rules follow streamgroup.keys: every shard read (the old layout too while the number
    changes) and nothing else; the producer only the shards it writes."""
    settings = Settings(shards=shards, previous_shards=previous)
    read, written = read_shards(settings), written_shards(settings)

    def patterns(service: str) -> set[str]:
        rule = acl.rule(service, shards=shards, previous_shards=previous)
        return {part.lstrip("%RW~") for part in rule if part.startswith(("~", "%R~"))}

    streams = {keys.stream for keys in read} | {keys.dead_letter for keys in read}
    assert patterns("consumer") == streams | {"{messageStream}:*:consumer:*"}
    assert patterns("reclaimer") == patterns("status") == patterns("dead-letters") == streams
    markers = {f"{keys.stream if shards > 1 else '{messageStream}'}:producer-run:*" for keys in written}
    assert patterns("producer") == {keys.stream for keys in written} | markers, "never the old layout"
