"""streamgroup.topology on a real Redis Cluster (3 primaries, a replica each; redis and valkey):
the client found by auto-detection, the stream commands and scripts the services use, hand-sent
reads on the node of a key that follow MOVED and ASK, resharding under load, a primary killed."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from streamgroup import groupstats, streams, topology
from streamgroup.errors import EXIT_CONFIG, ConfigError
from streamgroup.keys import StreamKeys
from streamgroup.redis_errors import is_outage
from streamgroup.scripts import SCRIPT_MAX_FIELDS, Scripts
from streamgroup.settings import Settings
from support.cluster import FAULT_KINDS, DevCluster, wait_for
from support.handsent import ids_of, read_command, send_by_hand

GROUP = "g"


def _keys(stream: str) -> StreamKeys:
    return StreamKeys(stream, GROUP, f"{stream}:dead")


def _tags_on_every_primary(cluster: DevCluster) -> list[str]:
    """Hash-tagged stream names, one served by each primary."""
    by_owner: dict[int, str] = {}
    n = 0
    while len(by_owner) < len(cluster.primary_ports()):
        name = f"{{s{n}}}"
        by_owner.setdefault(cluster.owner_of(name), name)
        n += 1
    return sorted(by_owner.values())


def _run(coroutine) -> object:
    return asyncio.run(coroutine)


def test_auto_mode_finds_the_cluster_and_stream_commands_reach_every_node(cluster_url, cluster) -> None:
    streams_on_every_node = _tags_on_every_primary(cluster)

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=streams_on_every_node[0]))
        try:
            assert isinstance(client, RedisCluster)
            for name in streams_on_every_node:
                keys = _keys(name)
                assert await streams.ensure_group(client, keys) is True
                ids = [await client.xadd(name, {"n": str(n)}) for n in range(3)]
                reply = await client.xreadgroup(GROUP, "c1", {name: ">"}, count=10)
                assert [entry[0] for entry in reply[0][1]] == ids
                assert await streams.ack(client, keys, [ids[0].decode()]) == 1
                counts = await streams.delivery_counts(client, keys, "c1", [(i, []) for i in ids[1:]])
                assert counts == {ids[1].decode(): 1, ids[2].decode(): 1}
                stats = await groupstats.collect(client, keys)
                assert (stats.stream_length, stats.pending, stats.lag) == (3, 2, 0)
        finally:
            await client.aclose()

    _run(main())


def test_every_script_runs_on_the_node_of_a_hash_tagged_stream(cluster_url, cluster) -> None:
    keys = _keys("{orders}")

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=keys.stream))
        try:
            scripts = Scripts(client, keys)
            await streams.ensure_group(client, keys)
            assert await scripts.add_batch("run1", 1, ["n"], [["1"], ["2"], ["3"]]) == 3
            reply = await client.xreadgroup(GROUP, "c1", {keys.stream: ">"}, count=10)
            ids = [entry[0].decode() for entry in reply[0][1]]
            assert await scripts.renew_lease("c1", ids) == 3
            assert await scripts.dead_letter("c1", [(ids[0], [b"n", b"1", b"why", b"poison"])]) == {ids[0]}
            assert await client.xlen(keys.dead_letter) == 1
            cursor, claimed, deleted = await streams.autoclaim(client, keys, "c1", 0, "0-0", 10)
            assert (claimed, deleted) == (ids[1:], [])
            assert await scripts.release_or_leave("c1", 1000) == (2, False)
            await client.xack(keys.stream, GROUP, *ids[1:])
            assert await scripts.delete_if_idle("c1", 0) is True
            assert await scripts.trim_safely(0) == 3
            # The scripts were loaded on the node serving {orders} only: EVALSHA went there.
            owner = cluster.owner_of(keys.stream)
            with cluster.client(owner) as node:
                assert node.xlen(keys.dead_letter) == 1
        finally:
            await client.aclose()

    _run(main())


def test_group_stats_read_a_stream_and_a_dead_letter_stream_on_different_nodes(cluster_url, cluster) -> None:
    """`status` and the reclaimer pipeline XLEN of both streams: a cluster pipeline splits by node."""
    keys = StreamKeys("plain", GROUP, "plain-dead")
    assert cluster.owner_of(keys.stream) != cluster.owner_of(keys.dead_letter)

    async def main() -> None:
        client = topology.build_client(Settings(redis_url=cluster_url, stream="{x}"), "cluster")
        try:
            await streams.ensure_group(client, keys)
            await client.xadd(keys.stream, {"n": "1"})
            await client.xadd(keys.dead_letter, {"n": "0"})
            await client.xadd(keys.dead_letter, {"n": "0"})
            stats = await groupstats.collect(client, keys)
            assert (stats.stream_length, stats.dead_letter_length, stats.lag) == (1, 2, 1)
        finally:
            await client.aclose()

    _run(main())


def test_a_stream_and_dead_letter_stream_in_different_slots_refuse_to_start(cluster_url) -> None:
    async def main() -> None:
        with pytest.raises(ConfigError) as refused:
            await topology.create_client(Settings(redis_url=cluster_url, stream="orders"))
        assert refused.value.exit_code == EXIT_CONFIG
        [problem] = refused.value.problems
        assert "STREAMGROUP_STREAM 'orders'" in problem and "'orders:dead'" in problem
        assert "STREAMGROUP_STREAM={orders}" in problem
        for fits in (
            Settings(redis_url=cluster_url, stream="{orders}"),
            Settings(redis_url=cluster_url, stream="orders{o}", dead_letter_stream="failed{o}"),
        ):
            client = await topology.create_client(fits)
            await client.aclose()

    _run(main())


def test_a_hand_sent_read_goes_to_the_node_that_serves_the_key(cluster_url, cluster) -> None:
    names = _tags_on_every_primary(cluster)

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=names[0]))
        connections = topology.KeyConnections(client)
        try:
            for name in names:
                await streams.ensure_group(client, _keys(name))
                added = [(await client.xadd(name, {"n": str(n)})).decode() for n in range(2)]
                lease = await connections.acquire(name)
                assert (lease.node.port, lease.asking) == (cluster.owner_of(name), False)
                await connections.release(lease)
                assert ids_of(await send_by_hand(connections, name, [read_command(name, GROUP, "c1")])) == added
                # An XACK riding with the next read, as GroupReader sends it.
                ack = ("XACK", name, GROUP, *added)
                assert ids_of(await send_by_hand(connections, name, [ack, read_command(name, GROUP, "c1", "0")])) == []
        finally:
            await client.aclose()

    _run(main())


def test_a_hand_sent_read_follows_moved_and_ask_while_its_slot_moves(cluster_url, cluster) -> None:
    name = "{moving}"
    slot = cluster.slot_of(name)

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=name))
        connections = topology.KeyConnections(client)
        # A client of its own for the scripts: its redirects must not refresh the readers' slot map.
        script_client = await topology.create_client(Settings(redis_url=cluster_url, stream=name))
        scripts = Scripts(script_client, _keys(name))
        try:
            await streams.ensure_group(client, _keys(name))
            first = (await client.xadd(name, {"n": "0"})).decode()
            source = cluster.owner_of(name)
            target = next(port for port in cluster.primary_ports() if port != source)

            # Mid-migration: the key is on the target already, the slot still belongs to the source.
            cluster.begin_slot_move(slot, target)
            assert cluster.migrate_keys(slot, source, target) == 1
            redirects: list[str] = []
            reply = await send_by_hand(connections, name, [read_command(name, GROUP, "c1")], redirects)
            assert (ids_of(reply), redirects) == ([first], ["AskError"])
            # The producer's batch script declares the stream and its run marker: mid-migration
            # the target answers TRYAGAIN (the marker is on neither node yet) until the slot is
            # assigned, and redis-py gives up with a ClusterError: an outage the producer retries.
            with pytest.raises(Exception) as failed:
                await scripts.add_batch("run1", 1, ["n"], [["1"]])
            assert is_outage(failed.value), repr(failed.value)

            cluster.finish_slot_move(slot, target)
            with cluster.client(target) as node:  # not through the cluster client: its slot map stays stale
                node.xadd(name, {"n": "2"})
            redirects.clear()
            reply = await send_by_hand(connections, name, [read_command(name, GROUP, "c1")], redirects)
            assert len(ids_of(reply)) == 1 and redirects == ["MovedError"]
            lease = await connections.acquire(name)
            assert lease.node.port == target
            await connections.release(lease)
            assert await scripts.add_batch("run1", 1, ["n"], [["1"]]) == 1
        finally:
            await client.aclose()
            await script_client.aclose()

    _run(main())


def test_resharding_under_load_loses_nothing(cluster_url, cluster) -> None:
    name = "{busy}"
    keys = _keys(name)
    done = threading.Event()
    moves: list[tuple[int, int]] = []

    def reshard() -> None:
        try:
            for _ in range(3):  # to another primary, on to the third, and on again
                moves.append(cluster.move_slot_of(name))
        finally:
            done.set()

    async def main() -> tuple[list[str], list[str], list[str]]:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=name))
        connections = topology.KeyConnections(client)
        added: list[str] = []
        handled: list[str] = []
        redirects: list[str] = []
        try:
            await streams.ensure_group(client, keys)
            mover = asyncio.get_running_loop().run_in_executor(None, reshard)
            due: list[str] = []
            while not done.is_set() or len(handled) < len(added):
                if not done.is_set():
                    added += [(await client.xadd(name, {"n": str(len(added) + n)})).decode() for n in range(5)]
                commands = [("XACK", name, GROUP, *due)] if due else []
                reply = await send_by_hand(connections, name, [*commands, read_command(name, GROUP, "c1")], redirects)
                handled += due
                due = ids_of(reply)
                if not due and done.is_set():
                    break
            handled += due
            await client.xack(name, GROUP, *due) if due else None
            await mover
            pending = (await client.xpending(name, GROUP))["pending"]
            assert pending == 0
            assert await client.xlen(name) == len(added)
        finally:
            await client.aclose()
        return added, handled, redirects

    added, handled, redirects = _run(main())
    assert len(moves) == 3
    assert sorted(handled) == sorted(added) and len(handled) == len(set(handled))
    assert redirects, "the moves happened while the reader was reading: it must have been redirected"


def test_the_client_recovers_after_a_primary_is_killed(fresh_cluster: DevCluster) -> None:
    name = "{victim}"
    keys = _keys(name)
    errors: list[str] = []

    async def retried(call):
        """Retries done by the test loop, as the services' loop does them."""
        for _ in range(600):
            try:
                return await call()
            except (RedisError, OSError) as exc:
                errors.append(type(exc).__name__)
                await asyncio.sleep(0.1)
        raise AssertionError(f"no recovery; errors: {errors[-5:]}")

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=fresh_cluster.url, stream=name))
        connections = topology.KeyConnections(client)
        try:
            await streams.ensure_group(client, keys)
            before = [(await client.xadd(name, {"n": "before"})).decode() for _ in range(20)]
            assert await client.execute_command("WAIT", 1, 5000, target_nodes=client.get_node_from_key(name)) == 1
            lease = await connections.acquire(name)  # a connection to the primary about to die
            kill = asyncio.get_running_loop().run_in_executor(None, fresh_cluster.kill_primary_of, name)
            during: list[str] = []
            while not kill.done():  # writes while the primary dies and its replica takes over
                during.append((await retried(lambda: client.xadd(name, {"n": "during"}))).decode())
                await asyncio.sleep(0.01)
            await kill
            with contextlib.suppress(RedisError, OSError):
                await send_by_hand(connections, name, [("PING",)])
            await connections.release(lease, broken=True)
            after = [(await retried(lambda: client.xadd(name, {"n": "after"}))).decode() for _ in range(5)]
            reply = await retried(
                lambda: send_by_hand(connections, name, [read_command(name, GROUP, "c1", count=100_000)])
            )
            read = ids_of(reply)
            assert read[: len(before)] == before  # replicated before the kill: nothing lost
            assert read[-len(after) :] == after
            assert set(read) <= set(before + during + after)
            lost = set(during) - set(read)  # taken by the dead primary, never replicated: lost by Redis
            print(f"written while failing over: {len(during)}, lost to asynchronous replication: {len(lost)}")
            lease = await connections.acquire(name)
            assert lease.node.port == fresh_cluster.owner_of(name)
            await connections.release(lease)
        finally:
            await client.aclose()

    _run(main())
    print("errors seen while the primary was down:", sorted(set(errors)))


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_a_cluster_with_no_node_reachable_raises_an_outage(kind: str) -> None:
    """redis-py raises RedisClusterException, which is not a RedisError, or a ConnectionError on
    the connection it had: the services must count either as an outage, at start and later."""
    with DevCluster(kind, replicas=0) as cluster:

        async def main() -> None:
            settings = Settings(redis_url=cluster.url, stream="{o}")
            client = await topology.create_client(settings)
            try:
                await client.xadd("{o}", {"n": "1"})
                for node in cluster.nodes:
                    node.kill()
                with pytest.raises(Exception) as failed:
                    await client.xlen("{o}")
                assert is_outage(failed.value), repr(failed.value)
            finally:
                await client.aclose()
            fresh = topology.build_client(settings, "cluster")
            try:
                with pytest.raises(topology.CLUSTER_OUTAGES):
                    await fresh.ping()
            finally:
                await fresh.aclose()

        asyncio.run(main())


