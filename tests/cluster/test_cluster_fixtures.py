"""The replicated setups themselves: what the other cluster and Sentinel tests rely on."""

from __future__ import annotations

import redis

from support.cluster import DevCluster, DevSentinel


def test_the_cluster_has_three_primaries_with_a_replica_each_and_serves_every_slot(cluster_url, cluster) -> None:
    primaries = cluster.primary_ports()
    assert len(primaries) == 3
    assert all(len(cluster.replicas_of(port)) == 1 for port in primaries)
    for node in cluster.live_nodes():
        with cluster.client(node.port) as client:
            info = client.cluster("info")
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_assigned"]) == 16384
    with cluster.cluster_client() as client:
        for n in range(30):  # keys on every primary
            client.set(f"key{n}", n)
        assert [client.get(f"key{n}") for n in range(30)] == [str(n) for n in range(30)]


def test_moving_a_slot_takes_its_keys_to_the_other_primary(cluster_url, cluster) -> None:
    with cluster.cluster_client() as client:
        client.xadd("{moving}", {"n": "1"})
        source, target = cluster.move_slot_of("{moving}")
        assert cluster.owner_of("{moving}") == target != source
        with cluster.client(source) as old, cluster.client(target) as new:
            assert new.execute_command("CLUSTER", "COUNTKEYSINSLOT", cluster.slot_of("{moving}")) == 1
            assert old.execute_command("CLUSTER", "COUNTKEYSINSLOT", cluster.slot_of("{moving}")) == 0
        assert client.xlen("{moving}") == 1


def test_killing_a_primary_promotes_its_replica_and_the_data_survives(fresh_cluster: DevCluster) -> None:
    with fresh_cluster.cluster_client() as client:
        client.xadd("{kept}", {"n": "1"})
        client.wait(1, 5000)  # replicated before the kill: nothing may be lost to asynchrony here
    replica = fresh_cluster.replicas_of(fresh_cluster.owner_of("{kept}"))[0]
    killed, promoted = fresh_cluster.kill_primary_of("{kept}")
    assert promoted == replica
    assert fresh_cluster.node(killed).process.poll() is not None
    assert fresh_cluster.owner_of("{kept}") == promoted
    with fresh_cluster.cluster_client() as client:
        assert client.xlen("{kept}") == 1


def test_sentinel_failover_makes_the_replica_primary_and_the_old_primary_its_replica(sentinel_group) -> None:
    old_port = sentinel_group.primary_port()
    with redis.Redis(port=old_port) as old:
        old.xadd("kept", {"n": "1"})
        old.wait(1, 5000)
    old, new = sentinel_group.failover()
    assert (old, new) == (old_port, sentinel_group.servers[1].port)
    with (
        redis.Redis(port=new, decode_responses=True) as primary,
        redis.Redis(port=old, decode_responses=True) as demoted,
    ):
        assert primary.info("replication")["role"] == "master"
        assert demoted.info("replication")["role"] == "slave"
        assert primary.xlen("kept") == 1


def test_stopping_leaves_no_process_behind() -> None:
    cluster = DevCluster("redis", replicas=0).start()
    setup = DevSentinel("redis").start()
    processes = [node.process for node in cluster.nodes] + [server.process for server in setup.servers]
    processes += setup._processes
    assert all(process.poll() is None for process in processes)
    cluster.stop()
    setup.stop()
    assert all(process.poll() is not None for process in processes)
    assert not setup.directory.exists()


def test_redis_cli_reshard_moves_slots_and_their_keys(cluster_url, cluster) -> None:
    def slots_of(port: int) -> int:
        with cluster.client() as client:
            return sum(
                int(e) - int(s) + 1 for s, e, p, *_ in client.execute_command("CLUSTER", "SLOTS") if int(p[1]) == port
            )

    source, target = cluster.primary_ports()[:2]
    before = slots_of(source), slots_of(target)
    with cluster.cluster_client() as client:
        for n in range(200):
            client.set(f"key{n}", n)
        cluster.reshard(source, target, 100)
        assert (slots_of(source), slots_of(target)) == (before[0] - 100, before[1] + 100)
        assert [client.get(f"key{n}") for n in range(200)] == [str(n) for n in range(200)]
