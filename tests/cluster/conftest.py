"""Replicated setups started by fixtures: a Redis Cluster of 3 primaries with a replica each and a
Sentinel group (1 primary, 1 replica, 3 sentinels), on Debian's redis-server 7.0 and on the
embedded Valkey 9. A setup that cannot start fails the test; nothing is skipped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from streamgroup.devserver import DevServer
from support.cluster import CLUSTER_KINDS, FAULT_KINDS, DevCluster, DevSentinel
from support.processes import Services


@pytest.fixture(scope="session", params=CLUSTER_KINDS)
def cluster(request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    """One cluster of each kind for the session, for tests that leave it whole (slots may move)."""
    with DevCluster(request.param) as running:
        yield running


@pytest.fixture
def cluster_url(cluster: DevCluster) -> str:
    """The session cluster, healthy and empty."""
    cluster.wait_healthy()
    for port in cluster.primary_ports():
        with cluster.client(port) as client:
            client.flushall()
    return cluster.url


@pytest.fixture(params=FAULT_KINDS)
def fresh_cluster(request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    """A cluster of its own, for a test that kills a node."""
    with DevCluster(request.param) as running:
        yield running


@pytest.fixture(params=FAULT_KINDS)
def sentinel_group(request: pytest.FixtureRequest) -> Iterator[DevSentinel]:
    """A Sentinel group of its own (a failover changes which server is the primary)."""
    with DevSentinel(request.param) as running:
        yield running


@pytest.fixture(scope="session")
def recorder_server() -> Iterator[DevServer]:
    """A plain server outside every cluster and Sentinel group, where the test handlers record
    what they handled: killing or resharding the services' Redis must not touch the record."""
    with DevServer("redis") as running:
        yield running


@pytest.fixture
def recorder(recorder_server: DevServer) -> Iterator[redis.Redis]:
    """A client of the recorder server, emptied for the test (TESTHANDLER_REDIS_URL: recorder_server.url)."""
    with redis.Redis(port=recorder_server.port, decode_responses=True) as client:
        client.flushall()
        yield client


@pytest.fixture
def services_on(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Services]]:
    """Services(url) for a test's cluster or Sentinel group; every process is killed afterwards
    and its log printed when the test failed."""
    made: list[Services] = []

    def make(url: str) -> Services:
        made.append(Services(url, tmp_path))
        return made[-1]

    yield make
    for services in made:
        services.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"\nservice logs of {request.node.name}:\n{services.logs()}")
