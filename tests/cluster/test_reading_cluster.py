"""The consumer's GroupReader on a Redis Cluster: its pipelined XACK + XREADGROUP go to the node
that serves the stream's slot, follow ASK while the slot migrates, MOVED once it moved, and a
blocked read follows the slot when it moves away under it (Redis 7.0 answers UNBLOCKED, Valkey
MOVED). Acknowledgements sent with a redirected read count only once a node applied them."""

from __future__ import annotations

import asyncio

from streamgroup import topology
from streamgroup.keys import StreamKeys
from streamgroup.reading import GroupReader
from streamgroup.settings import Settings
from support.cluster import DevCluster

KEYS = StreamKeys("{rd}", "g", "{rd}:dead")


def _ids(entries) -> list[str]:
    return [entry[0].decode() for entry in entries]


def _pending(cluster: DevCluster) -> set[str]:
    with cluster.client(cluster.owner_of(KEYS.stream)) as node:
        return {row["message_id"] for row in node.xpending_range(KEYS.stream, KEYS.group, "-", "+", 100)}


def test_the_reader_follows_ask_moved_and_a_slot_moving_under_a_blocked_read(cluster_url, cluster) -> None:
    slot = cluster.slot_of(KEYS.stream)
    with cluster.cluster_client() as setup:
        ids = [setup.xadd(KEYS.stream, {"n": str(n)}) for n in range(20)]
        setup.xgroup_create(KEYS.stream, KEYS.group, id="0")
    acked: list[str] = []
    log: list[str] = []

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=KEYS.stream))
        reader = GroupReader(client, KEYS, "c1", 10, lambda done, _at, _n: acked.extend(done), timeout_seconds=5)
        loop = asyncio.get_running_loop()
        try:
            await reader.send(">", None)
            first = _ids(await reader.receive())
            assert first == ids[:10]
            reader.acknowledge(first)

            # Mid-migration: the stream is on the target already, the slot still the source's.
            source = cluster.owner_of(KEYS.stream)
            target, third = [port for port in cluster.primary_ports() if port != source][:2]
            cluster.begin_slot_move(slot, target)
            assert cluster.migrate_keys(slot, source, target) >= 1
            await reader.send(">", None)
            second = _ids(await reader.receive())
            assert second == ids[10:20] and acked == ids[:10]
            log.append("ask")
            cluster.finish_slot_move(slot, target)
            assert _pending(cluster) == set(ids[10:20]), "the first batch's XACK was applied on the target"

            # Moved again, to a third node: the reader's connection is still on the target.
            reader.acknowledge(second)
            await loop.run_in_executor(None, cluster.move_slot_of, KEYS.stream, third)
            with cluster.client(third) as node:
                later = [node.xadd(KEYS.stream, {"n": str(n)}) for n in range(20, 25)]
            await reader.send(">", None)
            assert _ids(await reader.receive()) == later and acked == ids[:20]
            log.append("moved")
            assert _pending(cluster) == set(later)

            # A blocked read on `third` while the slot moves back to the source.
            reader.acknowledge(later)
            await reader.send(">", 20_000)
            await asyncio.sleep(0.5)
            await loop.run_in_executor(None, cluster.move_slot_of, KEYS.stream, source)
            with cluster.client(source) as node:
                last = node.xadd(KEYS.stream, {"n": "25"})
            assert _ids(await asyncio.wait_for(reader.receive(), 60)) == [last]
            log.append("blocked read moved")
            assert acked == ids[:20] + later and _pending(cluster) == {last}
        finally:
            await reader.close()
            await client.aclose()

    asyncio.run(main())
    assert log == ["ask", "moved", "blocked read moved"]


def test_the_reader_survives_the_cluster_client_closing_its_connection_on_clusterdown(cluster_url, cluster) -> None:
    """redis-py's cluster client answers CLUSTERDOWN (a failover under way) on any command of its
    own by closing every connection, the reader's included, with a bare XACK's reply owed: what
    a sharded consumer met after a primary was killed. The next read must get its own reply."""
    with cluster.cluster_client() as setup:
        ids = [setup.xadd(KEYS.stream, {"n": str(n)}) for n in range(20)]
        setup.xgroup_create(KEYS.stream, KEYS.group, id="0")
    acked: list[str] = []

    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=cluster_url, stream=KEYS.stream))
        reader = GroupReader(client, KEYS, "c1", 10, lambda done, _at, _n: acked.extend(done), timeout_seconds=5)
        try:
            await reader.send(">", None)
            first = _ids(await reader.receive())
            reader.acknowledge(first)
            await reader.flush()
            await client.aclose()  # what redis-py does on ClusterDownError and SlotNotCoveredError
            await reader.send(">", None)
            assert _ids(await reader.receive()) == ids[10:20]
            assert acked == first
        finally:
            await reader.close()
            await client.aclose()

    asyncio.run(main())
    assert _pending(cluster) == set(ids[10:20])
