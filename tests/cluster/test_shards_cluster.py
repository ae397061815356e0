"""Sharded streams on a real Redis Cluster (STREAMGROUP_SHARDS=6), in process with the cluster
client of streamgroup.topology: the producer spreads the shards over the nodes and keeps each
partition value in order in one shard; the reclaimer takes over what a dead consumer held in every
shard, on whichever node it lives, and dead-letters poison in the shard's own dead-letter stream;
its shard-labelled gauges equal XINFO/XPENDING of each shard on its node; status adds them up.

The consumer's hand-pipelined reads (streamgroup.reading) reach a cluster once GroupReader takes
its connection per key (topology.KeyConnections); the process-level end to end with three
consumers is tests/test_shards.py::run_end_to_end, which takes the URL and a data client."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from prometheus_client import CollectorRegistry

from streamgroup import topology
from streamgroup.cli import Target, _collect
from streamgroup.keys import read_shards, shard_of
from streamgroup.metrics import Metrics
from streamgroup.service import Service
from streamgroup.service import _serve as serve
from streamgroup.settings import Settings
from streamgroup_producer.__main__ import Producer
from streamgroup_reclaimer.__main__ import Reclaimer
from support import inprocess_handlers
from support.cluster import DevCluster
from test_shards import run_end_to_end

SHARDS, PRODUCERS, MESSAGES = 6, 5, 300


async def _service(settings: Settings, name: str, group_level: bool = False) -> Service:
    shards = read_shards(settings)
    metrics = Metrics(
        settings.stream, settings.group, group_level=group_level, registry=CollectorRegistry(),
        shards=[keys.shard for keys in shards],
    )  # fmt: skip
    client = await topology.create_client(settings)
    return Service(name, settings, shards[0], metrics, client, shards=shards)


def test_six_shards_on_a_cluster(cluster_url: str, cluster: DevCluster) -> None:
    settings = Settings(
        redis_url=cluster_url, shards=SHARDS, partition_field="producer", producers=PRODUCERS,
        max_messages=MESSAGES, producer_interval_ms=0, metrics_port=0, consumer_name="reclaimer",
        handler="support.inprocess_handlers:poison_every_seventh", claim_min_idle_ms=1000,
        reclaim_interval_ms=200, max_deliveries=5,
    )  # fmt: skip
    layout = read_shards(settings)
    data = cluster.cluster_client()
    inprocess_handlers.handled.clear()

    async def produce() -> None:
        service = await _service(settings, "producer")
        try:
            await Producer(service).run()
        finally:
            await service.client.aclose()

    asyncio.run(produce())
    assert len({cluster.owner_of(keys.stream) for keys in layout}) > 1, "the shards live on several nodes"
    produced: dict[tuple[str, str], tuple[int, int]] = {}
    for keys in layout:
        by_producer: dict[int, list[int]] = defaultdict(list)
        for entry_id, fields in data.xrange(keys.stream):
            producer, serial = int(fields["producer"]), int(fields["serial"])
            assert shard_of(str(producer), SHARDS) == int(keys.shard)
            by_producer[producer].append(serial)
            produced[(keys.stream, entry_id)] = (producer, serial)
        assert all(serials == sorted(serials) for serials in by_producer.values()), "order per producer"
    assert len(produced) == MESSAGES

    # A consumer that read everything and died: the reclaimer must take over in every shard.
    for keys in layout:
        data.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
        data.xreadgroup(keys.group, "dead-consumer", {keys.stream: ">"}, count=MESSAGES)

    async def reclaim() -> None:
        service = await _service(settings, "reclaimer", group_level=True)
        reclaimer = Reclaimer(service)
        # Run as the service runs it: an outage (a node dropping a fresh connection, seen here under
        # load) is waited out with backoff and the run started again, not the end of the process.
        task = asyncio.create_task(serve(service, reclaimer))
        try:
            loop = asyncio.get_running_loop()
            settled = lambda: all(data.xpending(k.stream, k.group)["pending"] == 0 for k in layout)  # noqa: E731
            deadline = loop.time() + 60
            while not settled():
                assert loop.time() < deadline, "the reclaimer did not settle every shard"
                assert not task.done(), task.exception()
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # a collection after the last pass
            for keys in layout:
                labels = {"stream": settings.stream, "group": keys.group, "shard": keys.shard}
                sample = service.metrics.registry.get_sample_value
                pending = data.xpending(keys.stream, keys.group)["pending"]
                assert sample("streamgroup_group_pending", labels) == pending
                info = next(g for g in data.xinfo_groups(keys.stream) if g["name"] == keys.group)
                assert sample("streamgroup_group_lag", labels) == info["lag"]
                length = service.metrics.registry.get_sample_value(
                    "streamgroup_dead_letter_length", {"stream": settings.stream, "shard": keys.shard}
                )
                assert length == data.xlen(keys.dead_letter)
            whole, shards = await _collect(service.client, Target(settings.stream, settings.group, layout))
            assert whole.stream_length == MESSAGES and whole.pending == 0
            assert whole.dead_letter_length == sum(s.dead_letter_length for s in shards) > 0
        finally:
            service.request_stop("test")
            await task
            await reclaimer.close()
            await service.client.aclose()

    asyncio.run(reclaim())
    poison = {key for key, (_, serial) in produced.items() if serial % inprocess_handlers.POISON_EVERY == 0}
    assert set(inprocess_handlers.handled) == set(produced) - poison
    dead = set()
    for keys in layout:
        for _, fields in data.xrange(keys.dead_letter):
            assert fields["x-streamgroup-stream"] == keys.stream, "dead-lettered in its own shard"
            dead.add((keys.stream, fields["x-streamgroup-original-id"]))
    assert dead == poison


def test_six_shards_end_to_end_with_processes_on_a_cluster(
    cluster_url: str, cluster: DevCluster, recorder_server, recorder, services_on
) -> None:
    """Producer, three consumers and the reclaimer as processes, SHARDS=6 over the cluster's nodes:
    every message handled once or dead-lettered in its own shard, each partition value in order."""
    run_end_to_end(
        services_on(cluster_url), cluster.cluster_client(), recorder, SHARDS, TESTHANDLER_REDIS_URL=recorder_server.url
    )
