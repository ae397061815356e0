"""The real services on a Redis Cluster (3 primaries, a replica each) and through Sentinel: every
message handled or dead-lettered as on one server, and nothing lost by the services when the
stream's primary is killed, when Sentinel fails over, and when the stream's slot is resharded
under load. Run with `-s` to see the figures (docs/reliability.md quotes them).

What Redis itself loses in a failover (entries it acknowledged to the producer that its replica
never got: replication is asynchronous) is counted apart from what the services lose, which must
be nothing of what Redis kept."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis
from redis.crc import key_slot

from streamgroup.devserver import DevServer
from streamgroup.keys import StreamKeys, shard_keys
from support.cluster import FAULT_KINDS, DevCluster, DevSentinel, Tally, tally, wait_for
from support.processes import ServiceProcess, Services, service_env

STREAM = "{orders}"
DEAD = "{orders}:dead"
ONE_SHARD = shard_keys(STREAM, "group", 1)
POISON_EVERY = 50  # serials that are multiples of this are poison (support.handlers.record_sharded)


def _common(recorder_server: DevServer, stream: str = STREAM) -> dict[str, object]:
    return {
        "STREAM": stream,
        "HANDLER": "support.handlers:record_sharded",
        "TESTHANDLER_FAIL_MOD": POISON_EVERY,
        "TESTHANDLER_REDIS_URL": recorder_server.url,
        "BLOCK_MS": 500,
        "CLAIM_MIN_IDLE_MS": 3000,
        "RECLAIM_INTERVAL_MS": 500,
    }


def _start_group(services: Services, common: dict[str, object], **producer: object) -> list[ServiceProcess]:
    """Three consumers, a reclaimer and a producer; returns them, the producer last."""
    started = [services.start("consumer", name=f"consumer-{n}", metrics=True, **common) for n in "abc"]
    started.append(services.start("reclaimer", name="reclaimer", metrics=True, **common))
    started.append(services.start("producer", name="producer", metrics=True, **common, **producer))
    return started


class Readiness:
    """Samples /readyz of running services: how many times each went not-ready, for how long."""

    def __init__(self, processes: list[ServiceProcess]) -> None:
        self._processes = processes
        self.not_ready_seconds = {p.log_path.stem: 0.0 for p in processes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Readiness:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        interval = 0.2
        while not self._stop.wait(interval):
            for proc in self._processes:
                if not proc.alive():
                    continue
                try:
                    ready = proc.get("/readyz")[0] == 200
                except OSError:
                    ready = False
                if not ready:
                    self.not_ready_seconds[proc.log_path.stem] += interval

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.not_ready_seconds.items())


def _finish(
    started: list[ServiceProcess], data: Callable[[], redis.Redis | redis.RedisCluster], recorder: redis.Redis,
    promised: int, shards: list[StreamKeys] = ONE_SHARD,
) -> Tally:  # fmt: skip
    """Wait for the producer to finish and every kept entry to be handled or dead-lettered; check
    no service exited; stop them all (exit 0). Returns the tally."""
    producer, others = started[-1], started[:-1]
    assert producer.wait(240) == 0, "the producer finished its messages"

    def settled() -> Tally | None:
        with data() as client:
            result = tally(client, recorder, shards, promised)
        return result if not result.lost_by_us else None

    try:
        result = wait_for(settled, "every kept entry handled or dead-lettered", timeout=180)
    except TimeoutError:
        with data() as client:
            print(tally(client, recorder, shards, promised).summary("unsettled"))
        raise
    for proc in others:
        assert proc.alive(), f"{proc.log_path.stem} exited:\n{proc.output[-3000:]}"
    wait_for(lambda: all(p.get("/readyz")[0] == 200 for p in others), "every service ready again")
    for proc in others:
        assert proc.stop(60) == 0, proc.output[-3000:]
    return result


def test_services_on_a_cluster_handle_everything_and_keep_every_key_in_the_streams_slot(
    cluster_url: str, cluster: DevCluster, recorder: redis.Redis, recorder_server: DevServer, services_on
) -> None:
    services: Services = services_on(cluster_url)
    started = _start_group(services, _common(recorder_server), PRODUCERS=5, PRODUCER_INTERVAL_MS=10, MAX_MESSAGES=1500)
    result = _finish(started, cluster.cluster_client, recorder, promised=1500)
    print("\n" + result.summary(f"cluster ({cluster.kind}), no fault"))
    assert len(result.kept) == 1500 and result.lost_by_redis == 0
    poison = {i for i, (_, _, serial) in result.kept.items() if int(serial) % POISON_EVERY == 0}
    assert result.dead == poison and len(poison) == 30
    assert set(result.handled) == set(result.kept) - poison and result.duplicated == 0

    # Every key the scripts touch together is on the stream's node, in the stream's slot: the
    # dead letters, the producer's run marker and the consumer-name leases.
    owner, slot = cluster.owner_of(STREAM), cluster.slot_of(STREAM)
    with cluster.client(owner) as node:
        keys = set(node.keys("{orders}*"))
        assert DEAD in keys and node.xlen(DEAD) == 30
        assert any(":producer-run:" in key for key in keys)
        for key in keys:
            assert int(node.execute_command("CLUSTER", "KEYSLOT", key)) == slot == key_slot(key.encode())

    # The dead-letters command on the cluster: list them, replay them all to the stream (one
    # script per entry on both keys of the slot), and the dead-letter stream is empty.
    listed = _cli(cluster_url, "dead-letters", "list", "--json")
    assert sorted(row["original_id"] for row in json.loads(listed)) == sorted(entry_id for _, entry_id in poison)
    _cli(cluster_url, "dead-letters", "replay", "--all", "--yes")
    with cluster.cluster_client() as client:
        assert client.xlen(DEAD) == 0 and client.xlen(STREAM) == 1500 + 30


def _cli(url: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "streamgroup", *args],
        env=service_env(url, STREAM=STREAM), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_stream_without_a_hash_tag_on_a_cluster_refuses_to_start_and_says_how_to_fix_it(
    cluster_url: str, services_on
) -> None:
    services: Services = services_on(cluster_url)
    consumer = services.start("consumer", STREAM="orders", HANDLER="support.handlers:record")
    assert consumer.wait(60) == 2
    assert "STREAMGROUP_STREAM={orders}" in consumer.output and "orders:dead" in consumer.output


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_killing_the_streams_primary_under_load_loses_nothing_redis_kept(
    kind: str, recorder: redis.Redis, recorder_server: DevServer, services_on
) -> None:
    with DevCluster(kind) as cluster:
        services: Services = services_on(cluster.url)
        started = _start_group(
            services, _common(recorder_server), PRODUCERS=10, PRODUCER_INTERVAL_MS=50, MAX_MESSAGES=4000
        )
        with Readiness(started) as readiness:
            wait_for(lambda: recorder.llen("done-sharded") >= 1000, "the group at work")
            killed, promoted = cluster.kill_primary_of(STREAM)
            result = _finish(started, cluster.cluster_client, recorder, promised=4000)
        print("\n" + result.summary(f"cluster ({kind}), primary {killed} killed, {promoted} promoted"))
        print("not ready for:", readiness.summary())
        assert not result.lost_by_us
        poison = {i for i, (_, _, serial) in result.kept.items() if int(serial) % POISON_EVERY == 0}
        assert poison <= result.dead


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_sentinel_failover_under_load_loses_nothing_redis_kept(
    kind: str, recorder: redis.Redis, recorder_server: DevServer, services_on
) -> None:
    with DevSentinel(kind) as group:
        services: Services = services_on(group.url)
        common = {
            **_common(recorder_server),
            "REDIS_SENTINELS": group.addresses,
            "REDIS_SENTINEL_MASTER": group.master_name,
        }
        started = _start_group(services, common, PRODUCERS=10, PRODUCER_INTERVAL_MS=50, MAX_MESSAGES=4000)
        with Readiness(started) as readiness:
            wait_for(lambda: recorder.llen("done-sharded") >= 1000, "the group at work")
            old, new = group.failover()
            result = _finish(
                started, lambda: redis.Redis(port=group.primary_port(), decode_responses=True), recorder, 4000
            )
        print("\n" + result.summary(f"sentinel ({kind}), SENTINEL FAILOVER {old} -> {new}"))
        print("not ready for:", readiness.summary())
        assert not result.lost_by_us
        poison = {i for i, (_, _, serial) in result.kept.items() if int(serial) % POISON_EVERY == 0}
        assert poison <= result.dead


def _stream_on_the_first_slot_of(cluster: DevCluster, owner: int, shards: int = 1) -> str:
    """A hash-tagged stream name whose (first) shard is in the lowest slot `owner` serves: the
    first `redis-cli --cluster reshard` moves from it."""
    with cluster.client() as client:
        slots = client.execute_command("CLUSTER", "SLOTS")
    first = min(int(start) for start, _end, primary, *_ in slots if int(primary[1]) == owner)
    n = 0
    while key_slot(shard_keys(f"{{s{n}}}", "group", shards)[0].stream.encode()) != first:
        n += 1
    return f"{{s{n}}}"


def test_resharding_the_streams_slot_under_load_with_redis_cli_loses_nothing(
    cluster_url: str, cluster: DevCluster, recorder: redis.Redis, recorder_server: DevServer, services_on
) -> None:
    primaries = cluster.primary_ports()
    stream = _stream_on_the_first_slot_of(cluster, primaries[0])
    services: Services = services_on(cluster_url)
    started = _start_group(
        services, _common(recorder_server, stream), PRODUCERS=10, PRODUCER_INTERVAL_MS=50, MAX_MESSAGES=4000
    )
    moves = []
    with Readiness(started) as readiness:
        wait_for(lambda: recorder.llen("done-sharded") >= 500, "the group at work")
        # There with redis-cli (it moves the source's lowest slots first: the stream's), and back
        # step by step as redis-cli does it (SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE).
        source, target = primaries[0], primaries[1]
        assert cluster.owner_of(stream) == source
        cluster.reshard(source, target, 1)
        assert cluster.owner_of(stream) == target
        moves.append(f"{source}->{target} (redis-cli --cluster reshard)")
        time.sleep(2)
        cluster.move_slot_of(stream, source)
        assert cluster.owner_of(stream) == source
        moves.append(f"{target}->{source} (SETSLOT/MIGRATE)")
        result = _finish(started, cluster.cluster_client, recorder, 4000, shard_keys(stream, "group", 1))
    print("\n" + result.summary(f"cluster ({cluster.kind}), stream {stream} resharded {' '.join(moves)}"))
    print("not ready for:", readiness.summary())
    assert not result.lost_by_us and result.lost_by_redis == 0 and len(result.kept) == 4000
    assert any("the stream's slot moved" in proc.output for proc in started[:3]), "a read was redirected"
    poison = {i for i, (_, _, serial) in result.kept.items() if int(serial) % POISON_EVERY == 0}
    assert result.dead == poison


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_sharded_streams_ride_out_resharding_and_a_primary_kill_under_load(
    kind: str, recorder: redis.Redis, recorder_server: DevServer, services_on
) -> None:
    """STREAMGROUP_SHARDS=6 over the three primaries, every shard live: the slot of one shard moved
    with `redis-cli --cluster reshard`, another shard's slot step by step, then the primary holding
    the most shards SIGKILLed. Nothing that Redis kept is lost, and every poison message is in its
    own shard's dead-letter stream."""
    shards = 6
    with DevCluster(kind) as cluster:
        primaries = cluster.primary_ports()
        stream = _stream_on_the_first_slot_of(cluster, primaries[0], shards)
        layout = shard_keys(stream, "group", shards)
        services: Services = services_on(cluster.url)
        common = {**_common(recorder_server, stream), "SHARDS": shards}
        started = _start_group(services, common, PRODUCERS=10, PRODUCER_INTERVAL_MS=50, MAX_MESSAGES=6000)
        events = []
        with Readiness(started) as readiness:
            wait_for(lambda: recorder.llen("done-sharded") >= 1000, "the group at work")
            first = layout[0].stream
            cluster.reshard(primaries[0], primaries[1], 1)
            assert cluster.owner_of(first) == primaries[1]
            events.append(f"{first} {primaries[0]}->{primaries[1]} (redis-cli --cluster reshard)")
            second = next(keys.stream for keys in layout[1:] if cluster.slot_of(keys.stream) != cluster.slot_of(first))
            source, target = cluster.move_slot_of(second)
            events.append(f"{second} {source}->{target} (SETSLOT/MIGRATE)")
            wait_for(lambda: recorder.llen("done-sharded") >= 2500, "the group at work after the moves")
            holders = Counter(cluster.owner_of(keys.stream) for keys in layout)
            busiest = holders.most_common(1)[0][0]
            killed, promoted = cluster.kill_primary_of(
                next(k.stream for k in layout if cluster.owner_of(k.stream) == busiest)
            )
            events.append(f"primary {killed} ({holders[busiest]} shards) killed, {promoted} promoted")
            result = _finish(started, cluster.cluster_client, recorder, 6000, layout)
        print("\n" + result.summary(f"cluster ({kind}), {shards} shards: {'; '.join(events)}"))
        print("not ready for:", readiness.summary())
        assert not result.lost_by_us
        assert {stream for stream, _ in result.kept} == {keys.stream for keys in layout}, "every shard was written"
        poison = {entry for entry, (_, _, serial) in result.kept.items() if int(serial) % POISON_EVERY == 0}
        assert poison <= result.dead
        with cluster.cluster_client() as client:
            for keys in layout:
                sources = {fields["x-streamgroup-stream"] for _, fields in client.xrange(keys.dead_letter)}
                assert sources <= {keys.stream}, f"{keys.dead_letter} holds only its own shard's entries"
        assert any("the stream's slot moved" in proc.output for proc in started[:3]), "a read was redirected"
