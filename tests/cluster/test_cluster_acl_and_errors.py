"""A Redis Cluster's own failures are outages, never an exit; each service runs on a cluster with
nothing but its ACL rule for a cluster (streamgroup.acl, cluster=True) set on every node."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest
import redis
from redis import exceptions as rx
from redis.asyncio.sentinel import MasterNotFoundError

from streamgroup import acl
from streamgroup.devserver import DevServer
from streamgroup.redis_errors import OUTAGE_KINDS, classify
from support.cluster import DevCluster, wait_for
from support.processes import Services, service_env

CLUSTER_FAILURES = [
    (rx.ClusterDownError("The cluster is down"), "clusterdown"),
    (rx.TryAgainError("Multiple keys request during rehashing of slot"), "tryagain"),
    (rx.MasterDownError("Link with MASTER is down"), "masterdown"),
    (rx.MovedError("3999 127.0.0.1:6381"), "redirect"),
    (rx.AskError("3999 127.0.0.1:6381"), "redirect"),
    (rx.ResponseError("UNBLOCKED the stream key no longer exists"), "unblocked"),
    (rx.ClusterError("TTL exhausted."), "cluster"),
    (rx.RedisClusterException("Redis Cluster cannot be connected."), "cluster"),
    (rx.SlotNotCoveredError("Command # 1 (XADD) requires a slot that is not covered"), "cluster"),
    (rx.ResponseError("NOREPLICAS Not enough good replicas to write."), "noreplicas"),
    (MasterNotFoundError("No master found for 'streamgroup'"), "connection"),
]


@pytest.mark.parametrize(("exc", "kind"), CLUSTER_FAILURES, ids=[type(e).__name__ for e, _ in CLUSTER_FAILURES])
def test_cluster_and_sentinel_failures_are_outages(exc: Exception, kind: str) -> None:
    verdict = classify(exc)
    assert verdict is not None and not verdict.refused and verdict.expected and verdict.kind == kind
    assert kind in OUTAGE_KINDS


def test_a_cluster_nobody_answers_keeps_a_service_waiting_not_ready_never_exiting(tmp_path) -> None:
    """STREAMGROUP_REDIS_MODE=cluster with no node reachable: RedisClusterException, not even a
    RedisError, is waited out (before this, every service exited 1 on it)."""
    with DevServer("redis") as placeholder:
        url = placeholder.url
    services = Services(url, tmp_path)  # the server is gone: nothing listens there now
    try:
        consumer = services.start(
            "consumer", metrics=True, REDIS_MODE="cluster", STREAM="{orders}", HANDLER="support.handlers:record"
        )
        wait_for(lambda: (consumer.metric("streamgroup_redis_errors_total", kind="cluster") or 0) >= 2, "retries")
        assert consumer.alive() and consumer.get("/readyz")[0] == 503
        assert consumer.stop() == 0
    finally:
        services.stop_all()


def _setuser_everywhere(cluster: DevCluster, service: str, user: str, password: str, stream: str) -> None:
    for node in cluster.live_nodes():
        with cluster.client(node.port) as client:
            setinfo = acl.server_knows_client_setinfo(client.info("server"))
            client.execute_command(
                *acl.setuser_args(service, user, password, stream=stream, client_setinfo=setinfo, cluster=True)
            )
            client.acl_log_reset()


def test_each_service_runs_on_a_cluster_with_exactly_its_cluster_acl_rule(
    cluster_url: str, cluster: DevCluster, recorder_server: DevServer, recorder: redis.Redis, tmp_path
) -> None:
    stream = "{orders}"
    users = {service: (f"sg-{service}", secrets.token_hex(12)) for service in acl.SERVICES}
    for service, (user, password) in users.items():
        _setuser_everywhere(cluster, service, user, password, stream)
    port = cluster.live_nodes()[0].port

    def url(service: str) -> str:
        user, password = users[service]
        return f"redis://{user}:{password}@127.0.0.1:{port}/0"

    services = Services(cluster_url, tmp_path)
    common = {
        "STREAM": stream, "HANDLER": "support.handlers:poison_some", "TESTHANDLER_FAIL_MOD": 10,
        "TESTHANDLER_REDIS_URL": recorder_server.url, "BLOCK_MS": 300, "RECLAIM_INTERVAL_MS": 300,
    }  # fmt: skip
    try:
        consumer = services.start("consumer", metrics=True, REDIS_URL=url("consumer"), **common)
        reclaimer = services.start("reclaimer", metrics=True, REDIS_URL=url("reclaimer"), **common)
        producer = services.start(
            "producer", REDIS_URL=url("producer"), MAX_MESSAGES=100, PRODUCER_INTERVAL_MS=0, **common
        )
        assert producer.wait(60) == 0, producer.output[-2000:]
        wait_for(lambda: recorder.llen("done-by") == 90, "90 handled, 10 dead-lettered")
        wait_for(lambda: reclaimer.metric("streamgroup_stream_length") == 100, "group metrics")
        status = subprocess.run(
            [sys.executable, "-m", "streamgroup", "status"],
            env=service_env(url("status"), STREAM=stream), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "dead letters      10" in status.stdout and "stream length     100" in status.stdout
        for proc in (consumer, reclaimer):
            assert proc.stop() == 0, proc.output[-2000:]
        for proc in services.started:
            assert "NOPERM" not in proc.output and "NoPermission" not in proc.output
        for node in cluster.live_nodes():
            with cluster.client(node.port) as client:
                assert client.acl_log() == [], f"denials on {node.port}"
    finally:
        services.stop_all()
        for node in cluster.live_nodes():
            with cluster.client(node.port) as client:
                client.acl_deluser(*[user for user, _ in users.values()])
