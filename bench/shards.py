"""Sharded streams (STREAMGROUP_SHARDS): end-to-end throughput with 1, 2 and 3 shards, on one
server and on a 3-node Redis Cluster, and the Redis CPU each node spends per message.

One producer (500 virtual producers, no pause) and one consumer (no-op handler) per run, both with
SHARDS=N; the clock runs from the last poll that saw nothing added to the first that saw every
message read by the group and nothing pending, over all shards. Redis CPU is the growth of INFO
cpu's used_cpu_user + used_cpu_sys on each node over the run (the harness's own polling and, on
the cluster, the cluster bus included), and of INFO commandstats' usec for what the services send.

On the cluster (3 primaries, no replicas, Debian's redis-server as in the tests) each run's stream
name is chosen so that shard i lives on node i: 2 shards use two nodes, 3 shards all three. The
runs on one server and on the cluster alternate, so both see the same machine.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from redis.crc import key_slot

from bench.suite import ROOT, Bench, BenchError, Result
from streamgroup.keys import StreamKeys, shard_keys

SHARD_COUNTS = (1, 2, 3)
CLUSTER_NODES = 3
SERVICE_COMMANDS = ("evalsha", "xreadgroup", "xack")  # not the harness's polling (XINFO, XLEN)


@dataclass
class Placement:
    """Where the shards live: the URL the services get, a client for the harness, and every node
    (a plain client each) whose CPU is measured."""

    label: str
    url: str
    client: redis.Redis | redis.RedisCluster
    nodes: list[redis.Redis]
    slot_owners: list[tuple[int, int, int]] | None = None  # (first slot, last slot, node index); None: one server

    def node_of(self, key: str) -> int:
        if self.slot_owners is None:
            return 0
        slot = key_slot(key.encode())
        return next(node for first, last, node in self.slot_owners if first <= slot <= last)

    def stream_for(self, bench: Bench, shards: int) -> str:
        """A fresh stream name, hash-tagged so its dead-letter stream shares its slot; on the
        cluster one whose shard i lives on node i (every run of a shard count on the same nodes)."""
        while True:
            stream = "{" + bench.name("bench:shards") + "}"
            homes = [self.node_of(keys.stream) for keys in shard_keys(stream, "g", shards)]
            if self.slot_owners is None or homes == list(range(shards)):
                return stream


def node_cpu_seconds(node: redis.Redis) -> float:
    cpu = node.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def node_command_usec(node: redis.Redis) -> float:
    stats = node.info("commandstats")
    return float(sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0) for name in SERVICE_COMMANDS))


def node_name(node: redis.Redis) -> str:
    kwargs = node.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port')}"


@contextmanager
def cluster_placement() -> Iterator[Placement]:
    tests = str(ROOT / "tests")  # the cluster the tests run on, so both measure one setup
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support.cluster import DevCluster

    with DevCluster("redis", primaries=CLUSTER_NODES, replicas=0) as cluster:
        ports = [node.port for node in cluster.nodes]
        nodes = [redis.Redis(port=port, decode_responses=True) for port in ports]
        slot_owners = [
            (int(first), int(last), ports.index(int(primary[1])))
            for first, last, primary, *_ in nodes[0].execute_command("CLUSTER", "SLOTS")
        ]
        client = cluster.cluster_client()
        try:
            yield Placement(f"{CLUSTER_NODES}-node cluster", cluster.url, client, nodes, slot_owners)
        finally:
            client.close()
            for node in nodes:
                node.close()


def shard_scaling(bench: Bench) -> None:
    s = bench.sizes
    one_server = Placement("one server", bench.url, bench.r, [bench.r])
    with cluster_placement() as on_cluster:
        bench.report.settings["shards"] = {
            "messages": s.messages,
            "producer": "PRODUCERS=500 PRODUCER_INTERVAL_MS=0 SHARDS=N (round-robin)",
            "consumer": f"one process, HANDLER=streamgroup.handlers:noop BATCH_SIZE={s.consumer_batch} SHARDS=N",
            "one server": node_name(bench.r),
            "cluster": f"{CLUSTER_NODES} primaries, no replicas: " + ", ".join(map(node_name, on_cluster.nodes)),
        }
        for shards in SHARD_COUNTS:
            for placement in (one_server, on_cluster):
                _measure(bench, placement, shards)


def _measure(bench: Bench, placement: Placement, shards: int) -> None:
    s = bench.sizes
    rates: list[float] = []
    cpu_per_message: list[dict[str, float]] = []
    command_usec: list[float] = []
    for _ in range(s.runs):
        rate, cpu, usec = _run(bench, placement, shards, s.messages)
        rates.append(rate)
        cpu_per_message.append(cpu)
        command_usec.append(usec)
    label = f"{shards} shard{'s' if shards > 1 else ''} on {placement.label}"
    per_node = {name: bench.median([run[name] for run in cpu_per_message]) for name in cpu_per_message[0]}
    busiest, total = max(per_node.values()), sum(per_node.values())
    shown = ", ".join(f"{name} {value:.1f} us" for name, value in per_node.items())
    bench.report.add(
        Result("shards", f"{label}, end to end", bench.median(rates), "msg/s", rates, s.messages, True,
               f"{s.runs} run(s); Redis CPU per message by node: {shown}")
    )  # fmt: skip
    usec = bench.median(command_usec)
    implied = (
        f"{total:.1f} us per message over all nodes: N nodes holding one shard each would serve about "
        f"N x {1e6 / total:,.0f} msg/s before one is full"
        if len(per_node) > 1
        else f"one node at 100% CPU would serve about {1e6 / busiest:,.0f} msg/s"
    )
    bench.report.add(
        Result("shards", f"{label}, Redis CPU per message (busiest node)", busiest, "us", [busiest], s.messages,
               True, f"commands the services sent: {usec:.1f} us per message; {implied}")
    )  # fmt: skip


def _run(bench: Bench, placement: Placement, shards: int, count: int) -> tuple[float, dict[str, float], float]:
    client, group = placement.client, "g-shards"
    stream = placement.stream_for(bench, shards)
    layout = shard_keys(stream, group, shards)
    for keys in layout:
        client.xgroup_create(keys.stream, group, id="0", mkstream=True)
    consumer_name = bench.name("c-shards")
    settings = {"url": placement.url, "STREAM": stream, "SHARDS": shards}
    consumer = bench.service(
        "consumer", consumer_name, **settings, GROUP=group, HANDLER="streamgroup.handlers:noop",
        BATCH_SIZE=bench.sizes.consumer_batch, BLOCK_MS=100,
    )  # fmt: skip
    procs = [consumer]
    try:
        bench.wait_consumers(layout[-1].stream, group, [consumer_name], procs, client=client)
        for node in placement.nodes:
            node.config_resetstat()
        cpu_before = {node_name(node): node_cpu_seconds(node) for node in placement.nodes}
        producer = bench.service(
            "producer", bench.name("p-shards"), **settings, PRODUCERS=500, PRODUCER_INTERVAL_MS=0, MAX_MESSAGES=count
        )
        procs.append(producer)

        def sample() -> tuple[bool, bool, str]:
            added = sum(client.xlen(keys.stream) for keys in layout)
            groups = [bench.group_info(keys.stream, group, client) for keys in layout]
            read = sum(g["entries-read"] or 0 for g in groups)
            pending = sum(g["pending"] for g in groups)
            return added == 0, read == count and pending == 0, f"{read}/{count} read, {pending} pending"

        elapsed = bench.time_until_done(sample, procs, timeout=600, what=stream)
        cpu = {}
        for index, node in enumerate(placement.nodes):
            spent = node_cpu_seconds(node) - cpu_before[node_name(node)]
            cpu[f"{node_name(node)} {_holds(placement, layout, index)}"] = spent * 1e6 / count
        usec = sum(node_command_usec(node) for node in placement.nodes) / count
    finally:
        for proc in procs:
            if proc.alive():
                proc.process.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
    if any(codes):
        raise BenchError(f"shards={shards} on {placement.label}: services exited with {codes}: {consumer.tail()}")
    infos = [bench.group_info(keys.stream, group, client) for keys in layout]
    if any(info["pending"] or info["lag"] for info in infos):
        raise BenchError(f"{stream} not fully acknowledged: {infos}")
    read = sum(info["entries-read"] or 0 for info in infos)
    if read != count:
        raise BenchError(f"shards={shards} on {placement.label}: {read} entries read, expected {count}")
    for keys in layout:
        client.delete(keys.stream)
    return count / elapsed, cpu, usec


def _holds(placement: Placement, layout: list[StreamKeys], index: int) -> str:
    held = [keys.shard for keys in layout if placement.node_of(keys.stream) == index]
    return f"(shard {', '.join(held)})" if held else "(no shard)"
