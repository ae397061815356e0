"""streamgroup.topology through Sentinel (1 primary, 1 replica, 3 sentinels; redis and valkey):
the client finds the primary, runs what the services run, and follows SENTINEL FAILOVER."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.exceptions import RedisError

from streamgroup import streams, topology
from streamgroup.keys import StreamKeys
from streamgroup.scripts import Scripts
from streamgroup.settings import Settings
from support.cluster import FAULT_KINDS, UNDEMOTABLE, DevSentinel
from support.handsent import ids_of, read_command, send_by_hand

KEYS = StreamKeys("orders", "g", "orders:dead")


def _settings(group: DevSentinel) -> Settings:
    return Settings(
        redis_url=group.url,
        redis_sentinels=group.addresses,
        redis_sentinel_master=group.master_name,
        stream=KEYS.stream,
    )


async def _retried(call, errors: list[str]):
    """Retries done by the test loop, as the services' loop does them."""
    for _ in range(600):
        try:
            return await call()
        except (RedisError, OSError) as exc:
            errors.append(type(exc).__name__)
            await asyncio.sleep(0.1)
    raise AssertionError(f"no recovery; errors: {errors[-5:]}")


async def _served_by(client: redis.asyncio.Redis) -> int:
    return int((await client.info("server"))["tcp_port"])


def test_the_client_finds_the_primary_and_follows_a_failover(sentinel_group: DevSentinel) -> None:
    errors: list[str] = []

    async def main() -> None:
        client = await topology.create_client(_settings(sentinel_group))
        connections = topology.KeyConnections(client)
        try:
            assert await _served_by(client) == sentinel_group.primary_port()
            await streams.ensure_group(client, KEYS)
            scripts = Scripts(client, KEYS)
            assert await scripts.add_batch("run1", 1, ["n"], [["1"], ["2"]]) == 2
            first, second = ids_of(await send_by_hand(connections, KEYS.stream, [read_command(KEYS.stream, "g", "c1")]))
            assert await scripts.dead_letter("c1", [(first, [b"n", b"1"])]) == {first}
            await client.wait(1, 5000)

            old, new = await asyncio.get_running_loop().run_in_executor(None, sentinel_group.failover)
            added = await _retried(lambda: client.xadd(KEYS.stream, {"n": "3"}), errors)
            assert await _served_by(client) == new != old
            with redis.Redis(port=new) as primary:
                assert primary.xlen(KEYS.stream) == 3 and primary.xlen(KEYS.dead_letter) == 1
            reply = await _retried(
                lambda: send_by_hand(connections, KEYS.stream, [read_command(KEYS.stream, "g", "c1")]), errors
            )
            assert ids_of(reply) == [added.decode()]
            assert await scripts.release_or_leave("c1", 0) == (2, False)  # second and the new one
            assert second
        finally:
            await client.aclose()

    asyncio.run(main())
    print("errors seen during the failover:", sorted(set(errors)))


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_the_client_leaves_an_old_primary_that_still_takes_writes(kind: str) -> None:
    """Sentinel announces the new primary at once but demotes the old one later (here: never).
    A client that waited for the old primary to refuse writes would write into a server whose
    data is thrown away when it is demoted."""
    with DevSentinel(kind, primary_args=UNDEMOTABLE) as group:

        async def main() -> None:
            client = await topology.create_client(_settings(group))
            try:
                old = await _served_by(client)
                await client.xadd(KEYS.stream, {"n": "0"})
                _, new = await asyncio.get_running_loop().run_in_executor(None, lambda: group.failover(settle=False))
                with redis.Redis(port=old, decode_responses=True) as stale:
                    assert stale.info("replication")["role"] == "master"  # still takes writes
                errors: list[str] = []
                for _ in range(600):
                    with_retries = await _retried(lambda: client.xadd(KEYS.stream, {"n": "1"}), errors)
                    if await _served_by(client) == new:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the client kept writing to the old primary")
                with redis.Redis(port=new) as primary:
                    assert primary.xrange(KEYS.stream, with_retries, with_retries)
            finally:
                await client.aclose()

        asyncio.run(main())


def test_a_blocked_read_moves_to_the_new_primary_after_a_failover(sentinel_group: DevSentinel) -> None:
    """A consumer waiting in XREADGROUP ... BLOCK on the old primary: its connection is closed when
    the sentinels announce the switch (or, on Redis 7.0, the demoted primary answers UNBLOCKED),
    and the read, sent again by the caller's loop, waits on the new primary."""
    errors: list[str] = []

    async def main() -> None:
        client = await topology.create_client(_settings(sentinel_group))
        connections = topology.KeyConnections(client)
        try:
            await streams.ensure_group(client, KEYS)
            blocked_read = (*read_command(KEYS.stream, "g", "c1")[:6], "BLOCK", 60_000, "STREAMS", KEYS.stream, ">")

            async def read_until_served():
                return await _retried(lambda: send_by_hand(connections, KEYS.stream, [blocked_read]), errors)

            read = asyncio.create_task(read_until_served())
            await asyncio.sleep(0.5)
            _, new = await asyncio.get_running_loop().run_in_executor(None, sentinel_group.failover)
            while not errors:
                assert not read.done(), read.result()
                await asyncio.sleep(0.05)
            await asyncio.sleep(1)  # blocked again, on the new primary
            with redis.Redis(port=new) as primary:
                added = primary.xadd(KEYS.stream, {"n": "1"}).decode()
            assert ids_of(await asyncio.wait_for(read, 30)) == [added]
        finally:
            await client.aclose()

    asyncio.run(main())
    print("errors the blocked read saw:", sorted(set(errors)))
