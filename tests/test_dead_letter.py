"""Dead-lettering moves an entry only while the caller owns it, exactly once, with its fields exactly
as sent; and nothing that goes wrong while dead-lettering takes the batch's successes with it.
In process, against the real servers."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamgroup import PoisonMessage, acl, streams
from streamgroup.keys import StreamKeys
from streamgroup.message import RawEntry
from streamgroup.metrics import Metrics
from streamgroup.processing import HandlerRunner, MessageWorker
from streamgroup.scripts import SCRIPT_MAX_FIELDS, Scripts
from streamgroup.settings import Settings
from support.accounting import GROUP, STREAM

DEAD = f"{STREAM}:dead"
WIDE = SCRIPT_MAX_FIELDS  # fields (and as many values): twice the script's limit of items


def _raw_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _raw_range(client: redis.Redis, key: str) -> list[tuple[bytes, list[bytes]]]:
    """XRANGE as Redis sent it: redis-py's reply callback would make a dict of each entry's fields."""
    connection = client.connection_pool.get_connection()
    try:
        connection.send_command("XRANGE", key, "-", "+")
        return [(entry_id, list(flat)) for entry_id, flat in connection.read_response()]
    finally:
        client.connection_pool.release(connection)


def _keys() -> StreamKeys:
    return StreamKeys(STREAM, GROUP, DEAD)


def _read(client: redis.Redis, consumer: str, count: int = 100) -> list:
    reply = client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count)
    return streams.entries_of(reply) if reply else []


def _owner(client: redis.Redis, entry_id: str) -> str | None:
    rows = client.xpending_range(STREAM, GROUP, min=entry_id, max=entry_id, count=1)
    return rows[0]["consumer"].decode() if rows else None


def _fields_of(flat_width: int) -> dict[str, str]:
    return {f"f{n}": str(n) for n in range(flat_width)}


def _dead_letter_pairs(entry_id: str, flat: list[bytes], consumer: str) -> list:
    return [(entry_id, streams.dead_letter_fields(RawEntry(entry_id, flat, 1), _keys(), consumer, "PoisonMessage: x"))]


async def _race(url: str, entry_id: str, flat: list[bytes]) -> tuple[set[str], set[str]]:
    async with aioredis.Redis.from_url(url) as a, aioredis.Redis.from_url(url) as b:
        return tuple(
            await asyncio.gather(
                Scripts(a, _keys()).dead_letter("owner", _dead_letter_pairs(entry_id, flat, "owner")),
                Scripts(b, _keys()).dead_letter("other", _dead_letter_pairs(entry_id, flat, "other")),
            )
        )


@pytest.mark.parametrize("width", [2, WIDE], ids=["script", "wide"])
def test_two_callers_racing_to_dead_letter_one_entry_leave_exactly_one_copy(redis_url, width) -> None:
    client = _raw_client(redis_url)
    entry_id = client.xadd(STREAM, _fields_of(width)).decode()
    client.xgroup_create(STREAM, GROUP, id="0")
    [(_, flat)] = _read(client, "owner")
    flat = [part for pair in flat.items() for part in pair] if isinstance(flat, dict) else flat
    owner_moved, other_moved = asyncio.run(_race(redis_url, entry_id, flat))
    assert (owner_moved, other_moved) == ({entry_id}, set()), "only the owner moves it"
    copies = _raw_range(client, DEAD)
    assert len(copies) == 1
    assert copies[0][1][: 2 * width] == flat
    assert client.xpending(STREAM, GROUP)["pending"] == 0


@pytest.mark.parametrize("width", [2, WIDE], ids=["script", "wide"])
def test_dead_lettering_sent_again_after_a_lost_reply_moves_nothing_more(redis_url, width) -> None:
    client = _raw_client(redis_url)
    entry_id = client.xadd(STREAM, _fields_of(width)).decode()
    client.xgroup_create(STREAM, GROUP, id="0")
    [(_, fields)] = _read(client, "owner")
    flat = [part for pair in fields.items() for part in pair]

    async def twice() -> list[set[str]]:
        async with aioredis.Redis.from_url(redis_url) as a:
            scripts = Scripts(a, _keys())
            pairs = _dead_letter_pairs(entry_id, flat, "owner")
            return [await scripts.dead_letter("owner", pairs), await scripts.dead_letter("owner", pairs)]

    assert asyncio.run(twice()) == [{entry_id}, set()]
    assert len(_raw_range(client, DEAD)) == 1


def _as_service_user(redis_url: str, service: str | None) -> str:
    """The URL of a user holding exactly the service's ACL rule (None: the unrestricted default user)."""
    if service is None:
        return redis_url
    with _raw_client(redis_url) as admin:
        setinfo = acl.server_knows_client_setinfo(admin.info("server"))
        admin.execute_command(*acl.setuser_args(service, "sg", "pw", client_setinfo=setinfo))
    return redis_url.replace("redis://", "redis://sg:pw@", 1)


@pytest.mark.parametrize("user", [None, "consumer", "reclaimer"])
def test_a_wide_copy_whose_entry_another_consumer_claimed_is_removed_again(redis_url, user) -> None:
    client = _raw_client(redis_url)
    entry_id = client.xadd(STREAM, _fields_of(WIDE)).decode()
    client.xgroup_create(STREAM, GROUP, id="0")
    [(_, fields)] = _read(client, "owner")
    client.xclaim(STREAM, GROUP, "reclaimer", 0, [entry_id], justid=True)
    flat = [part for pair in fields.items() for part in pair]

    async def move() -> set[str]:
        async with aioredis.Redis.from_url(_as_service_user(redis_url, user)) as a:
            return await Scripts(a, _keys()).dead_letter("owner", _dead_letter_pairs(entry_id, flat, "owner"))

    assert asyncio.run(move()) == set(), "within the service's ACL rule"
    assert _raw_range(client, DEAD) == []
    assert _owner(client, entry_id) == "reclaimer"