def test_a_blocked_read_follows_its_slot_when_it_moves_and_when_its_node_fails_over(cluster_url, cluster) -> None:
    """A consumer waits in XREADGROUP ... BLOCK. Redis 7.0 ends that wait with UNBLOCKED when the
    stream is migrated away or its node becomes a replica; Valkey with ASK or MOVED. Either way
    the read goes again to the node now serving the slot and gets what is added there."""
    name = "{blocked}"

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=name))
        connections = topology.KeyConnections(client)
        try:
            await streams.ensure_group(client, _keys(name))
            for disturb in (
                lambda: cluster.move_slot_of(name),
                lambda: _manual_failover(cluster, cluster.owner_of(name)),
            ):
                redirects: list[str] = []
                blocked_read = (*read_command(name, GROUP, "c1")[:6], "BLOCK", 60_000, "STREAMS", name, ">")
                read = asyncio.create_task(send_by_hand(connections, name, [blocked_read], redirects))
                await asyncio.sleep(0.5)  # sent and blocked
                await asyncio.get_running_loop().run_in_executor(None, disturb)
                while not redirects:
                    assert not read.done(), read.result()
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # blocked again, on the new node
                added = (await client.xadd(name, {"n": "1"})).decode()
                assert ids_of(await asyncio.wait_for(read, 30)) == [added]
                assert set(redirects) <= {"UNBLOCKED", "AskError", "MovedError"}
        finally:
            await client.aclose()

    _run(main())


