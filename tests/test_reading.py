"""GroupReader against a real server: acknowledgements ride with reads, count only once applied,
and a connection that may still owe a reply is never used again."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streamgroup.connection import create_client
from streamgroup.keys import StreamKeys
from streamgroup.reading import GroupReader
from streamgroup.settings import Settings
from support.processes import wait_for

KEYS = StreamKeys("reading", "g", "reading:dead")


def _setup(r: redis.Redis, count: int) -> list[str]:
    ids = [r.xadd(KEYS.stream, {"n": str(n)}) for n in range(count)]
    r.xgroup_create(KEYS.stream, KEYS.group, id="0")
    return ids


def _pending_ids(r: redis.Redis) -> set[str]:
    return {row["message_id"] for row in r.xpending_range(KEYS.stream, KEYS.group, "-", "+", 50)}


def _run(redis_url: str, scenario) -> None:
    _run_with_client(redis_url, lambda _client, reader, acked: scenario(reader, acked))


def _run_with_client(redis_url: str, scenario) -> None:
    async def main() -> None:
        client = create_client(Settings(redis_url=redis_url))
        acked: list[str] = []
        reader = GroupReader(
            client, KEYS, "c1", 10, lambda ids, _sent_at, _acknowledged: acked.extend(ids), timeout_seconds=5
        )
        try:
            await scenario(client, reader, acked)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_acknowledgements_ride_with_the_next_read(redis_url, r) -> None:
    ids = _setup(r, 25)

    async def scenario(reader: GroupReader, acked: list[str]) -> None:
        await reader.send(">", None)
        first = await reader.receive()
        assert [e[0].decode() for e in first] == ids[:10]
        reader.acknowledge([e[0].decode() for e in first])
        assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 10, "not sent yet"
        await reader.send(">", None)
        assert reader.reads_in_flight == 1
        second = await reader.receive()
        assert [e[0].decode() for e in second] == ids[10:20]
        assert acked == ids[:10]
        assert _pending_ids(r) == set(ids[10:20])

    _run(redis_url, scenario)


def test_a_read_that_failed_sends_its_acknowledgements_again(redis_url, r) -> None:
    ids = _setup(r, 10)

    async def scenario(reader: GroupReader, acked: list[str]) -> None:
        await reader.send(">", None)
        await reader.receive()
        reader.acknowledge(ids[:4])
        await reader.send(">", 5000)  # blocks: nothing new
        r.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(RedisConnectionError):
            await reader.receive()
        # Counted only if the XACK's reply was taken before the connection broke; else sent again.
        assert acked in ([], ids[:4])
        assert reader.reads_in_flight == 0
        await reader.send(">", None)
        assert await reader.receive() == []
        assert acked == ids[:4]
        assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 6

    _run(redis_url, scenario)


def test_an_error_reply_retires_the_connection_and_keeps_the_acknowledgements(redis_url, r) -> None:
    ids = _setup(r, 3)

    async def scenario(reader: GroupReader, acked: list[str]) -> None:
        await reader.send(">", None)
        await reader.receive()
        reader.acknowledge(ids)
        r.xgroup_destroy(KEYS.stream, KEYS.group)
        await reader.send(">", None)
        with pytest.raises(ResponseError, match="NOGROUP"):
            await reader.receive()
        # The XREADGROUP reply behind the failed XACK was never read: a reused connection would
        # hand it to the next read as its answer.
        r.xgroup_create(KEYS.stream, KEYS.group, id="0")
        await reader.send(">", None)
        entries = await reader.receive()
        assert [e[0].decode() for e in entries] == ids
        assert acked == ids, "sent again (ahead of the read, to the new group) this time"
        assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 3, "then read afresh from the new group"

    _run(redis_url, scenario)


def test_close_takes_the_reply_owed_and_returns_what_was_never_sent(redis_url, r) -> None:
    ids = _setup(r, 5)

    async def scenario(reader: GroupReader, acked: list[str]) -> None:
        await reader.send(">", None)
        await reader.receive()
        reader.acknowledge(ids[:2])
        await reader.send(">", None)
        reader.acknowledge(ids[2:])
        assert await reader.close() == ids[2:]
        assert acked == ids[:2]
        assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 3

    _run(redis_url, scenario)


def test_two_reads_in_flight_come_back_in_order_and_a_failure_returns_both_acknowledgements(redis_url, r) -> None:
    ids = _setup(r, 30)

    async def scenario(reader: GroupReader, acked: list[str]) -> None:
        await reader.send(">", None)
        first = await reader.receive()
        reader.acknowledge([e[0].decode() for e in first])
        await reader.send(">", None)
        await reader.send(">", None)
        assert reader.reads_in_flight == 2
        assert [e[0].decode() for e in await reader.receive()] == ids[10:20]
        assert acked == ids[:10], "the first read in flight carried them"
        assert [e[0].decode() for e in await reader.receive()] == ids[20:30]

        reader.acknowledge(ids[10:15])
        await reader.send(">", 5000)
        reader.acknowledge(ids[15:20])
        await reader.send(">", 5000)
        r.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(RedisConnectionError):
            await reader.receive()
        assert reader.reads_in_flight == 0
        await reader.send(">", None)
        assert await reader.receive() == []
        assert acked == ids[:20], "both requests' acknowledgements sent again, in order"

    _run(redis_url, scenario)


# Another task may close the reader's connection under it: redis-py's cluster client closes every
# connection, those in use included, when a command of its own gets CLUSTERDOWN, and the Sentinel
# client does on a failover. A send on it would connect again silently, and the replies it owed
# would never come.


def test_a_connection_closed_under_the_reader_owing_acknowledgements_is_replaced_and_they_go_again(
    redis_url, r
) -> None:
    ids = _setup(r, 25)

    async def scenario(client, reader: GroupReader, acked: list[str]) -> None:
        await reader.send(">", None)
        first = [e[0].decode() for e in await reader.receive()]
        reader.acknowledge(first)
        await reader.flush()  # a bare XACK: its reply is owed
        await client.connection_pool.disconnect(inuse_connections=True)
        await reader.send(">", None)
        assert [e[0].decode() for e in await reader.receive()] == ids[10:20], "this read's own reply"
        assert acked == first, "the acknowledgements whose reply was lost went again with the read"
        assert _pending_ids(r) == set(ids[10:20])

    _run_with_client(redis_url, scenario)


def test_a_connection_closed_under_the_reader_owing_a_read_is_an_outage_and_the_entries_stay_pending(
    redis_url, r
) -> None:
    ids = _setup(r, 25)

    async def scenario(client, reader: GroupReader, acked: list[str]) -> None:
        await reader.send(">", None)
        first = [e[0].decode() for e in await reader.receive()]
        reader.acknowledge(first)
        await reader.send(">", None)  # delivers ids[10:20] to c1; its reply is owed
        wait_for(lambda: _pending_ids(r) == set(ids[10:20]), what="the read applied by Redis")
        await client.connection_pool.disconnect(inuse_connections=True)
        with pytest.raises(RedisConnectionError):
            await reader.send(">", None)
        assert reader.reads_in_flight == 0
        # The next run reads its own pending entries first: nothing delivered is skipped.
        await reader.send("0", None)
        assert [e[0].decode() for e in await reader.receive()] == ids[10:20]
        assert acked == first, "sent again ahead of the history read"

    _run_with_client(redis_url, scenario)
