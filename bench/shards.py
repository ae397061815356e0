"""Sharded streams (STREAMGROUP_SHARDS): end-to-end throughput with 1, 2 and 3 shards, and the
Redis CPU each node spends per message.

One producer (500 virtual producers, no pause) and one consumer (no-op handler) per run, both with
SHARDS=N; the clock runs from the last poll that saw nothing added to the first that saw every
message read by the group and nothing pending, over all shards. Redis CPU is the growth of INFO
cpu's used_cpu_user + used_cpu_sys on each node over the run (the harness's own polling
included), and of INFO commandstats' usec for what the services send.

Here every shard is a key on the one server, so the figures show what sharding costs, not what it
gains: the gain needs the shards on several nodes (Redis Cluster), where each node serves its
shards' share of the per-message server cost computed here.
"""

from __future__ import annotations

import signal

import redis

from bench.suite import Bench, BenchError, Result
from streamgroup.keys import shard_keys

SHARD_COUNTS = (1, 2, 3)
SERVICE_COMMANDS = ("evalsha", "xreadgroup", "xack")  # not the harness's polling (XINFO, XLEN)


def node_cpu_seconds(node: redis.Redis) -> float:
    cpu = node.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def node_command_usec(node: redis.Redis) -> float:
    stats = node.info("commandstats")
    return float(sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0) for name in SERVICE_COMMANDS))


def node_name(node: redis.Redis) -> str:
    kwargs = node.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port')}"


def shard_scaling(bench: Bench) -> None:
    s = bench.sizes
    nodes = [bench.r]  # every node the shards live on; one server here
    bench.report.settings["shards"] = {
        "messages": s.messages,
        "producer": "PRODUCERS=500 PRODUCER_INTERVAL_MS=0 SHARDS=N (round-robin)",
        "consumer": f"one process, HANDLER=streamgroup.handlers:noop BATCH_SIZE={s.consumer_batch} SHARDS=N",
        "nodes": ", ".join(node_name(node) for node in nodes),
    }
    for shards in SHARD_COUNTS:
        rates: list[float] = []
        cpu_per_message: list[dict[str, float]] = []
        command_usec: list[float] = []
        for _ in range(s.runs):
            rate, cpu, usec = _run(bench, nodes, shards, s.messages)
            rates.append(rate)
            cpu_per_message.append(cpu)
            command_usec.append(usec)
        label = f"{shards} shard{'s' if shards > 1 else ''}"
        per_node = {name: bench.median([run[name] for run in cpu_per_message]) for name in cpu_per_message[0]}
        busiest = max(per_node.values())
        shown = ", ".join(f"{name} {value:.1f} us" for name, value in per_node.items())
        bench.report.add(
            Result("shards", f"{label}, end to end", bench.median(rates), "msg/s", rates, s.messages, True,
                   f"{s.runs} run(s); Redis CPU per message by node: {shown}")
        )  # fmt: skip
        usec = bench.median(command_usec)
        bench.report.add(
            Result("shards", f"{label}, Redis CPU per message (busiest node)", busiest, "us", [busiest], s.messages,
                   True, f"commands the services sent: {usec:.1f} us per message; one node at 100% CPU would "
                   f"serve about {1e6 / busiest:,.0f} msg/s, N nodes each holding 1/N of the shards about N times that")
        )  # fmt: skip


def _run(bench: Bench, nodes: list[redis.Redis], shards: int, count: int) -> tuple[float, dict[str, float], float]:
    stream, group = bench.name("bench:shards"), "g-shards"
    layout = shard_keys(stream, group, shards)
    for keys in layout:
        bench.r.xgroup_create(keys.stream, group, id="0", mkstream=True)
    consumer_name = bench.name("c-shards")
    consumer = bench.service(
        "consumer", consumer_name, STREAM=stream, GROUP=group, SHARDS=shards, HANDLER="streamgroup.handlers:noop",
        BATCH_SIZE=bench.sizes.consumer_batch, BLOCK_MS=100,
    )  # fmt: skip
    procs = [consumer]
    try:
        bench.wait_consumers(layout[-1].stream, group, [consumer_name], procs)
        for node in nodes:
            node.config_resetstat()
        cpu_before = {node_name(node): node_cpu_seconds(node) for node in nodes}
        producer = bench.service(
            "producer", bench.name("p-shards"), STREAM=stream, SHARDS=shards, PRODUCERS=500, PRODUCER_INTERVAL_MS=0,
            MAX_MESSAGES=count,
        )  # fmt: skip
        procs.append(producer)

        def sample() -> tuple[bool, bool, str]:
            with bench.r.pipeline(transaction=False) as pipe:
                for keys in layout:
                    pipe.xlen(keys.stream)
                    pipe.xinfo_groups(keys.stream)
                replies = pipe.execute()
            added = sum(replies[0::2])
            groups = [next(g for g in reply if g["name"] == group) for reply in replies[1::2]]
            read = sum(g["entries-read"] or 0 for g in groups)
            pending = sum(g["pending"] for g in groups)
            return added == 0, read == count and pending == 0, f"{read}/{count} read, {pending} pending"

        elapsed = bench.time_until_done(sample, procs, timeout=600, what=stream)
        cpu = {node_name(node): (node_cpu_seconds(node) - cpu_before[node_name(node)]) * 1e6 / count for node in nodes}
        usec = sum(node_command_usec(node) for node in nodes) / count
    finally:
        for proc in procs:
            if proc.alive():
                proc.process.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
    if any(codes):
        raise BenchError(f"shards={shards}: services exited with {codes}: {consumer.tail()}")
    for keys in layout:
        info = bench.group_info(keys.stream, group)
        if info["pending"] or info["lag"]:
            raise BenchError(f"{keys.stream} not fully acknowledged: {info}")
    read = sum(bench.group_info(keys.stream, group)["entries-read"] or 0 for keys in layout)
    if read != count:
        raise BenchError(f"shards={shards}: {read} entries read, expected {count}")
    bench.r.delete(*(keys.stream for keys in layout))
    return count / elapsed, cpu, usec