def _manual_failover(cluster: DevCluster, primary: int) -> None:
    """CLUSTER FAILOVER on the primary's replica: a coordinated switch that loses nothing."""
    replica = cluster.replicas_of(primary)[0]
    with cluster.client(replica) as client:
        client.execute_command("CLUSTER", "FAILOVER")
    wait_for(lambda: cluster.primary_ports().count(replica) == 1, "the replica to take over")
    cluster.wait_healthy()


def test_an_entry_too_wide_for_a_script_is_dead_lettered_on_a_cluster(cluster_url, cluster) -> None:
    """The wide path (XADD + check script in one MULTI/EXEC) on the stream's node: a cluster
    pipeline refuses `evalsha` by name, so the script goes as a plain EVALSHA command."""
    keys = _keys("{wide}")

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=keys.stream))
        try:
            await streams.ensure_group(client, keys)
            fields = {f"f{n}": "v" for n in range(SCRIPT_MAX_FIELDS)}
            entry_id = (await client.xadd(keys.stream, fields)).decode()
            await client.xreadgroup(GROUP, "c1", {keys.stream: ">"})
            flat = [part for pair in fields.items() for part in pair] + ["x-streamgroup-original-id", entry_id]
            assert await Scripts(client, keys).dead_letter("c1", [(entry_id, flat)]) == {entry_id}
            assert await client.xlen(keys.dead_letter) == 1
            assert (await client.xpending(keys.stream, GROUP))["pending"] == 0
        finally:
            await client.aclose()

    _run(main())