def _worker(client: aioredis.Redis, handler, consumer: str = "c1", **settings) -> tuple[MessageWorker, Metrics]:
    metrics = Metrics(STREAM, GROUP)
    config = Settings(**{"max_deliveries": 3, **settings})
    return MessageWorker(client, _keys(), consumer, HandlerRunner(handler, 1), config, metrics), metrics


def _raw_read(url: str, consumer: str) -> list:
    client = _raw_client(url)
    connection = client.connection_pool.get_connection()
    try:
        connection.send_command("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", 100, "STREAMS", STREAM, ">")
        reply = connection.read_response()
    finally:
        client.connection_pool.release(connection)
    return streams.entries_of(reply)


def test_repeated_field_names_and_bytes_survive_exactly_in_the_dead_letter_copy(redis_url) -> None:
    client = _raw_client(redis_url)
    repeated = [b"item", b"1", b"item", b"2", b"note", b"x"]
    not_text = [b"item", b"\xff\xfe", b"item", b"\x00"]
    client.execute_command("XADD", STREAM, "*", *repeated)
    client.execute_command("XADD", STREAM, "*", *not_text)
    client.xgroup_create(STREAM, GROUP, id="0")
    entries = _raw_read(redis_url, "c1")
    seen = []

    def poison(message) -> None:
        seen.append(message.flat_fields)
        raise PoisonMessage("no")

    async def handle() -> None:
        async with aioredis.Redis.from_url(redis_url) as a:
            worker, _ = _worker(a, poison)
            await worker.handle(entries)

    asyncio.run(handle())
    assert seen == [repeated], "the handler can see the repeated names too"
    copies = {flat[flat.index(b"x-streamgroup-original-id") + 1]: flat for _, flat in _raw_range(client, DEAD)}
    assert [copies[entry_id][:-12] for entry_id, _ in entries] == [repeated, not_text], "exactly as sent"
    assert all(flat[-12] == b"x-streamgroup-original-id" for flat in copies.values())
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_after_a_lost_lease_a_poison_message_is_not_copied_by_its_former_owner(redis_url) -> None:
    client = _raw_client(redis_url)
    entry_id = client.xadd(STREAM, {"k": "v"}).decode()
    client.xgroup_create(STREAM, GROUP, id="0")
    entries = _raw_read(redis_url, "c1")

    def poison_after_takeover(message) -> None:
        client.xclaim(STREAM, GROUP, "reclaimer", 0, [message.id])  # it looked idle: someone took it
        raise PoisonMessage("no")

    async def handle() -> Metrics:
        async with aioredis.Redis.from_url(redis_url) as a:
            worker, metrics = _worker(a, poison_after_takeover)
            await worker.handle(entries)
            return metrics

    metrics = asyncio.run(handle())
    assert _raw_range(client, DEAD) == [], "the new owner settles it"
    assert _owner(client, entry_id) == "reclaimer"
    assert (
        metrics.registry.get_sample_value(
            "streamgroup_messages_dead_lettered_total", {"stream": STREAM, "group": GROUP, "shard": "0"}
        )
        == 0
    )


def test_an_error_while_dead_lettering_keeps_the_batch_successes_acknowledged(redis_url) -> None:
    client = _raw_client(redis_url)
    ids = [client.xadd(STREAM, {"n": str(n)}).decode() for n in range(3)]
    client.xgroup_create(STREAM, GROUP, id="0")
    client.set(DEAD, "not a stream")  # every XADD to it fails: WRONGTYPE
    entries = _raw_read(redis_url, "c1")

    def poison_the_middle(message) -> None:
        if message.id == ids[1]:
            raise PoisonMessage("no")

    async def handle() -> None:
        async with aioredis.Redis.from_url(redis_url) as a:
            worker, _ = _worker(a, poison_the_middle)
            await worker.handle(entries, acknowledge=worker.acknowledge)

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        asyncio.run(handle())
    pending = client.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
    assert [row["message_id"].decode() for row in pending] == [ids[1]], "the two successes were acknowledged"


def test_rejected_entries_are_held_by_the_lease_while_their_batch_runs(redis_url) -> None:
    client = _raw_client(redis_url)
    client.execute_command("XADD", STREAM, "*", b"bad", b"\xff")
    slow_id = client.xadd(STREAM, {"k": "v"}).decode()
    client.xgroup_create(STREAM, GROUP, id="0")
    entries = _raw_read(redis_url, "c1")
    bad_id = entries[0][0].decode()
    slept = 1.5
    idle_seen = []

    def slow(message) -> None:
        time.sleep(slept)
        [row] = client.xpending_range(STREAM, GROUP, min=bad_id, max=bad_id, count=1)
        idle_seen.append(row["time_since_delivered"])

    async def handle() -> None:
        async with aioredis.Redis.from_url(redis_url) as a:
            worker, _ = _worker(a, slow, claim_min_idle_ms=600)  # lease renewed every 200 ms
            await worker.handle(entries, acknowledge=worker.acknowledge)

    asyncio.run(handle())
    assert idle_seen and idle_seen[0] < slept * 1000, "renewed while the batch ran, not left to look idle"
    assert [fields[b"x-streamgroup-original-id"] for _, fields in client.xrange(DEAD)] == [bad_id.encode()]
    assert slow_id not in {row["message_id"].decode() for row in client.xpending_range(STREAM, GROUP, "-", "+", 10)}
